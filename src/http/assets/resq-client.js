// resq-client.js: the reference client for resq-push's live stream, as a dependency-free ES module.
// Served by the server at /resq-client.js; copy it or import it from there.
//
//   import { ResqClient } from "/resq-client.js";
//   const client = new ResqClient({ token: "..." });          // same origin; or { url: "http://host:8000" }
//   client.on("emergency", (msg) => show(msg.seq, msg.data));  // each exactly once, in seq order
//   client.on("gap", (gap) => warn(gap));                      // emergencies the server no longer has
//   client.on("state", (s) => console.log(s.state));           // connecting | open | reconnecting | stopped
//   client.start();
//   client.ack(seq);                                           // "seen on this tablet"
//
// What it does for the app: connects over WebSocket (or Server-Sent Events, `transport: "sse"`, or
// "auto": SSE after WebSocket failed `fallbackAfter` times in a row without a welcome, then SSE
// for good but for a WebSocket probe every `probeWebSocketEvery`-th reconnect); sends
// {"type":"ping"} every `heartbeatMs` and treats a missing answer within the server's pong timeout
// as a dead link; reconnects with exponential backoff and jitter (1 s, 2 s, 4 s, ... up to 30 s,
// each between half and all of its step); resumes with ?since=<last seq handed over>&stream=<its
// history>, both kept in `storage` (localStorage by default: any object with getItem/setItem),
// under keys scoped per server (`storagePrefix`);
// hands each emergency to the app exactly once and in order; reports gaps (emergencies missed
// because the server no longer retains them, a reset history, an unexplained jump).
//
// Events (client.on(type, handler); it returns a function that removes the handler):
//   emergency  the envelope {type:"emergencia",seq,received_at,source,data}, new to this client
//   reopened   an open emergency older than where this client started: sent to a connection with
//              no stored position (a new device, cleared storage), before the welcome's seq; a
//              resume gets the open ones after its since as `emergency`, and never resends older
//   gap        {missed, since, reset, streamChanged, reason}: tell the operator
//   welcome    the server's {"type":"connection",...} message
//   ack, closed, unacked, status   the server's messages of those types, as they are
//   state      {state, since, attempt, delay, transport}: connection state changes
//   message    any other message from the server (clients ignore types they do not know)

export const DEFAULTS = Object.freeze({
  heartbeatMs: 15000,
  // Used until a welcome says the server's own pong timeout.
  pongTimeoutMs: 10000,
  connectTimeoutMs: 10000,
  backoffBaseMs: 1000,
  backoffMaxMs: 30000,
  fallbackAfter: 3,
  // Once SSE has worked ("auto"), every this-many-th reconnect tries WebSocket again.
  probeWebSocketEvery: 10,
  // The storage keys' prefix for a page of the server's own origin; a client of another server
  // (`url` of another origin) uses "resq.<that url>." unless told one.
  storagePrefix: "resq.",
  maxPendingAcks: 1000,
});

/// The delay before reconnect attempt `attempt` (0 for the first): min(max, base * 2^attempt),
/// times a random factor in [0.5, 1), so that a site's tablets do not all reconnect at once.
export function backoffDelay(attempt, { baseMs = DEFAULTS.backoffBaseMs, maxMs = DEFAULTS.backoffMaxMs, random = Math.random } = {}) {
  const step = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return step * (0.5 + random() / 2);
}

/// Storage for tests and for browsers without localStorage (private mode, a file:// page).
export function memoryStorage() {
  const values = new Map();
  return {
    getItem: (key) => (values.has(key) ? values.get(key) : null),
    setItem: (key, value) => values.set(key, String(value)),
    removeItem: (key) => values.delete(key),
  };
}

function defaultStorage() {
  try {
    if (typeof localStorage !== "undefined" && localStorage) return localStorage;
  } catch {
    // A browser that refuses storage (privacy settings) throws on the access itself.
  }
  return memoryStorage();
}

