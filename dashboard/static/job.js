// One job: its fields, progress or video or error, settings, and its whole event history, live.
"use strict";

(() => {
  const { el, duration, clock, progressText, eta } = IT;
  const jobId = decodeURIComponent(location.pathname.split("/")[2] || "");
  const apiUrl = `/api/jobs/${encodeURIComponent(jobId)}`;
  const shown = new Set();
  let job = null;

  document.getElementById("job-json").href = apiUrl;

  function field(list, name, value) {
    if (value === null || value === undefined || value === "") return;
    list.append(el("dt", {}, name), el("dd", {}, value));
  }

  function renderJob() {
    if (!job) return;
    document.title = `${job.name || job.id} · InfiniteTalk renders`;
    document.getElementById("job-name").textContent = job.name || job.id;
    const fields = document.getElementById("job-fields");
    fields.replaceChildren();
    field(fields, "id", job.id);
    field(fields, "state", el("span", { className: `badge ${job.state}` }, job.state));
    field(fields, "waiting because", job.state === "waiting" ? job.waiting_reason : null);
    field(fields, "source", job.source);
    field(fields, "priority", String(job.priority ?? 0));
    field(fields, "attempts", job.attempts ? String(job.attempts) : null);
    field(fields, "created", clock(job.created_at));
    field(fields, "queued", job.queued_at ? clock(job.queued_at) : null);
    field(fields, "started", job.started_at ? clock(job.started_at) : null);
    field(fields, "finished", job.finished_at ? clock(job.finished_at) : null);
    field(fields, "queue wait", job.queue_wait_s != null ? duration(job.queue_wait_s) : null);
    field(fields, "render time", job.render_s != null ? duration(job.render_s) : null);
    field(fields, "video length", job.duration_s != null ? `${duration(job.duration_s)} (${job.frames ?? "?"} frames)` : null);
    field(fields, "duplicate of", job.duplicate_of ? el("a", { href: `/jobs/${job.duplicate_of}` }, job.duplicate_of) : null);
    field(fields, "outputs deleted", job.deleted_at ? clock(job.deleted_at) : null);
    for (const [kind, name] of Object.entries(job.outputs || {})) field(fields, `${kind} file`, name);

    const progress = document.getElementById("job-progress");
    progress.hidden = job.state !== "running";
    if (job.state === "running") {
      document.getElementById("job-bar").value = Math.max(0, Math.min(1, job.progress || 0));
      const left = eta(job);
      document.getElementById("job-progress-text").textContent =
        `${progressText(job)} · elapsed ${duration(IT.serverNow() - job.started_at)} · ETA ${left === null ? "–" : duration(left)}`;
    }

    const video = document.getElementById("job-video");
    const current = video.querySelector("video");
    if (job.urls.video && (!current || current.dataset.src !== job.urls.video)) {
      video.replaceChildren(
        el("video", { controls: true, preload: "metadata", playsInline: true, src: job.urls.video,
          poster: job.urls.poster || "", dataset: { src: job.urls.video } }),
        el("p", {}, el("a", { href: job.urls.download, download: job.outputs.video || "" }, "Download MP4")));
    } else if (!job.urls.video) video.replaceChildren();

    const error = document.getElementById("job-error");
    error.hidden = !job.error_code && !job.error_message;
    error.textContent = `${job.error_code || "error"}: ${job.error_message || ""}` +
      (job.error_field ? ` (field or file: ${job.error_field})` : "");

    document.getElementById("job-settings").textContent = JSON.stringify(job.settings ?? {}, null, 2);
  }

  function addEvent(event) {
    if (shown.has(event.id)) return;
    shown.add(event.id);
    const data = event.data && typeof event.data === "object"
      ? Object.entries(event.data).map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ")
      : (event.data ?? "");
    const row = el("tr", { dataset: { id: event.id } }, el("td", {}, String(event.id)), el("td", {}, clock(event.at)),
      el("td", {}, el("span", { className: `badge ${event.kind}` }, event.kind)), el("td", { className: "meta" }, data));
    const body = document.getElementById("history");
    // Keep id order even if a replayed event arrives after a newer one.
    const after = [...body.children].find((r) => Number(r.dataset.id) > event.id);
    body.insertBefore(row, after || null);
  }

  async function load() {
    const response = await fetch(apiUrl, { headers: { Accept: "application/json" } });
    const missing = document.getElementById("job-missing");
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      if (body.ledger) IT.showLedgerNote(body.ledger);
      missing.textContent = body.error || `This job cannot be shown now (HTTP ${response.status}).`;
      missing.hidden = false;
      return;
    }
    missing.hidden = true;
    const body = await response.json();
    IT.setServerNow(body.now);
    job = body.job;
    for (const event of body.events) addEvent(event);
    renderJob();
    document.body.dataset.ready = "1";
  }

  IT.listen({
    snapshot() { load(); },
    event(frame) {
      if (frame.event.job_id !== jobId) return;
      if (frame.job) job = frame.job;
      addEvent(frame.event);
      renderJob();
    },
  });
  setInterval(() => { if (job && job.state === "running") renderJob(); }, 1000);
})();
