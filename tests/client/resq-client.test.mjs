// Unit tests for src/http/assets/resq-client.js (the module the server serves at /resq-client.js):
// its backoff, its dedup and ordering, its gap logic, the heartbeat, the fallback transport and acks,
// against fake sockets and a fake clock. `node --test tests/client` (scripts/test runs it).

import assert from "node:assert/strict";
import { test } from "node:test";

import { Cursor, ResqClient, backoffDelay, memoryStorage } from "../../src/http/assets/resq-client.js";

/// The storage keys' prefix of a client of http://resq.test:8000 (not the page's own origin).
const KEYS = "resq.http://resq.test:8000.";

/// A clock and timers that only move when the test says so.
function fakeTime() {
  let now = 1_000_000;
  let nextId = 1;
  const timers = new Map();
  return {
    now: () => now,
    setTimeout: (fn, delay) => {
      const id = nextId++;
      timers.set(id, { at: now + Math.max(0, delay), fn, delay });
      return id;
    },
    clearTimeout: (id) => timers.delete(id),
    /// Runs every timer due within `ms`, in time order.
    advance(ms) {
      const until = now + ms;
      for (;;) {
        const due = [...timers.entries()].filter(([, t]) => t.at <= until).sort((a, b) => a[1].at - b[1].at)[0];
        if (!due) break;
        timers.delete(due[0]);
        now = due[1].at;
        due[1].fn();
      }
      now = until;
    },
    pending: () => [...timers.values()].map((t) => t.delay),
  };
}

/// WebSocket stand-ins that record what the client does; the test plays the server.
function fakeSockets() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      sockets.push(this);
    }
    send(text) {
      if (this.readyState !== 1) throw new Error("send while not open");
      this.sent.push(JSON.parse(text));
    }
    close() {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.onclose?.({ code: 1005 });
    }
    // The server's side:
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    push(msg) {
      this.onmessage?.({ data: JSON.stringify(msg) });
    }
    drop(code = 1006) {
      this.readyState = 3;
      this.onclose?.({ code });
    }
  }
  return { FakeWebSocket, sockets, last: () => sockets[sockets.length - 1] };
}

function welcome(extra = {}) {
  return { type: "connection", stream: "s1", seq: 0, ping_interval_ms: 30000, pong_timeout_ms: 10000, history: {}, ...extra };
}

function envelope(seq, data = { n: seq }) {
  return { type: "emergencia", seq, received_at: "2026-12-01T00:00:00.000Z", source: "http", data };
}

function client(extra = {}) {
  const time = fakeTime();
  const net = fakeSockets();
  const storage = extra.storage || memoryStorage();
  const c = new ResqClient({
    url: "http://resq.test:8000",
    WebSocket: net.FakeWebSocket,
    setTimeout: time.setTimeout,
    clearTimeout: time.clearTimeout,
    now: time.now,
    random: () => 0.5,
    storage,
    ...extra,
  });
  const seen = { emergency: [], reopened: [], gap: [], state: [], ack: [], closed: [], unacked: [], status: [] };
  for (const type of Object.keys(seen)) c.on(type, (value) => seen[type].push(value));
  return { c, time, net, storage, seen };
}

/// A client that stored seq `lastSeq` of stream s1 earlier, connected and welcomed with `welcomed`.
function resumed(lastSeq, welcomed) {
  const storage = memoryStorage();
  storage.setItem(`${KEYS}lastSeq`, String(lastSeq));
  storage.setItem(`${KEYS}stream`, "s1");
  const started = client({ storage });
  started.c.start();
  started.net.last().open();
  started.net.last().push(welcome(welcomed));
  return started;
}

function replay(since, count, missed) {
  return { since, count, missed, reset: false, stream_changed: false };
}

test("backoff doubles from 1 s to 30 s and never beyond, with jitter of at most half a step", () => {
  for (let attempt = 0; attempt < 40; attempt++) {
    const step = Math.min(30000, 1000 * 2 ** attempt);
    const high = backoffDelay(attempt, { random: () => 0.999999 });
    const low = backoffDelay(attempt, { random: () => 0 });
    assert.ok(high <= step && high > step * 0.99, `attempt ${attempt}: ${high}`);
    assert.equal(low, step / 2, `attempt ${attempt}`);
  }
  assert.equal(backoffDelay(1000, { random: () => 0.999999 }) <= 30000, true);
});