/// Where this client is in one history: the last seq it handed over and the stream it belongs to,
/// persisted in `storage`. Decides, for each envelope, whether it is new (hand it over), a
/// duplicate (drop it) or an open one from before the start (a first connection's `open`,
/// "reopened"); and, for each welcome, whether
/// there is a gap. Pure bookkeeping, no I/O beyond the storage.
export class Cursor {
  constructor(storage = memoryStorage(), prefix = DEFAULTS.storagePrefix) {
    this.storage = storage;
    this.prefix = prefix;
    const stored = this.read("lastSeq");
    this.lastSeq = stored !== null && /^\d+$/.test(stored) ? Number(stored) : null;
    this.stream = this.read("stream") || "";
    // The highest seq known to exist up to which nothing more will come (handed over, or
    // announced as missed): a seq beyond it + 1 is a gap.
    this.known = this.lastSeq ?? 0;
    this.resent = new Set();
  }

  read(key) {
    try {
      return this.storage.getItem(this.prefix + key);
    } catch {
      return null;
    }
  }

  write(key, value) {
    try {
      this.storage.setItem(this.prefix + key, String(value));
    } catch {
      // Full or refused storage: the client goes on, it only cannot resume after a reload.
    }
  }

  /// The query a (re)connection resumes with: {since, stream} once a seq is known, else null (only
  /// new emergencies, and the welcome's seq becomes the starting point).
  resumeQuery() {
    if (this.lastSeq === null) return null;
    return { since: this.lastSeq, stream: this.stream };
  }

  setLastSeq(seq) {
    this.lastSeq = seq;
    this.known = Math.max(this.known, seq);
    this.write("lastSeq", seq);
  }

  /// Takes a welcome; returns the gap it announces, or null.
  welcome(msg) {
    const replay = msg.replay;
    let gap = null;
    if (replay && (replay.reset || replay.stream_changed)) {
      // Another history: its seqs start over. The seq is stored before the stream, so that a
      // reload in between never pairs the new stream with the old seq (which would skip the new
      // history's first emergencies).
      this.lastSeq = 0;
      this.known = 0;
      this.write("lastSeq", 0);
      gap = { reason: replay.stream_changed ? "stream_changed" : "reset", reset: !!replay.reset, streamChanged: !!replay.stream_changed, since: replay.since, missed: replay.missed || 0 };
    }
    if (typeof msg.stream === "string") {
      this.stream = msg.stream;
      this.write("stream", msg.stream);
    }
    if (this.lastSeq === null) {
      // Connected without since: live emergencies come after the welcome's seq.
      this.setLastSeq(Number(msg.seq) || 0);
    }
    const open = Array.isArray(msg.open) ? msg.open.map(Number) : [];
    if (replay && replay.missed > 0) {
      this.known = Math.max(this.known, this.lastSeq + replay.missed);
      // Gone from the history but still open: the server sends those first, so they are not lost.
      const resent = open.filter((seq) => seq > this.lastSeq && seq <= this.known).length;
      const missed = replay.missed - resent;
      if (missed > 0) gap = gap || { reason: "missed", reset: false, streamChanged: false, since: replay.since, missed };
    }
    this.resent = new Set(open);
    return gap;
  }

  /// Takes an envelope: {kind: "new"|"reopened"|"duplicate", gap}. Only "new" advances the seq.
  accept(envelope) {
    const seq = Number(envelope.seq);
    if (!Number.isSafeInteger(seq) || seq < 1) return { kind: "duplicate", gap: null };
    const wasResent = this.resent.delete(seq);
    if (this.lastSeq !== null && seq <= this.lastSeq) {
      return { kind: wasResent ? "reopened" : "duplicate", gap: null };
    }
    let gap = null;
    if (seq > this.known + 1) {
      gap = { reason: "jump", reset: false, streamChanged: false, since: this.known, missed: seq - this.known - 1 };
    }
    this.setLastSeq(seq);
    return { kind: "new", gap };
  }
}

