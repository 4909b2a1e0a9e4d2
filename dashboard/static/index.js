// The live overview: counts, rendering jobs, queue, waiting jobs, finished videos, failures.
"use strict";

(() => {
  const { el, duration, clock, ago, progressText, eta, settingsSummary, sync } = IT;
  const STATES = ["waiting", "queued", "running", "retry_wait", "done", "failed", "rejected", "cancelled"];
  const LABELS = { retry_wait: "retry wait" };
  const DONE_SHOWN = 48, PROBLEMS_SHOWN = 50;

  const jobs = new Map();
  let counts = {};
  let daemon = null;  // the newest `daemon` ledger event: started, stopped, config reloaded
  let scheduled = false;

  function schedule() {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => { scheduled = false; render(); });
  }

  const byState = (...states) => [...jobs.values()].filter((j) => states.includes(j.state));
  const jobLink = (job) => el("a", { href: job.urls.page, className: "job-name" }, job.name || job.id);

  function renderCounts() {
    const list = document.getElementById("counts");
    const items = STATES.map((s) => ({ state: s, n: counts[s] || 0 }));
    sync(list, items, (i) => i.state,
      (i) => el("li", { dataset: { state: i.state } }, el("span", { className: "n" }), el("span", { className: "label" }, LABELS[i.state] || i.state)),
      (node, i) => { node.querySelector(".n").textContent = i.n; node.classList.toggle("zero", i.n === 0); });
  }

  function toggleEmpty(sectionId, empty) {
    const section = document.getElementById(sectionId);
    section.querySelector(".empty").hidden = !empty;
    const table = section.querySelector("table");
    if (table) table.hidden = empty;
  }

  function renderRunning() {
    const items = byState("running").sort((a, b) => (a.started_at || 0) - (b.started_at || 0));
    toggleEmpty("running", items.length === 0);
    sync(document.getElementById("running-list"), items, (j) => j.id,
      () => el("article", { className: "card running-card" },
        el("h3", {}), el("progress", { max: 1, value: 0 }),
        el("p", { className: "progress-text" }), el("p", { className: "times meta" })),
      (node, job) => {
        node.querySelector("h3").replaceChildren(jobLink(job));
        node.querySelector("progress").value = Math.max(0, Math.min(1, job.progress || 0));
        node.querySelector(".progress-text").textContent = progressText(job);
        const left = eta(job);
        const attempt = job.attempts > 1 ? ` · attempt ${job.attempts}` : "";
        node.querySelector(".times").textContent =
          `elapsed ${duration(IT.serverNow() - job.started_at)} · ETA ${left === null ? "–" : duration(left)}${attempt}`;
      });
  }

  function renderQueue() {
    const items = byState("queued", "retry_wait").sort((a, b) =>
      (a.state === "retry_wait") - (b.state === "retry_wait") || (b.priority || 0) - (a.priority || 0) || (a.seq || 0) - (b.seq || 0));
    toggleEmpty("queue", items.length === 0);
    let position = 0;
    sync(document.getElementById("queue-list"), items, (j) => j.id,
      () => el("tr", {}, el("td", { className: "pos" }), el("td"), el("td"), el("td"), el("td", { className: "meta" })),
      (row, job) => {
        const cells = row.children;
        cells[0].textContent = job.state === "retry_wait" ? "retry" : String(++position);
        cells[1].replaceChildren(jobLink(job));
        cells[2].textContent = job.priority || 0;
        cells[3].textContent = job.state === "retry_wait"
          ? `retry ${job.attempts || 0} at ${clock(job.next_attempt_at)}` : ago(job.queued_at || job.created_at);
        cells[4].textContent = settingsSummary(job.settings);
      });
  }

  function renderWaiting() {
    const items = byState("waiting").sort((a, b) => (a.seq || 0) - (b.seq || 0));
    toggleEmpty("waiting", items.length === 0);
    sync(document.getElementById("waiting-list"), items, (j) => j.id,
      () => el("tr", {}, el("td"), el("td", { className: "reason" }), el("td", { className: "meta" })),
      (row, job) => {
        row.children[0].replaceChildren(jobLink(job));
        row.children[1].textContent = job.waiting_reason || "waiting";
        row.children[2].textContent = ago(job.created_at);
      });
  }

  function videoCard(job) {
    const media = el("div", { className: "media" });
    return el("article", { className: "card video-card" }, media, el("h3", {}),
      el("p", { className: "meta facts" }), el("p", { className: "meta settings" }), el("p", { className: "actions" }));
  }

  function updateVideoCard(node, job) {
    const media = node.querySelector(".media");
    const src = job.urls.video;
    const current = media.querySelector("video");
    if (src && (!current || current.dataset.src !== src)) {
      media.replaceChildren(el("video", { controls: true, preload: "none", playsInline: true, src,
        poster: job.urls.poster || "", dataset: { src, job: job.id } }));
    } else if (!src) {
      media.replaceChildren(el("div", { className: "gone" }, job.deleted_at ? "outputs deleted" : "no video"));
    }
    node.querySelector("h3").replaceChildren(jobLink(job));
    node.querySelector(".facts").textContent =
      `${duration(job.duration_s)} video · rendered in ${duration(job.render_s)} · ${clock(job.finished_at)}`;
    node.querySelector(".settings").textContent = settingsSummary(job.settings);
    node.querySelector(".actions").replaceChildren(
      job.urls.download ? el("a", { href: job.urls.download, download: job.outputs.video || "" }, "Download MP4") : "",
      job.urls.download ? " · " : "", el("a", { href: job.urls.page }, "details"));
  }

  function renderFinished() {
    const items = byState("done").sort((a, b) => (b.finished_at || 0) - (a.finished_at || 0)).slice(0, DONE_SHOWN);
    toggleEmpty("finished", items.length === 0);
    sync(document.getElementById("finished-list"), items, (j) => j.id, videoCard, updateVideoCard);
  }

  function renderProblems() {
    const items = byState("failed", "rejected", "cancelled")
      .sort((a, b) => (b.finished_at || b.created_at || 0) - (a.finished_at || a.created_at || 0)).slice(0, PROBLEMS_SHOWN);
    toggleEmpty("problems", items.length === 0);
    sync(document.getElementById("problems-list"), items, (j) => j.id,
      () => el("tr", {}, el("td"), el("td"), el("td", { className: "code" }), el("td", { className: "message" }), el("td", { className: "meta" })),
      (row, job) => {
        const c = row.children;
        c[0].replaceChildren(jobLink(job));
        c[1].replaceChildren(el("span", { className: `badge ${job.state}` }, job.state));
        c[2].textContent = job.error_code || "";
        c[3].textContent = (job.error_message || "") + (job.error_field ? ` (${job.error_field})` : "");
        c[4].textContent = clock(job.finished_at || job.created_at);
      });
  }

  function renderDaemon() {
    const node = document.getElementById("daemon");
    const message = daemon && daemon.data && daemon.data.message;
    node.textContent = message ? `daemon ${message} · ${clock(daemon.at)}` : "";
    node.dataset.state = message === "stopped" ? "stopped" : "up";
  }

  // Forget finished jobs that are no longer shown, so a page left open for weeks stays small.
  function prune() {
    if (jobs.size <= 4 * (DONE_SHOWN + PROBLEMS_SHOWN)) return;
    const keep = new Set([
      ...byState("waiting", "queued", "running", "retry_wait"),
      ...byState("done").sort((a, b) => (b.finished_at || 0) - (a.finished_at || 0)).slice(0, DONE_SHOWN),
      ...byState("failed", "rejected", "cancelled")
        .sort((a, b) => (b.finished_at || b.created_at || 0) - (a.finished_at || a.created_at || 0)).slice(0, PROBLEMS_SHOWN),
    ].map((j) => j.id));
    for (const id of [...jobs.keys()]) if (!keep.has(id)) jobs.delete(id);
  }

  function render() {
    prune();
    renderDaemon();
    renderCounts();
    renderRunning();
    renderQueue();
    renderWaiting();
    renderFinished();
    renderProblems();
    document.body.dataset.ready = "1";
  }

  IT.listen({
    snapshot(body) {
      jobs.clear();
      for (const job of body.jobs) jobs.set(job.id, job);
      counts = body.counts || {};
      daemon = body.daemon;
      schedule();
    },
    event(frame) {
      if (frame.event.kind === "daemon") daemon = frame.event;
      if (frame.job) jobs.set(frame.job.id, frame.job);
      else if (frame.event.job_id) jobs.delete(frame.event.job_id);
      if (frame.counts) counts = frame.counts;
      schedule();
    },
    ledger(info) {
      if (info.available === false) { jobs.clear(); counts = {}; daemon = null; schedule(); }
    },
  });
  // Elapsed times, ETAs and "queued … ago" move every second without new events.
  setInterval(() => { renderRunning(); renderQueue(); renderWaiting(); }, 1000);
  render();
})();
