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
    return relative(unix);
  }

  // "just now", "42 s ago", "5 min ago", "3 h ago", "2 days ago", "in 5 min" (server clock).
  function relative(unix) {
    if (!unix) return "–";
    const delta = serverNow() - unix, s = Math.abs(delta);
    let text;
    if (s < 5) return "just now";
    if (s < 60) text = `${Math.round(s)} s`;
    else if (s < 3600) text = `${Math.round(s / 60)} min`;
    else if (s < 86400) text = `${Math.round(s / 360) / 10} h`;
    else text = `${Math.round(s / 8640) / 10} days`;
    return delta >= 0 ? `${text} ago` : `in ${text}`;
  }

  // The full local date and time with the time zone, for titles and absolute displays.
  function absolute(unix) {
    if (!unix) return "–";
    return new Date(unix * 1000).toLocaleString(undefined, {
      year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
      timeZoneName: "short" });
  }

  // "5 min ago (14:03:22)": relative and absolute in the browser's time zone.
  const when = (unix) => (unix ? `${relative(unix)} (${clock(unix)})` : "–");

  // A <time> element showing `when`, with the full date, time and zone as its title.
  function timeEl(unix) {
    if (!unix) return el("span", {}, "–");
    return el("time", { dateTime: new Date(unix * 1000).toISOString(), title: absolute(unix) }, when(unix));
  }

  function resolution(output) {
    return output && output.width && output.height ? `${output.width}×${output.height}` : "";
  }

  function tinyBadge(output) {
    return output && output.tiny
      ? el("span", { className: "badge tiny", title: "rendered with the tiny random-weight test model: not a real video" }, "tiny model")
      : null;
  }

  // The daemon's heartbeat, polled every 5 s: the "daemon down since …" and tiny-model banners.
  // onChange(heartbeat) is called after each poll; IT.daemonUp() says what the last one found.
  let beat = null;
  // No heartbeat row at all ("unknown": a ledger no daemon of this version has written) is not
  // shown as down; a row that stopped being rewritten is.
  const daemonUp = () => !beat || beat.up || beat.state === "unknown";
  function renderBanners() {
    const down = document.getElementById("daemon-banner");
    if (down) {
      const gone = !daemonUp();
      down.hidden = !gone;
      if (gone) {
        down.textContent = beat.state === "stopped"
          ? `The daemon stopped ${when(beat.at)}. Nothing renders until it is started again.`
          : `Daemon down since ${when(beat.at)} (no heartbeat for ${duration(serverNow() - beat.at)}): jobs shown as rendering are not progressing.`;
      }
    }
    const tiny = document.getElementById("tiny-banner");
    if (tiny) tiny.hidden = !(beat && beat.up && beat.tiny);
  }
  function watchDaemon(onChange) {
    const poll = async () => {
      try {
        const response = await fetch("/api/daemon", { headers: { Accept: "application/json" } });
        if (response.ok) {
          const body = await response.json();
          setServerNow(body.now);
          beat = body.heartbeat;
        }
      } catch (e) { /* the dashboard itself is unreachable: the connection pill says so */ }
      renderBanners();
      if (onChange) onChange(beat);
    };
    poll();
    setInterval(poll, 5000);
  }
  function setHeartbeat(value) { if (value !== undefined) { beat = value; renderBanners(); } }
  const heartbeat = () => beat;

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

  // `output` (the sidecar's facts): its real resolution replaces the requested size bucket.
  function settingsSummary(settings, output) {
    if (!settings || typeof settings !== "object") return "";
    const real = resolution(output);
    const parts = SUMMARY_KEYS.filter(([k]) => settings[k] !== undefined && settings[k] !== null && !(real && k === "size"))
      .map(([k, f]) => f(settings[k]));
    if (real) parts.unshift(real);
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

  // The job states (in listing order), the groups shown together, the ledger's event kinds and
  // the kinds that change a job's state (stateEvents: state -> kind) come from the server
  // (daemon/states.py), in every /api/jobs body, snapshot and ledger note.
  const vocabulary = { states: [], active: [], problem: [], eventKinds: [], stateEvents: {} };
  function learn(body) {
    if (!body || !Array.isArray(body.states)) return;
    const groups = body.state_groups || {};
    Object.assign(vocabulary, { states: body.states, active: groups.active || [], problem: groups.problem || [],
      eventKinds: body.event_kinds || [], stateEvents: body.state_events || {} });
  }

  // One EventSource for the page. handlers: snapshot(body), event(frame), ledger(info).
  // The browser reconnects by itself and sends Last-Event-ID, so nothing is missed. Each ledger
  // event is a frame named by its kind ("event" when it has none: dashboard/sse.py); the kinds are
  // listened to as soon as a snapshot or ledger note names them, before any later frame arrives.
  function listen(handlers) {
    const source = new EventSource("/events");
    const parse = (message) => {
      const data = JSON.parse(message.data);
      setServerNow(data.now);
      return data;
    };
    const listening = new Set();
    const listenTo = (kinds) => {
      for (const kind of kinds) {
        if (listening.has(kind)) continue;
        listening.add(kind);
        source.addEventListener(kind, (m) => handlers.event(parse(m)));
      }
    };
    const known = (body) => { learn(body); listenTo(["event", ...vocabulary.eventKinds]); };
    source.onopen = () => setConn("live", "live");
    source.onerror = () => setConn("offline", source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…");
    source.addEventListener("snapshot", (m) => {
      const body = parse(m);
      known(body);
      showLedgerNote(body.ledger);
      handlers.snapshot(body);
    });
    source.addEventListener("ledger", (m) => {
      const info = parse(m);
      known(info);
      showLedgerNote(info);
      if (handlers.ledger) handlers.ledger(info);
    });
    return source;
  }

  return { el, duration, clock, ago, percent, progressText, eta, settingsSummary, sync, listen, vocabulary, learn,
    serverNow, setServerNow, showLedgerNote, relative, absolute, when, timeEl, resolution, tinyBadge,
    watchDaemon, setHeartbeat, heartbeat, daemonUp };
})();