/// The acks made on this device: `pending` (seq -> {link it was last sent on, attempts, pinged})
/// until the server confirms them, `done` (every seq acked here, for the app: "seen on this
/// device" survives a reload). Both persisted next to the cursor, both bounded (the oldest go).
export class AckBook {
  constructor(cursor, max = DEFAULTS.maxPendingAcks) {
    this.cursor = cursor;
    this.max = max;
    this.pending = new Map(this.load("pendingAcks").map((seq) => [seq, AckBook.entry()]));
    this.done = new Set(this.load("acked"));
  }

  static entry() {
    return { link: null, attempts: 0, pinged: false };
  }

  load(key) {
    try {
      const list = JSON.parse(this.cursor.read(key) || "[]");
      return Array.isArray(list) ? list.filter((seq) => Number.isSafeInteger(seq) && seq > 0) : [];
    } catch {
      return [];
    }
  }

  save() {
    this.cursor.write("pendingAcks", JSON.stringify([...this.pending.keys()]));
    this.cursor.write("acked", JSON.stringify([...this.done]));
  }

  add(seq) {
    this.done.delete(seq);
    this.done.add(seq);
    if (!this.pending.has(seq)) this.pending.set(seq, AckBook.entry());
    for (const set of [this.pending, this.done]) {
      while (set.size > this.max) set.delete(set.keys().next().value);
    }
    this.save();
  }

  confirm(seq) {
    if (this.pending.delete(seq)) this.save();
  }

  clear() {
    this.pending.clear();
    this.done.clear();
    this.save();
  }
}

function httpBase(url) {
  if (url) return String(url).replace(/\/+$/, "");
  if (typeof location !== "undefined") return location.origin;
  throw new Error("resq-client: no url given and no location to default to");
}

/// Two servers' positions must not mix on one device: keys are scoped per server, but for the
/// page's own (where they stay as they always were).
function storagePrefix(base) {
  const own = typeof location !== "undefined" && location.origin === base;
  return own ? DEFAULTS.storagePrefix : `${DEFAULTS.storagePrefix}${base}.`;
}

function query(params) {
  const parts = [];
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") parts.push(`${key}=${encodeURIComponent(value)}`);
  }
  return parts.length ? `?${parts.join("&")}` : "";
}