test("the client never reconnects in a tight loop: each failure waits longer, up to the cap", () => {
  const { c, time, net } = client({ random: () => 0 });
  c.start();
  const delays = [];
  for (let i = 0; i < 10; i++) {
    net.last().drop();
    const [delay] = time.pending().filter((d) => d !== 10000);
    delays.push(delay);
    time.advance(delay);
  }
  assert.deepEqual(delays, [500, 1000, 2000, 4000, 8000, 15000, 15000, 15000, 15000, 15000]);
  assert.equal(net.sockets.length, 11);
  // A welcome resets the backoff.
  net.last().open();
  net.last().push(welcome());
  net.last().drop();
  assert.ok(time.pending().includes(500), String(time.pending()));
});

test("each emergency is handed over exactly once and in order, across a reconnect", () => {
  const { c, net, time, seen } = client();
  c.start();
  assert.equal(net.last().url, "ws://resq.test:8000/ws/emergencias");
  net.last().open();
  net.last().push(welcome({ seq: 4 }));
  net.last().push(envelope(5));
  net.last().push(envelope(6));
  net.last().push(envelope(6)); // a duplicate
  net.last().push(envelope(5)); // an old one
  net.last().drop();
  time.advance(1000);
  assert.equal(net.last().url, "ws://resq.test:8000/ws/emergencias?since=6&stream=s1");
  net.last().open();
  net.last().push(welcome({ seq: 8, replay: replay(6, 2, 0) }));
  net.last().push(envelope(6));
  net.last().push(envelope(7));
  net.last().push(envelope(8));
  assert.deepEqual(seen.emergency.map((m) => m.seq), [5, 6, 7, 8]);
  assert.deepEqual(seen.gap, []);
  assert.deepEqual(c.position, { lastSeq: 8, stream: "s1" });
});

test("the position survives in storage: a new client resumes where the last one stopped", () => {
  const storage = memoryStorage();
  const first = client({ storage });
  first.c.start();
  first.net.last().open();
  first.net.last().push(welcome({ seq: 0 }));
  first.net.last().push(envelope(1));
  first.c.stop();
  const second = client({ storage, token: "t 1" });
  second.c.start();
  assert.equal(second.net.last().url, "ws://resq.test:8000/ws/emergencias?since=1&stream=s1&token=t%201");
});

test("missed emergencies are reported once, and the replay after them is not a second gap", () => {
  const { net, seen } = resumed(3, { seq: 12, replay: replay(3, 2, 7) });
  net.last().push(envelope(11));
  net.last().push(envelope(12));
  assert.deepEqual(seen.gap, [{ reason: "missed", reset: false, streamChanged: false, since: 3, missed: 7 }]);
  assert.deepEqual(seen.emergency.map((m) => m.seq), [11, 12]);
});

test("a new history starts over from seq 0, stored before the new stream", () => {
  const writes = [];
  const inner = memoryStorage();
  inner.setItem(`${KEYS}lastSeq`, "40");
  inner.setItem(`${KEYS}stream`, "old");
  const storage = { getItem: (k) => inner.getItem(k), setItem: (k, v) => (writes.push([k, String(v)]), inner.setItem(k, v)) };
  const { c, net, seen } = client({ storage });
  c.start();
  net.last().open();
  net.last().push(welcome({ stream: "new", seq: 2, replay: { since: 40, count: 2, missed: 0, reset: false, stream_changed: true } }));
  net.last().push(envelope(1));
  net.last().push(envelope(2));
  assert.deepEqual(writes.slice(0, 2), [[`${KEYS}lastSeq`, "0"], [`${KEYS}stream`, "new"]]);
  assert.deepEqual(seen.emergency.map((m) => m.seq), [1, 2]);
  assert.equal(seen.gap.length, 1);
  assert.equal(seen.gap[0].reason, "stream_changed");
});

test("missed emergencies that are still open come anyway: not a gap", () => {
  const { net, seen } = resumed(3, { seq: 8, open: [5], replay: replay(3, 2, 3) });
  for (const seq of [5, 7, 8]) net.last().push(envelope(seq));
  assert.deepEqual(seen.gap.map((g) => g.missed), [2]);
  assert.deepEqual(seen.emergency.map((m) => m.seq), [5, 7, 8]);
});

test("an unexplained jump in seqs is a gap", () => {
  const cursor = new Cursor(memoryStorage());
  cursor.welcome(welcome({ seq: 1 }));
  assert.deepEqual(cursor.accept(envelope(2)), { kind: "new", gap: null });
  const { kind, gap } = cursor.accept(envelope(5));
  assert.equal(kind, "new");
  assert.deepEqual(gap, { reason: "jump", reset: false, streamChanged: false, since: 2, missed: 2 });
});

