// Shared helpers for the dashboard pages: DOM building (text only, never HTML strings),
// formatting, keyed list updates, and the /events connection.
"use strict";

const IT = (() => {
  // Server clock minus browser clock, in seconds; every frame carries the server's `now`.
  let skew = 0;
  const serverNow = () => Date.now() / 1000 + skew;
  const setServerNow = (now) => { if (typeof now === "number") skew = now - Date.now() / 1000; };

  // el("a", {href: "/x", className: "y"}, "text", child) -> element; strings become text nodes.
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined) continue;
      if (key === "dataset") Object.assign(node.dataset, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    const s = Math.max(0, Math.round(seconds));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    const pad = (n) => String(n).padStart(2, "0");
    return h ? `${h}:${pad(m)}:${pad(sec)}` : `${m}:${pad(sec)}`;
  }

  function clock(unix) {
    if (!unix) return "–";
    const d = new Date(unix * 1000);
    const today = new Date().toDateString() === d.toDateString();
    return today ? d.toLocaleTimeString() : d.toLocaleString();
  }

  function ago(unix) {
    if (!unix) return "–";
    return `${duration(serverNow() - unix)} ago`;
  }

  const percent = (p) => `${Math.round(Math.max(0, Math.min(1, p || 0)) * 100)}%`;

  // "chunk 2/5 · step 3/4 · decode" from the ledger's progress columns.
  function progressText(job) {
    const parts = [];
    if (job.num_chunks) parts.push(`chunk ${(job.chunk ?? 0)}/${job.num_chunks}`);
    if (job.num_steps) parts.push(`step ${(job.step ?? 0)}/${job.num_steps}`);
    if (job.stage) parts.push(job.stage);
    parts.push(percent(job.progress));
    return parts.join(" · ");
  }

  // Seconds left: elapsed * (1 - p) / p, with elapsed counted on the server's clock.
  function eta(job) {
    const p = job.progress || 0;
    if (job.state !== "running" || !job.started_at || p <= 0) return null;
    const elapsed = Math.max(0, serverNow() - job.started_at);
    return elapsed * (1 - Math.min(p, 1)) / p;
  }

  const SUMMARY_KEYS = [
    ["size", (v) => String(v).replace("infinitetalk-", "") + "p"],
    ["mode", String],
    ["sample_steps", (v) => `${v} steps`],
    ["seed", (v) => `seed ${v}`],
    ["sample_audio_guide_scale", (v) => `audio cfg ${v}`],
    ["sample_text_guide_scale", (v) => `text cfg ${v}`],
    ["sample_shift", (v) => `shift ${v}`],
    ["max_frame_num", (v) => `max ${v} frames`],
  ];

  function settingsSummary(settings) {
    if (!settings || typeof settings !== "object") return "";
    const parts = SUMMARY_KEYS.filter(([k]) => settings[k] !== undefined && settings[k] !== null)
      .map(([k, f]) => f(settings[k]));
    const speakers = settings.cond_audio && typeof settings.cond_audio === "object" ? Object.keys(settings.cond_audio).length : 0;
    if (speakers > 1) parts.push(`${speakers} speakers (${settings.audio_type || "?"})`);
    return parts.join(" · ");
  }

  // Make `container`'s children match `items` (keyed by `key(item)`), reusing nodes so that
  // playing videos and open details survive updates; nodes are moved only when out of place.
  function sync(container, items, key, create, update) {
    const existing = new Map();
    for (const child of Array.from(container.children)) existing.set(child.dataset.key, child);
    let previous = null;
    for (const item of items) {
      const k = String(key(item));
      let node = existing.get(k);
      if (node) existing.delete(k);
      else { node = create(item); node.dataset.key = k; }
      update(node, item);
      const wanted = previous ? previous.nextSibling : container.firstChild;
      if (node !== wanted) container.insertBefore(node, wanted);
      previous = node;
    }
    for (const node of existing.values()) node.remove();
  }

  function showLedgerNote(info) {
    const note = document.getElementById("ledger-note");
    if (!note) return;
    if (!info || info.available !== false) { note.hidden = true; return; }
    note.textContent = `The ledger (${info.path}) cannot be read: ${info.reason}. ` +
      "The daemon may be stopped or has not run yet; this page carries on by itself when it returns.";
    note.hidden = false;
  }

  function setConn(state, text) {
    const conn = document.getElementById("conn");
    if (!conn) return;
    conn.dataset.state = state;
    conn.textContent = text;
  }

  const EVENT_KINDS = ["created", "waiting", "queued", "started", "progress", "retry", "done", "failed",
    "rejected", "cancelled", "deleted", "daemon", "event"];

  // One EventSource for the page. handlers: snapshot(body), event(frame), ledger(info).
  // The browser reconnects by itself and sends Last-Event-ID, so nothing is missed.
  function listen(handlers) {
    const source = new EventSource("/events");
    const parse = (message) => {
      const data = JSON.parse(message.data);
      setServerNow(data.now);
      return data;
    };
    source.onopen = () => setConn("live", "live");
    source.onerror = () => setConn("offline", source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…");
    source.addEventListener("snapshot", (m) => {
      const body = parse(m);
      showLedgerNote(body.ledger);
      handlers.snapshot(body);
    });
    source.addEventListener("ledger", (m) => {
      const info = parse(m);
      showLedgerNote(info);
      if (handlers.ledger) handlers.ledger(info);
    });
    for (const kind of EVENT_KINDS) source.addEventListener(kind, (m) => handlers.event(parse(m)));
    return source;
  }

  return { el, duration, clock, ago, percent, progressText, eta, settingsSummary, sync, listen,
    serverNow, setServerNow, showLedgerNote };
})();
