// One job: its fields, progress (bar and progress-over-time chart) or video or error, failure
// details, per-stage timings, attempts, and a timeline of its state events, live. The raw
// events (progress included, thousands for a long video) are paged behind a link (?events=1).
"use strict";

(() => {
  const { el, duration, clock, when, timeEl, progressText, eta, resolution, tinyBadge } = IT;
  const jobId = decodeURIComponent(location.pathname.split("/")[2] || "");
  const apiUrl = `/api/jobs/${encodeURIComponent(jobId)}`;
  const params = new URLSearchParams(location.search);
  const rawMode = params.has("events");
  const MAX_POINTS = 240;
  const shown = new Set();
  let job = null;
  let series = [];  // [at, progress, chunk]

  document.getElementById("job-json").href = apiUrl;
  const td = (label, props, ...children) => el("td", { ...(props || {}), dataset: { label } }, ...children);

  function field(list, name, value) {
    if (value === null || value === undefined || value === "") return;
    list.append(el("dt", {}, name), el("dd", {}, value));
  }

  function renderJob() {
    if (!job) return;
    document.title = `${job.name || job.id} · InfiniteTalk renders`;
    document.getElementById("job-name").textContent = job.name || job.id;
    document.getElementById("job-tiny").replaceChildren(tinyBadge(job.output) || "");
    const fields = document.getElementById("job-fields");
    fields.replaceChildren();
    const output = job.output || {};
    field(fields, "id", job.id);
    field(fields, "state", el("span", { className: `badge ${job.state}` }, job.state));
    field(fields, "waiting because", job.state === "waiting" ? job.waiting_reason : null);
    field(fields, "source", job.source);
    field(fields, "priority", String(job.priority ?? 0));
    field(fields, "attempts", job.attempts ? String(job.attempts) : null);
    field(fields, "created", timeEl(job.created_at));
    field(fields, "queued", job.queued_at ? timeEl(job.queued_at) : null);
    field(fields, "started", job.started_at ? timeEl(job.started_at) : null);
    field(fields, "finished", job.finished_at ? timeEl(job.finished_at) : null);
    field(fields, "next attempt", job.state === "retry_wait" && job.next_attempt_at ? timeEl(job.next_attempt_at) : null);
    field(fields, "queue wait", job.queue_wait_s != null ? duration(job.queue_wait_s) : null);
    field(fields, "render time", job.render_s != null ? duration(job.render_s) : null);
    field(fields, "video length", job.duration_s != null ? `${duration(job.duration_s)} (${job.frames ?? "?"} frames)` : null);
    field(fields, "resolution", resolution(output) ? `${resolution(output)}${output.fps ? ` at ${output.fps} fps` : ""}` : null);
    field(fields, "model", output.tiny ? "tiny random-weight test model" : null);
    field(fields, "GPU", output.gpu || output.device || null);
    field(fields, "duplicate of", job.duplicate_of ? el("a", { href: `/jobs/${job.duplicate_of}` }, job.duplicate_of) : null);
    field(fields, "renders again", job.rerender_of ? el("a", { href: `/jobs/${job.rerender_of}` }, job.rerender_of) : null);
    field(fields, "outputs deleted", job.deleted_at ? timeEl(job.deleted_at) : null);
    for (const [kind, name] of Object.entries(job.outputs || {})) field(fields, `${kind} file`, name);

    const sidecar = document.getElementById("job-sidecar");
    document.getElementById("job-sidecar-box").hidden = !job.urls.json;
    if (job.urls.json) sidecar.href = job.urls.json;

    const progress = document.getElementById("job-progress");
    progress.hidden = job.state !== "running";
    if (job.state === "running") {
      document.getElementById("job-bar").value = Math.max(0, Math.min(1, job.progress || 0));
      const left = eta(job);
      document.getElementById("job-progress-text").textContent = IT.daemonUp()
        ? `${progressText(job)} · elapsed ${duration(IT.serverNow() - job.started_at)} · ETA ${left === null ? "–" : duration(left)}`
        : `${progressText(job)} · not progressing: the daemon is down`;
    }

    const video = document.getElementById("job-video");
    const current = video.querySelector("video");
    if (job.urls.video && (!current || current.dataset.src !== job.urls.video)) {
      video.replaceChildren(
        el("video", { controls: true, preload: "metadata", playsInline: true, src: job.urls.video,
          poster: job.urls.poster || "", dataset: { src: job.urls.video }, ariaLabel: "the rendered video" }),
        el("p", {}, el("a", { href: job.urls.download, download: job.outputs.video || "" }, "Download MP4")));
    } else if (!job.urls.video) video.replaceChildren();

    const error = document.getElementById("job-error");
    error.hidden = !job.error_code && !job.error_message;
    error.textContent = `${job.error_code || "error"}: ${job.error_message || ""}` +
      (job.error_field ? ` (field or file: ${job.error_field})` : "");

    const failure = job.failure;
    const box = document.getElementById("failure");
    box.hidden = !failure || (!failure.traceback && !(failure.log_tail || []).length);
    if (!box.hidden) {
      document.getElementById("failure-meta").textContent =
        `stored with the failure of attempt ${failure.attempt ?? "?"}${failure.at ? `, ${when(failure.at)}` : ""}` +
        (failure.worker ? ` · worker ${[failure.worker.device, failure.worker.gpu, failure.worker.quant].filter(Boolean).join(", ")}` : "") +
        (job.state === "done" ? " (a later attempt succeeded)" : "");
      document.getElementById("failure-traceback").textContent = failure.traceback || "(no traceback: the worker process died)";
      document.getElementById("failure-log").textContent = (failure.log_tail || []).join("\n") || "(nothing logged)";
    }
    document.getElementById("job-settings").textContent = JSON.stringify(job.settings ?? {}, null, 2);
    renderChart();
  }

  // Progress over time as an SVG polyline (no inline styles: the CSP forbids them).
  function renderChart() {
    const box = document.getElementById("job-chart-box");
    box.hidden = series.length < 2;
    if (box.hidden) return;
    const ns = "http://www.w3.org/2000/svg";
    const W = 600, H = 120;
    const t0 = series[0][0], t1 = series[series.length - 1][0] || t0 + 1;
    const span = Math.max(1e-6, t1 - t0);
    const points = series.map(([at, p]) => `${((at - t0) / span * W).toFixed(1)},${(H - Math.max(0, Math.min(1, p || 0)) * H).toFixed(1)}`).join(" ");
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", `progress from 0 to ${Math.round((series[series.length - 1][1] || 0) * 100)}% over ${duration(span)}`);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points);
    line.setAttribute("class", "line");
    svg.append(line);
    document.getElementById("job-chart").replaceChildren(svg);
    document.getElementById("job-chart-caption").textContent =
      `progress over time: ${clock(t0)} – ${clock(t1)} (${duration(span)}), ${series.length} points`;
  }

  function addPoint(event) {
    const d = event.data || {};
    if (typeof d.progress !== "number") return;
    series.push([event.at, d.progress, d.chunk]);
    if (series.length > MAX_POINTS) series = series.filter((_, i) => i % 2 === 0 || i === series.length - 1);
  }

  function eventRow(event) {
    const data = event.data && typeof event.data === "object"
      ? Object.entries(event.data).filter(([k]) => k !== "traceback")
        .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ")
      : (event.data ?? "");
    return el("tr", { dataset: { id: event.id } }, td("#", {}, String(event.id)), td("time", {}, timeEl(event.at)),
      td("event", {}, el("span", { className: `badge ${event.kind}` }, event.kind)), td("details", { className: "meta" }, data));
  }

  function addTimeline(event) {
    if (shown.has(event.id)) return;
    shown.add(event.id);
    const body = document.getElementById("timeline");
    const after = [...body.children].find((r) => Number(r.dataset.id) > event.id);
    body.insertBefore(eventRow(event), after || null);
  }

  function renderAttempts(attempts) {
    const box = document.getElementById("attempts");
    box.hidden = !attempts || attempts.length === 0;
    if (box.hidden) return;
    document.getElementById("attempts-list").replaceChildren(...attempts.map((a) => el("tr", {},
      td("#", {}, String(a.attempt)), td("started", {}, timeEl(a.started_at)), td("ended", {}, a.ended_at ? timeEl(a.ended_at) : "–"),
      td("outcome", {}, el("span", { className: `badge ${a.outcome}` }, a.outcome)),
      td("error", { className: "message" }, [a.error_code, a.error_message].filter(Boolean).join(": ")))));
  }

  function renderStages(timings) {
    const box = document.getElementById("stages");
    const entries = Object.entries(timings || {}).filter(([, v]) => typeof v === "number");
    box.hidden = entries.length === 0;
    document.getElementById("stages-list").replaceChildren(...entries.map(([k, v]) =>
      el("tr", {}, td("stage", {}, k.replaceAll("_", " ")), td("seconds", {}, `${v.toFixed(2)} s (${duration(v)})`))));
  }

  async function loadRaw() {
    document.getElementById("raw").hidden = false;
    document.getElementById("timeline-box").hidden = true;
    const after = params.get("after") || "0";
    const response = await fetch(`${apiUrl}/events?after=${encodeURIComponent(after)}&limit=100`);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) { document.getElementById("raw-note").textContent = body.error || `HTTP ${response.status}`; return; }
    const events = body.events || [];
    document.getElementById("history").replaceChildren(...events.map(eventRow));
    document.getElementById("raw-note").textContent = events.length
      ? `events ${events[0].id} – ${events[events.length - 1].id} of this job's ${body.events_total}, 100 per page`
      : `no events after #${after}`;
    const next = document.getElementById("raw-next");
    next.hidden = !body.next;
    if (body.next) next.href = `?events=1&after=${events[events.length - 1].id}`;
    document.getElementById("raw-first").hidden = after === "0";
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
    IT.setHeartbeat(body.heartbeat);
    job = body.job;
    const summary = body.summary || {};
    series = (summary.series || []).slice();
    for (const event of summary.timeline || []) addTimeline(event);
    renderAttempts(summary.attempts);
    renderStages(summary.timings_s);
    const hidden = (summary.events_total || 0) - (summary.timeline || []).length;
    document.getElementById("timeline-note").textContent = hidden > 0
      ? `${summary.events_total} events in all; ${summary.progress_events} progress events are summarised by the chart above.`
      : "";
    document.getElementById("raw-link").textContent = `All ${summary.events_total ?? ""} raw events`;
    renderJob();
    if (rawMode) await loadRaw();
    document.body.dataset.ready = "1";
  }

  IT.watchDaemon(() => renderJob());
  IT.listen({
    snapshot() { load(); },
    event(frame) {
      if (frame.event.job_id !== jobId) return;
      if (frame.job) job = { ...frame.job, failure: job ? job.failure : null };
      if (frame.event.kind === "progress") addPoint(frame.event);
      else {
        addTimeline(frame.event);
        // a change of state (the kinds from the server: common.js `vocabulary`) changes the summary
        if (Object.values(IT.vocabulary.stateEvents).includes(frame.event.kind)) load();
      }
      renderJob();
    },
  });
  setInterval(() => { if (job && job.state === "running") renderJob(); }, 1000);
})();