test("a first connection's open emergencies (before the welcome's seq) are reopened, once", () => {
  // As the server does it: without a stored position the welcome lists every open one, sent first.
  const { c, net, seen } = client();
  c.start();
  net.last().open();
  net.last().push(welcome({ seq: 10, open: [3, 7] }));
  net.last().push(envelope(3));
  net.last().push(envelope(7));
  net.last().push(envelope(3)); // a duplicate
  net.last().push(envelope(11));
  assert.deepEqual(seen.reopened.map((m) => m.seq), [3, 7]);
  assert.deepEqual(seen.emergency.map((m) => m.seq), [11]);
});

test("a resume's open emergencies come after its since: new, never reopened", () => {
  // The server lists only the open ones after since that the replay does not cover (gone from
  // its history); those it had already are told by a `status`, not sent again.
  const { net, seen } = resumed(4, { seq: 9, open: [6], replay: replay(4, 2, 3) });
  for (const seq of [6, 8, 9]) net.last().push(envelope(seq));
  assert.deepEqual(seen.reopened, []);
  assert.deepEqual(seen.emergency.map((m) => m.seq), [6, 8, 9]);
});

test("a ping every heartbeat; no answer within the pong timeout is a dead link", () => {
  const { c, net, time, seen } = client({ heartbeatMs: 15000 });
  c.start();
  const socket = net.last();
  socket.open();
  socket.push(welcome({ pong_timeout_ms: 5000 }));
  time.advance(15000);
  assert.deepEqual(socket.sent, [{ type: "ping" }]);
  socket.push({ type: "pong" });
  time.advance(15000);
  assert.equal(socket.sent.length, 2);
  time.advance(4999);
  assert.equal(socket.readyState, 1);
  time.advance(1);
  assert.equal(socket.readyState, 3, "no pong: closed");
  assert.equal(seen.state.at(-1).state, "reconnecting");
  assert.equal(seen.state.at(-1).reason, "no pong");
});

test("a connection that never opens is given up after the connect timeout", () => {
  const { c, net, time } = client({ connectTimeoutMs: 10000 });
  c.start();
  time.advance(9999);
  assert.equal(net.sockets.length, 1);
  time.advance(1);
  assert.equal(net.sockets[0].readyState, 3);
  time.advance(1000);
  assert.equal(net.sockets.length, 2);
});

test("acks go out as frames once connected; made while down, they wait", () => {
  const { c, net, time } = client();
  c.start();
  c.ack(4);
  net.last().open();
  net.last().push(welcome({ seq: 4 }));
  assert.deepEqual(net.last().sent, [{ type: "ack", seq: 4 }]);
  c.ack(4.5);
  c.ack(5);
  assert.deepEqual(net.last().sent.at(-1), { type: "ack", seq: 5 });
  // The heartbeat's pong says the server read them.
  time.advance(15000);
  net.last().push({ type: "pong" });
  assert.deepEqual(c.pendingAcks, []);
  net.last().drop();
  c.ack(6);
  time.advance(1000);
  net.last().open();
  net.last().push(welcome({ seq: 6 }));
  assert.deepEqual(net.last().sent, [{ type: "ack", seq: 6 }]);
});

test("server messages reach the app as events", () => {
  const { c, net, seen } = client();
  c.start();
  net.last().open();
  net.last().push(welcome());
  net.last().push({ type: "ack", seq: 1, by: "tablet-2", acked: 1, delivered: 2 });
  net.last().push({ type: "closed", seq: 1, close: null });
  net.last().push({ type: "unacked", seq: 2, ack_timeout_s: 60 });
  net.last().push({ type: "status", seq: 2, acked_by: [] });
  assert.equal(seen.ack[0].by, "tablet-2");
  assert.equal(seen.closed.length, 1);
  assert.equal(seen.unacked.length, 1);
  assert.equal(seen.status.length, 1);
});

test("connection states say since when the link is down, across attempts", () => {
  const { c, net, time, seen } = client();
  c.start();
  net.last().open();
  net.last().push(welcome());
  time.advance(5000);
  net.last().drop();
  const lostAt = time.now();
  time.advance(3000);
  net.last().drop();
  const states = seen.state.map((s) => s.state);
  assert.deepEqual(states, ["connecting", "open", "reconnecting", "connecting", "reconnecting"]);
  assert.ok(seen.state.slice(2).every((s) => s.since === lostAt));
});

