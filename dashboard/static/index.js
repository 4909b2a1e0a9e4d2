// The live overview: counts, rendering jobs, workers, queue, waiting jobs, finished videos, failures.
"use strict";

(() => {
  const { el, duration, clock, ago, when, timeEl, progressText, eta, settingsSummary, sync, resolution, tinyBadge } = IT;
  const states = IT.vocabulary;  // the states and their groups, from the server (common.js `learn`)
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
  // Cells carry their column's name, shown before the value when a narrow screen stacks them.
  const td = (label, props, ...children) => el("td", { ...(props || {}), dataset: { label } }, ...children);

  function renderCounts() {
    const list = document.getElementById("counts");
    const items = states.states.map((s) => ({ state: s, n: counts[s] || 0 }));
    sync(list, items, (i) => i.state,
      (i) => el("li", { dataset: { state: i.state } }, el("a", { href: `/?state=${i.state}#browse`, title: `list the ${LABELS[i.state] || i.state} jobs` },
        el("span", { className: "n" }), el("span", { className: "label" }, LABELS[i.state] || i.state))),
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
        const live = IT.daemonUp();
        node.classList.toggle("stale", !live);
        node.querySelector("h3").replaceChildren(jobLink(job));
        node.querySelector("progress").value = Math.max(0, Math.min(1, job.progress || 0));
        node.querySelector(".progress-text").textContent = progressText(job);
        const left = eta(job);
        const attempt = job.attempts > 1 ? ` · attempt ${job.attempts}` : "";
        node.querySelector(".times").textContent = live
          ? `elapsed ${duration(IT.serverNow() - job.started_at)} · ETA ${left === null ? "–" : duration(left)}${attempt}`
          : `not progressing: the daemon is down · started ${when(job.started_at)}${attempt}`;
      });
  }

  function renderQueue() {
    const items = byState("queued", "retry_wait").sort((a, b) =>
      (a.state === "retry_wait") - (b.state === "retry_wait") || (b.priority || 0) - (a.priority || 0) || (a.seq || 0) - (b.seq || 0));
    toggleEmpty("queue", items.length === 0);
    let position = 0;
    sync(document.getElementById("queue-list"), items, (j) => j.id,
      () => el("tr", {}, td("#", { className: "pos" }), td("job"), td("priority"), td("queued"), td("settings", { className: "meta" })),
      (row, job) => {
        const cells = row.children;
        cells[0].textContent = job.state === "retry_wait" ? "retry" : String(++position);
        cells[1].replaceChildren(jobLink(job));
        cells[2].textContent = job.priority || 0;
        cells[3].textContent = job.state === "retry_wait"
          ? `retry ${job.attempts || 0} at ${clock(job.next_attempt_at)}` : when(job.queued_at || job.created_at);
        cells[4].textContent = settingsSummary(job.settings);
      });
  }

  // One row per render worker of the daemon's heartbeat: the node (host; a Ray actor: host and
  // node id) it runs on, its device, its state and the job it renders. None while the daemon is down.
  function renderWorkers() {
    const beat = IT.heartbeat();
    const items = beat && beat.up ? (beat.workers || []) : [];
    toggleEmpty("workers", items.length === 0);
    sync(document.getElementById("workers-list"), items, (w) => String(w.index),
      () => el("tr", {}, td("worker"), td("node", { className: "node" }), td("device"), td("state"), td("job")),
      (row, w) => {
        const c = row.children;
        const state = w.state || (w.model_loaded ? "idle" : "loading");
        c[0].textContent = String(w.index);
        c[1].textContent = w.node || "?";
        c[2].textContent = w.device || "?";
        c[3].replaceChildren(el("span", { className: `badge worker-${state}` }, state));
        c[4].replaceChildren(...(w.jobs || []).flatMap((id, i) => {
          const job = jobs.get(id);
          const link = job ? jobLink(job) : el("span", { className: "code" }, id);
          return i ? [", ", link] : [link];
        }));
      });
  }

  function renderWaiting() {
    const items = byState("waiting").sort((a, b) => (a.seq || 0) - (b.seq || 0));
    toggleEmpty("waiting", items.length === 0);
    sync(document.getElementById("waiting-list"), items, (j) => j.id,
      () => el("tr", {}, td("job"), td("why", { className: "reason" }), td("seen", { className: "meta" })),
      (row, job) => {
        row.children[0].replaceChildren(jobLink(job));
        row.children[1].textContent = job.waiting_reason || "waiting";
        row.children[2].textContent = when(job.created_at);
      });
  }

  function videoCard(job) {
    const media = el("div", { className: "media" });
    return el("article", { className: "card video-card" }, media, el("h3", {}),
      el("p", { className: "meta facts" }), el("p", { className: "meta settings" }), el("p", { className: "actions" }));
  }

  // Videos never preload (preload=none); the posters of tiles below the first screenful are
  // fetched only when the tile comes near the viewport.
  const EAGER_POSTERS = 12;
  const posterObserver = "IntersectionObserver" in window ? new IntersectionObserver((entries) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      const video = entry.target;
      if (video.dataset.poster) { video.poster = video.dataset.poster; delete video.dataset.poster; }
      posterObserver.unobserve(video);
    }
  }, { rootMargin: "400px" }) : null;

  function updateVideoCard(node, job, index) {
    const media = node.querySelector(".media");
    const src = job.urls.video;
    const current = media.querySelector("video");
    if (src && (!current || current.dataset.src !== src)) {
      const lazy = posterObserver && index >= EAGER_POSTERS && job.urls.poster;
      const video = el("video", { controls: true, preload: "none", playsInline: true, src,
        poster: lazy ? null : (job.urls.poster || ""),
        dataset: { src, job: job.id, ...(lazy ? { poster: job.urls.poster } : {}) },
        ariaLabel: `video of ${job.name || job.id}` });
      media.replaceChildren(video);
      if (lazy) posterObserver.observe(video);
    } else if (!src) {
      media.replaceChildren(el("div", { className: "gone" }, job.deleted_at ? "outputs deleted" : "no video"));
    }
    node.querySelector("h3").replaceChildren(jobLink(job), tinyBadge(job.output) ? " " : "", tinyBadge(job.output) || "");
    const res = resolution(job.output);
    node.querySelector(".facts").textContent =
      `${duration(job.duration_s)} video${res ? ` · ${res}` : ""} · rendered in ${duration(job.render_s)} · ${when(job.finished_at)}`;
    node.querySelector(".settings").textContent = settingsSummary(job.settings, job.output);
    node.querySelector(".actions").replaceChildren(
      job.urls.download ? el("a", { href: job.urls.download, download: job.outputs.video || "" }, "Download MP4") : "",
      job.urls.download ? " · " : "", el("a", { href: job.urls.page }, "details"));
  }

  function renderFinished() {
    const items = byState("done").sort((a, b) => (b.finished_at || 0) - (a.finished_at || 0)).slice(0, DONE_SHOWN);
    toggleEmpty("finished", items.length === 0);
    const index = new Map(items.map((j, i) => [j.id, i]));
    sync(document.getElementById("finished-list"), items, (j) => j.id, videoCard,
      (node, job) => updateVideoCard(node, job, index.get(job.id)));
  }

  function renderProblems() {
    const items = byState(...states.problem)
      .sort((a, b) => (b.finished_at || b.created_at || 0) - (a.finished_at || a.created_at || 0)).slice(0, PROBLEMS_SHOWN);
    toggleEmpty("problems", items.length === 0);
    sync(document.getElementById("problems-list"), items, (j) => j.id,
      () => el("tr", {}, td("job"), td("state"), td("error", { className: "code" }), td("message", { className: "message" }), td("when", { className: "meta" })),
      (row, job) => {
        const c = row.children;
        c[0].replaceChildren(jobLink(job));
        c[1].replaceChildren(el("span", { className: `badge ${job.state}` }, job.state));
        c[2].textContent = job.error_code || "";
        c[3].textContent = (job.error_message || "") + (job.error_field ? ` (${job.error_field})` : "");
        c[4].replaceChildren(timeEl(job.finished_at || job.created_at));
      });
  }

  function renderDaemon() {
    const node = document.getElementById("daemon");
    const message = daemon && daemon.data && daemon.data.message;
    node.textContent = message ? `daemon ${message} · ${when(daemon.at)}` : "";
    node.dataset.state = message === "stopped" ? "stopped" : "up";
  }

  // Forget finished jobs that are no longer shown, so a page left open for weeks stays small.
  function prune() {
    if (jobs.size <= 4 * (DONE_SHOWN + PROBLEMS_SHOWN)) return;
    const keep = new Set([
      ...byState(...states.active),
      ...byState("done").sort((a, b) => (b.finished_at || 0) - (a.finished_at || 0)).slice(0, DONE_SHOWN),
      ...byState(...states.problem)
        .sort((a, b) => (b.finished_at || b.created_at || 0) - (a.finished_at || a.created_at || 0)).slice(0, PROBLEMS_SHOWN),
    ].map((j) => j.id));
    for (const id of [...jobs.keys()]) if (!keep.has(id)) jobs.delete(id);
  }

  function render() {
    prune();
    renderDaemon();
    renderCounts();
    renderRunning();
    renderWorkers();
    renderQueue();
    renderWaiting();
    renderFinished();
    renderProblems();
    document.body.dataset.ready = "1";
  }

  // ---------------------------------------------------------------- all jobs: search, filter, pages
  // The view is in the URL (?q=&state=&before=), so it can be linked and the back button works.
  const params = new URLSearchParams(location.search);
  const view = { q: params.get("q") || "", state: params.get("state") || "", before: params.get("before") || "" };
  document.getElementById("q").value = view.q;
  document.getElementById("state").value = view.state;
  // The drop-down offers the states the server names (IT.vocabulary), filled once they are known.
  function fillStateMenu() {
    const menu = document.getElementById("state");
    if (menu.options.length > 1 || !states.states.length) return;
    menu.append(...states.states.map((s) => el("option", { value: s }, LABELS[s] || s)));
    menu.value = view.state;
  }
  let browseDirty = true, browseBusy = false;
  // The CSP allows no form submission (form-action 'none'): the form becomes a plain navigation.
  document.getElementById("search").addEventListener("submit", (e) => {
    e.preventDefault();
    const p = new URLSearchParams();
    const q = document.getElementById("q").value.trim(), state = document.getElementById("state").value;
    if (q) p.set("q", q);
    if (state) p.set("state", state);
    location.assign(p.toString() ? `/?${p}#browse` : "/#browse");
  });

  const pageUrl = (extra) => {
    const p = new URLSearchParams();
    if (view.q) p.set("q", view.q);
    if (view.state) p.set("state", view.state);
    for (const [k, v] of Object.entries(extra || {})) if (v) p.set(k, v);
    const text = p.toString();
    return text ? `/?${text}#browse` : "/#browse";
  };

  function resultText(job) {
    if (job.state === "done") return `${duration(job.duration_s)} video${resolution(job.output) ? ` · ${resolution(job.output)}` : ""}`;
    if (job.error_code || job.error_message) return `${job.error_code || ""} ${job.error_message || ""}`.trim();
    if (job.state === "running") return progressText(job);
    if (job.state === "waiting") return job.waiting_reason || "waiting";
    return settingsSummary(job.settings);
  }

  async function loadBrowse() {
    if (browseBusy) return;
    browseBusy = true; browseDirty = false;
    try {
      const p = new URLSearchParams({ limit: "50" });
      if (view.q) p.set("q", view.q);
      if (view.state) p.set("state", view.state);
      if (view.before) p.set("before", view.before);
      const response = await fetch(`/api/jobs?${p}`, { headers: { Accept: "application/json" } });
      const body = await response.json().catch(() => ({}));
      IT.learn(body);
      fillStateMenu();
      const section = document.getElementById("browse");
      const summary = document.getElementById("browse-summary");
      if (!response.ok) { summary.textContent = body.error || `HTTP ${response.status}`; return; }
      const items = body.jobs || [];
      section.querySelector(".empty").hidden = items.length !== 0;
      section.querySelector("table").hidden = items.length === 0;
      const total = view.state ? (body.counts || {})[view.state] : Object.values(body.counts || {}).reduce((a, b) => a + b, 0);
      summary.textContent = `${items.length ? `${items.length} shown` : "none shown"}` +
        (view.q ? ` matching “${view.q}”` : "") + (total !== undefined && !view.q ? ` of ${total}` : "") +
        (view.state ? ` (${view.state})` : "") + (view.before ? " · older page" : " · newest first");
      sync(document.getElementById("browse-list"), items, (j) => j.id,
        () => el("tr", {}, td("job"), td("state"), td("created", { className: "meta" }), td("result", { className: "message" })),
        (row, job) => {
          const c = row.children;
          c[0].replaceChildren(jobLink(job), tinyBadge(job.output) ? " " : "", tinyBadge(job.output) || "");
          c[1].replaceChildren(el("span", { className: `badge ${job.state}` }, job.state));
          c[2].replaceChildren(timeEl(job.created_at));
          c[3].textContent = resultText(job);
        });
      const next = document.getElementById("browse-next");
      const first = document.getElementById("browse-first");
      next.hidden = !(body.page && body.page.next_before);
      if (!next.hidden) next.href = pageUrl({ before: String(body.page.next_before) });
      first.hidden = !view.before;
      first.href = pageUrl();
    } finally { browseBusy = false; }
  }
  // Refresh the first page when jobs change, at most every 3 s; older pages stay as they are.
  setInterval(() => { if (browseDirty && !view.before) loadBrowse(); }, 3000);
  IT.watchDaemon(() => { renderRunning(); renderWorkers(); });

  IT.listen({
    snapshot(body) {
      fillStateMenu();
      IT.setHeartbeat(body.heartbeat);
      browseDirty = true;
      if (!document.body.dataset.browsed) { document.body.dataset.browsed = "1"; loadBrowse(); }
      jobs.clear();
      for (const job of body.jobs) jobs.set(job.id, job);
      counts = body.counts || {};
      daemon = body.daemon;
      schedule();
    },
    event(frame) {
      if (frame.event.kind !== "progress") browseDirty = true;
      if (frame.event.kind === "daemon") daemon = frame.event;
      if (frame.job) jobs.set(frame.job.id, frame.job);
      else if (frame.event.job_id) jobs.delete(frame.event.job_id);
      if (frame.counts) counts = frame.counts;
      schedule();
    },
    ledger(info) {
      fillStateMenu();
      if (info.available === false) { jobs.clear(); counts = {}; daemon = null; schedule(); }
    },
  });
  // Elapsed times, ETAs and "queued … ago" move every second without new events.
  setInterval(() => { renderRunning(); renderQueue(); renderWaiting(); }, 1000);
  render();
})();