/// One client of the live stream. Nothing happens until start().
export class ResqClient {
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    const o = this.options;
    this.base = httpBase(o.url);
    this.token = o.token || "";
    this.cursor = new Cursor(o.storage || defaultStorage(), options.storagePrefix ?? storagePrefix(this.base));
    this.env = {
      WebSocket: o.WebSocket || globalThis.WebSocket,
      EventSource: o.EventSource || globalThis.EventSource,
      fetch: o.fetch || (globalThis.fetch && globalThis.fetch.bind(globalThis)),
      setTimeout: o.setTimeout || globalThis.setTimeout.bind(globalThis),
      clearTimeout: o.clearTimeout || globalThis.clearTimeout.bind(globalThis),
      now: o.now || (() => Date.now()),
      random: o.random || Math.random,
    };
    this.handlers = new Map();
    this.transport = o.transport === "sse" ? "sse" : "websocket";
    this.attempt = 0;
    this.failuresWithoutWelcome = 0;
    // "auto": SSE delivered a welcome, so reconnects stay on SSE (but for an occasional probe).
    this.sseWorks = false;
    this.reconnectsOnSse = 0;
    this.link = null;
    this.timers = new Set();
    this.acks = new AckBook(this.cursor, this.options.maxPendingAcks);
    this.tablet = o.tablet || "";
    this.state = { state: "stopped", since: this.env.now(), attempt: 0, delay: 0, transport: this.transport };
    this.pongTimeoutMs = o.pongTimeoutMs;
    this.welcomed = false;
  }

  on(type, handler) {
    if (!this.handlers.has(type)) this.handlers.set(type, new Set());
    this.handlers.get(type).add(handler);
    return () => this.handlers.get(type).delete(handler);
  }

  emit(type, value) {
    for (const handler of this.handlers.get(type) || []) {
      try {
        handler(value);
      } catch (error) {
        // One handler's bug must not stop the stream (or the other handlers).
        setTimeout(() => {
          throw error;
        }, 0);
      }
    }
  }

  /// The last seq handed over and its stream (what the next connection resumes from).
  get position() {
    return { lastSeq: this.cursor.lastSeq, stream: this.cursor.stream };
  }

  setState(state, extra = {}) {
    // "Reconnecting since" is when the link was lost, not the latest attempt.
    const down = (name) => name === "connecting" || name === "reconnecting";
    const since = down(state) && down(this.state.state) ? this.state.since : this.env.now();
    this.state = { state, since, attempt: this.attempt, delay: 0, transport: this.transport, ...extra };
    this.emit("state", { ...this.state });
  }

  start() {
    if (this.started) return this;
    this.started = true;
    this.connect();
    return this;
  }

  stop() {
    this.started = false;
    this.clearTimers();
    this.dropLink();
    this.setState("stopped");
  }

  /// Tells the server that emergency `seq` was shown to an operator here. Over WebSocket it is a
  /// frame; over SSE (which cannot send) a POST. It stays pending (in storage too) until the
  /// server confirms it: the POST's 200, a pong to a ping sent after the frame (the server reads
  /// a connection's frames in order), or an `ack`/`status` naming this tablet (`tablet` option).
  /// Pending acks are sent again after each welcome; a failed POST is retried with backoff.
  ack(seq) {
    seq = Number(seq);
    if (!Number.isSafeInteger(seq) || seq < 1) return;
    this.acks.add(seq);
    this.sendAck(seq);
  }

  /// Whether `seq` was acked from this device (kept in storage, within this history).
  ackedHere(seq) {
    return this.acks.done.has(Number(seq));
  }

  /// The acks not confirmed yet, oldest first.
  get pendingAcks() {
    return [...this.acks.pending.keys()];
  }

  sendAck(seq) {
    const link = this.link;
    const entry = this.acks.pending.get(seq);
    if (!entry || !this.welcomed || !link || entry.link === link) return;
    if (link.kind === "websocket") {
      if (link.sendAck(seq)) entry.link = link;
      entry.pinged = false;
      return;
    }
    if (!this.env.fetch) return;
    entry.link = link;
    this.env
      .fetch(`${this.base}/emergencias/${seq}/ack`, { method: "POST", headers: this.authHeaders() })
      .then((response) => {
        // 404: no such emergency here (any more); 400: a seq this server cannot take. Final.
        if (response.ok || response.status === 404 || response.status === 400) return this.acks.confirm(seq);
        throw new Error(`status ${response.status}`);
      })
      .catch(() => this.retryAck(seq, link));
  }

  retryAck(seq, link) {
    const entry = this.acks.pending.get(seq);
    if (!entry || entry.link !== link) return;
    const delay = backoffDelay(entry.attempts++, { baseMs: this.options.backoffBaseMs, maxMs: this.options.backoffMaxMs, random: this.env.random });
    this.timer(() => {
      if (entry.link !== link || link !== this.link) return;
      entry.link = null;
      this.sendAck(seq);
    }, delay);
  }

  flushAcks() {
    for (const [seq, entry] of this.acks.pending) {
      entry.link = null;
      this.sendAck(seq);
    }
  }

  /// A ping is going out on `link`: its pong confirms the acks sent on it before.
  pinging(link) {
    for (const entry of this.acks.pending.values()) if (entry.link === link) entry.pinged = true;
  }

  ponged(link) {
    for (const [seq, entry] of this.acks.pending) if (entry.link === link && entry.pinged) this.acks.confirm(seq);
  }

  /// The server's `ack` and `status` messages confirm this tablet's acks, when it knows its name.
  confirmedBy(msg) {
    if (!this.tablet) return;
    const by = msg.type === "ack" ? [msg.by] : Array.isArray(msg.acked_by) ? msg.acked_by : [];
    if (by.includes(this.tablet)) this.acks.confirm(Number(msg.seq));
  }

  /// Authorization for fetch() calls: the subscribe token as a bearer token.
  authHeaders() {
    return this.token ? { Authorization: `Bearer ${this.token}` } : {};
  }

  timer(fn, delay) {
    const id = this.env.setTimeout(() => {
      this.timers.delete(id);
      fn();
    }, delay);
    this.timers.add(id);
    return id;
  }

  cancel(id) {
    if (id === null || id === undefined) return;
    this.timers.delete(id);
    this.env.clearTimeout(id);
  }

  clearTimers() {
    for (const id of this.timers) this.env.clearTimeout(id);
    this.timers.clear();
  }

  dropLink() {
    const link = this.link;
    this.link = null;
    if (link) link.close();
  }

  url(path) {
    const resume = this.cursor.resumeQuery();
    return `${this.base}${path}${query({ since: resume?.since, stream: resume?.stream, token: this.token })}`;
  }

  connect() {
    if (!this.started) return;
    this.welcomed = false;
    if (this.options.transport === "auto") this.transport = this.autoTransport();
    this.setState("connecting");
    const link = this.transport === "sse" ? this.openSse() : this.openWebSocket();
    this.link = link;
    // A connection that never opens (a server that accepts and never answers) is given up.
    link.connectTimer = this.timer(() => this.linkLost(link, "connect timeout"), this.options.connectTimeoutMs);
  }

  /// "auto": WebSocket until it failed `fallbackAfter` times in a row without a welcome; then SSE,
  /// and once SSE worked, SSE for every reconnect but every `probeWebSocketEvery`-th.
  autoTransport() {
    if (!this.env.EventSource) return "websocket";
    if (this.sseWorks) {
      this.reconnectsOnSse += 1;
      return this.reconnectsOnSse % this.options.probeWebSocketEvery === 0 ? "websocket" : "sse";
    }
    return this.failuresWithoutWelcome >= this.options.fallbackAfter ? "sse" : "websocket";
  }

  openWebSocket() {
    const wsUrl = this.url("/ws/emergencias").replace(/^http/, "ws");
    let socket;
    const link = {
      kind: "websocket",
      close: () => {
        try {
          socket && socket.close();
        } catch {}
      },
      send: (text) => {
        if (!socket || socket.readyState !== 1) return false;
        socket.send(text);
        return true;
      },
      sendAck: (seq) => link.send(JSON.stringify({ type: "ack", seq })),
    };
    try {
      socket = new this.env.WebSocket(wsUrl);
    } catch (error) {
      // A blocked URL (mixed content) throws instead of failing later: retry like any failure.
      this.timer(() => this.linkLost(link, String(error && error.message)), 0);
      return link;
    }
    socket.onmessage = (event) => this.received(link, event.data);
    socket.onclose = (event) => this.linkLost(link, `closed (${event.code})`);
    socket.onerror = () => {};
    return link;
  }

  openSse() {
    const source = new this.env.EventSource(this.url("/sse/emergencias"));
    const link = {
      kind: "sse",
      close: () => source.close(),
      send: () => false,
      sendAck: (seq) => {
        if (!this.env.fetch) return false;
        this.env
          .fetch(`${this.base}/emergencias/${seq}/ack`, { method: "POST", headers: this.authHeaders() })
          .catch(() => {});
        return true;
      },
    };
    const forward = (event) => this.received(link, event.data);
    source.onmessage = forward;
    for (const type of ["welcome", "ack", "closed", "unacked", "status", "reset", "ping", "pong", "bye"]) {
      source.addEventListener(type, forward);
    }
    // EventSource would retry by itself, at its own fixed pace: the client's backoff decides.
    source.onerror = () => this.linkLost(link, "event stream failed");
    return link;
  }

  received(link, text) {
    if (link !== this.link) return;
    this.heard(link);
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object") return;
    switch (msg.type) {
      case "connection":
        return this.welcome(link, msg);
      case "emergencia":
        return this.envelope(msg);
      case "pong":
        return this.ponged(link);
      case "ping":
        return;
      case "ack":
      case "status":
        this.confirmedBy(msg);
        return this.emit(msg.type, msg);
      case "closed":
      case "unacked":
        return this.emit(msg.type, msg);
      default:
        return this.emit("message", msg);
    }
  }

  welcome(link, msg) {
    this.cancel(link.connectTimer);
    this.welcomed = true;
    this.attempt = 0;
    this.failuresWithoutWelcome = 0;
    this.sseWorks = link.kind === "sse";
    if (msg.pong_timeout_ms > 0) this.pongTimeoutMs = msg.pong_timeout_ms;
    if (msg.ping_interval_ms > 0) this.pingIntervalMs = msg.ping_interval_ms;
    const gap = this.cursor.welcome(msg);
    // Seqs of another history: acks of them mean nothing here.
    if (gap && gap.reason !== "missed") this.acks.clear();
    this.setState("open", { stream: this.cursor.stream });
    this.emit("welcome", msg);
    if (gap) this.emit("gap", gap);
    this.flushAcks();
    this.scheduleHeartbeat(link);
  }

  envelope(msg) {
    const { kind, gap } = this.cursor.accept(msg);
    if (gap) this.emit("gap", gap);
    if (kind === "new") this.emit("emergency", msg);
    else if (kind === "reopened") this.emit("reopened", msg);
  }

  /// Anything from the server shows the link is alive: the pong deadline, if one runs, is off.
  heard(link) {
    if (link.pongTimer !== undefined) {
      this.cancel(link.pongTimer);
      link.pongTimer = undefined;
    }
    link.lastHeard = this.env.now();
    if (link.kind === "sse" && this.welcomed) this.scheduleHeartbeat(link);
  }

  /// Over WebSocket: a ping every heartbeatMs, and a dead link when nothing answers within the
  /// pong timeout. Over SSE the client cannot send: the server's ping events (every ping
  /// interval) are the heartbeat, and nothing heard for a heartbeat plus the pong timeout is a
  /// dead link.
  scheduleHeartbeat(link) {
    this.cancel(link.heartbeatTimer);
    if (link.kind === "sse") {
      const patience = (this.pingIntervalMs || this.options.heartbeatMs) + this.pongTimeoutMs;
      link.heartbeatTimer = this.timer(() => this.linkLost(link, "no ping from the server"), patience);
      return;
    }
    link.heartbeatTimer = this.timer(() => {
      if (link !== this.link) return;
      // A deadline already running is the oldest unanswered ping's: it stands (replacing it
      // would leave it running unseen, or, with a pong timeout above the heartbeat, push the
      // deadline back for ever).
      this.pinging(link);
      if (link.send(JSON.stringify({ type: "ping" })) && link.pongTimer === undefined) {
        link.pongTimer = this.timer(() => this.linkLost(link, "no pong"), this.pongTimeoutMs);
      }
      this.scheduleHeartbeat(link);
    }, this.options.heartbeatMs);
  }

  linkLost(link, why) {
    if (link !== this.link) return;
    this.cancel(link.connectTimer);
    this.cancel(link.heartbeatTimer);
    this.cancel(link.pongTimer);
    this.dropLink();
    if (!this.welcomed) this.failuresWithoutWelcome += 1;
    this.welcomed = false;
    if (!this.started) return;
    const delay = backoffDelay(this.attempt, { baseMs: this.options.backoffBaseMs, maxMs: this.options.backoffMaxMs, random: this.env.random });
    this.attempt += 1;
    this.setState("reconnecting", { delay, reason: why });
    this.timer(() => this.connect(), delay);
  }
}