test("transport auto falls back to SSE after WebSocket failures, acks by POST", () => {
  const sources = [];
  class FakeEventSource {
    constructor(url) {
      this.url = url;
      this.listeners = {};
      sources.push(this);
    }
    addEventListener(type, fn) {
      this.listeners[type] = fn;
    }
    close() {
      this.closed = true;
    }
  }
  const posts = [];
  const fetch = (url, init) => (posts.push([url, init]), Promise.resolve({ ok: true }));
  const { c, net, time, seen } = client({ transport: "auto", fallbackAfter: 2, EventSource: FakeEventSource, fetch, token: "tok" });
  c.start();
  net.last().drop();
  time.advance(1000);
  net.last().drop();
  time.advance(2000);
  assert.equal(net.sockets.length, 2);
  assert.equal(sources.length, 1);
  assert.equal(sources[0].url, "http://resq.test:8000/sse/emergencias?token=tok");
  sources[0].listeners.welcome({ data: JSON.stringify(welcome({ seq: 2, ping_interval_ms: 30000, pong_timeout_ms: 10000 })) });
  sources[0].onmessage({ data: JSON.stringify(envelope(3)) });
  assert.deepEqual(seen.emergency.map((m) => m.seq), [3]);
  c.ack(3);
  assert.deepEqual(posts, [["http://resq.test:8000/emergencias/3/ack", { method: "POST", headers: { Authorization: "Bearer tok" } }]]);
  // The server's ping events keep it alive; silence past ping interval + pong timeout does not.
  time.advance(30000);
  sources[0].listeners.ping({ data: '{"type":"ping"}' });
  time.advance(39999);
  assert.ok(!sources[0].closed);
  time.advance(1);
  assert.ok(sources[0].closed);
  assert.equal(seen.state.at(-1).reason, "no ping from the server");
});

test("a late pong never trips the dead-link timer of a later ping; silence still does", () => {
  // A pong timeout above the heartbeat: a second ping goes out while the first is unanswered.
  const { c, net, time } = client({ heartbeatMs: 15000 });
  c.start();
  const socket = net.last();
  socket.open();
  socket.push(welcome({ pong_timeout_ms: 20000 }));
  time.advance(30000);
  assert.equal(socket.sent.length, 2);
  time.advance(2000);
  socket.push({ type: "pong" }); // the first ping's answer, late
  time.advance(8000); // past the first ping's deadline
  assert.equal(socket.readyState, 1, "answered: still open");
  // From now on nothing answers: the next ping's deadline closes it.
  time.advance(25000);
  assert.equal(socket.readyState, 3, "silence: closed");
});

/// EventSource stand-ins; the test plays the server.
function fakeSources() {
  const sources = [];
  class FakeEventSource {
    constructor(url) {
      this.url = url;
      this.listeners = {};
      sources.push(this);
    }
    addEventListener(type, fn) {
      this.listeners[type] = fn;
    }
    close() {
      this.closed = true;
    }
    // The server's side:
    welcome(msg) {
      this.listeners.welcome({ data: JSON.stringify(msg) });
    }
    fail() {
      this.onerror?.({});
    }
  }
  return { FakeEventSource, sources };
}

test("once SSE worked, auto stays on SSE for reconnects and probes WebSocket only every 10th", () => {
  const sse = fakeSources();
  const { c, net, time } = client({ transport: "auto", fallbackAfter: 3, EventSource: sse.FakeEventSource, random: () => 0 });
  c.start();
  for (let i = 0; i < 3; i++) {
    net.last().drop();
    time.advance(5000);
  }
  assert.equal(net.sockets.length, 3);
  assert.equal(sse.sources.length, 1);
  sse.sources[0].welcome(welcome());
  // Nine reconnects on SSE, each welcomed; the tenth probes WebSocket.
  for (let i = 1; i <= 9; i++) {
    sse.sources.at(-1).fail();
    time.advance(5000);
    assert.equal(sse.sources.length, 1 + i, `reconnect ${i} is on SSE`);
    sse.sources.at(-1).welcome(welcome());
  }
  assert.equal(net.sockets.length, 3, "no WebSocket attempt meanwhile");
  sse.sources.at(-1).fail();
  time.advance(5000);
  assert.equal(net.sockets.length, 4, "the tenth reconnect probes WebSocket");
  // The probe fails: back on SSE at once, not after three more WebSocket attempts.
  net.last().drop();
  time.advance(5000);
  assert.equal(sse.sources.length, 11);
  assert.equal(net.sockets.length, 4);
});

test("an ack sent on a dead socket is kept, sent again after the next welcome, until a pong confirms it", () => {
  const storage = memoryStorage();
  const { c, net, time } = client({ storage });
  c.start();
  net.last().open();
  net.last().push(welcome({ seq: 3 }));
  c.ack(3); // the socket looks open, the path is dead: nothing will answer
  assert.deepEqual(net.last().sent, [{ type: "ack", seq: 3 }]);
  assert.deepEqual(c.pendingAcks, [3]);
  assert.ok(c.ackedHere(3));
  time.advance(15000 + 10000); // ping, no pong: dead link
  assert.equal(net.last().readyState, 3);
  // A reload meanwhile keeps it too.
  const reloaded = client({ storage });
  assert.deepEqual(reloaded.c.pendingAcks, [3]);
  assert.ok(reloaded.c.ackedHere(3));
  time.advance(1000);
  net.last().open();
  net.last().push(welcome({ seq: 3 }));
  assert.deepEqual(net.last().sent, [{ type: "ack", seq: 3 }], "sent again");
  time.advance(15000);
  net.last().push({ type: "pong" });
  assert.deepEqual(c.pendingAcks, []);
  net.last().drop();
  time.advance(1000);
  net.last().open();
  net.last().push(welcome({ seq: 3 }));
  assert.deepEqual(net.last().sent, [], "confirmed: not sent again");
});

test("an ack is confirmed by an ack or status naming this tablet; a new history forgets acks", () => {
  const { c, net, time } = client({ tablet: "tablet-1" });
  c.start();
  net.last().open();
  net.last().push(welcome({ seq: 5 }));
  c.ack(4);
  c.ack(5);
  net.last().push({ type: "ack", seq: 4, by: "tablet-2", acked: 1, delivered: 2 });
  assert.deepEqual(c.pendingAcks, [4, 5], "another tablet's ack confirms nothing");
  net.last().push({ type: "ack", seq: 4, by: "tablet-1", acked: 2, delivered: 2 });
  net.last().push({ type: "status", seq: 5, acked_by: ["tablet-1"] });
  assert.deepEqual(c.pendingAcks, []);
  assert.ok(c.ackedHere(4) && c.ackedHere(5));
  net.last().drop();
  c.ack(6);
  time.advance(1000);
  net.last().open();
  net.last().push(welcome({ stream: "s2", seq: 1, replay: { since: 5, count: 1, missed: 0, reset: false, stream_changed: true } }));
  assert.deepEqual(net.last().sent, [], "seq 6 of the old history is not acked in the new one");
  assert.deepEqual(c.pendingAcks, []);
  assert.ok(!c.ackedHere(4));
});

test("over SSE a failed ack POST is retried with backoff until the server answers 200", async () => {
  const sse = fakeSources();
  const answers = [Promise.reject(new Error("offline")), Promise.resolve({ ok: false, status: 503 }), Promise.resolve({ ok: true, status: 200 })];
  const posts = [];
  const fetch = (url) => (posts.push(url), answers.shift() ?? Promise.resolve({ ok: true, status: 200 }));
  const { c, time } = client({ transport: "sse", EventSource: sse.FakeEventSource, fetch, random: () => 0 });
  const settle = () => new Promise((resolve) => setImmediate(resolve));
  c.start();
  sse.sources[0].welcome(welcome({ seq: 7 }));
  c.ack(7);
  await settle();
  assert.equal(posts.length, 1);
  assert.deepEqual(c.pendingAcks, [7]);
  time.advance(500); // the first retry, after backoff
  await settle();
  assert.equal(posts.length, 2);
  assert.deepEqual(c.pendingAcks, [7], "a 503 is no answer");
  time.advance(1000);
  await settle();
  assert.equal(posts.length, 3);
  assert.deepEqual(c.pendingAcks, []);
  time.advance(60000);
  await settle();
  assert.equal(posts.length, 3, "confirmed: no more POSTs");
  assert.ok(posts.every((url) => url === "http://resq.test:8000/emergencias/7/ack"));
});

test("pending acks are bounded: the oldest go first", () => {
  const { c } = client({ maxPendingAcks: 3 });
  for (const seq of [1, 2, 3, 4, 5]) c.ack(seq);
  assert.deepEqual(c.pendingAcks, [3, 4, 5]);
  assert.ok(!c.ackedHere(1) && c.ackedHere(5));
});

test("storage keys are scoped per server: two servers' positions never mix", () => {
  const storage = memoryStorage();
  const first = client({ storage });
  first.c.start();
  first.net.last().open();
  first.net.last().push(welcome({ seq: 9 }));
  const other = client({ storage, url: "http://other.test:8000" });
  other.c.start();
  assert.equal(other.net.last().url, "ws://other.test:8000/ws/emergencias", "no position of the first server");
  assert.equal(storage.getItem(`${KEYS}lastSeq`), "9");
  const told = client({ storage, storagePrefix: "app." });
  assert.equal(told.c.cursor.prefix, "app.");
});
