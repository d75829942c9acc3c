// The operators' console (served at /, with console.html and console.css): the live list of
// emergencies, who has seen each, the tablets, and an alarm that repeats until someone here
// presses "Visto". Built on the reference client, /resq-client.js; no other code, no build step.
//
// Query parameters: ?token=T (kept on the device, then removed from the address bar),
// ?transport=websocket|sse|auto (default auto: SSE when WebSocket keeps failing).

import { ResqClient } from "/resq-client.js";

const MAX_CARDS = 200;
const POLL_MS = 10000;
// The members of `data` shown on each card when present, in this order; otherwise the first few.
const MAIN_FIELDS = ["tipo", "prioridad", "direccion", "comuna", "descripcion", "nombre", "telefono", "unidad"];
const FIELDS_SHOWN = 5;
const FIELD_CHARS = 160;
const TOKEN_KEY = "resq.token";
// The seqs of the cards and their history, so that a reload (or a tab the browser discarded)
// can rebuild the list: a resume replays nothing up to the stored seq.
const CARDS_KEY = "resq.console.cards";

const $ = (id) => document.getElementById(id);
const items = new Map(); // seq -> {envelope, status, seenHere, card}
const page = { missed: 0, received: 0, audio: null, alarmTimer: null, wakeLock: null, lastProbe: 0, generation: 0, fetching: new Set() };

function storedToken() {
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    saveToken(params.get("token"));
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
  }
  try {
    return localStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

function storedCards() {
  try {
    const stored = JSON.parse(localStorage.getItem(CARDS_KEY) || "{}");
    const seqs = Array.isArray(stored.seqs) ? stored.seqs.filter((seq) => Number.isSafeInteger(seq) && seq > 0) : [];
    return { stream: typeof stored.stream === "string" ? stored.stream : "", seqs };
  } catch {
    return { stream: "", seqs: [] };
  }
}

function saveCards() {
  try {
    localStorage.setItem(CARDS_KEY, JSON.stringify({ stream: page.stream, seqs: [...items.keys()] }));
  } catch {
    // Storage refused: a reload shows only what the server sends.
  }
}

function saveToken(token) {
  try {
    localStorage.setItem(TOKEN_KEY, token);
  } catch {
    // Storage refused: the token lasts as long as the page.
  }
}

const token = storedToken();
const transport = new URLSearchParams(location.search).get("transport") || "auto";
const client = new ResqClient({ token, transport });
const remembered = storedCards();
page.stream = remembered.stream;

function time(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso ?? "") : date.toLocaleTimeString();
}

function text(value) {
  return typeof value === "object" && value !== null ? JSON.stringify(value) : String(value);
}

// A card shows the start of a long value; the full JSON is one tap away.
function shorten(value) {
  return value.length > FIELD_CHARS ? `${value.slice(0, FIELD_CHARS - 1)}…` : value;
}

function mainFields(data) {
  if (!data || typeof data !== "object") return [];
  const keys = MAIN_FIELDS.filter((key) => key in data);
  for (const key of Object.keys(data)) {
    if (keys.length >= FIELDS_SHOWN) break;
    if (!keys.includes(key) && key !== "idempotency_key") keys.push(key);
  }
  return keys.slice(0, FIELDS_SHOWN).map((key) => [key, shorten(text(data[key]))]);
}

function blankStatus(seq) {
  return { seq, acked: 0, delivered: 0, acked_by: [], closed: false, escalated: false };
}

// ---- the list ----------------------------------------------------------------------------

function addCard(envelope, { alarm }) {
  const seq = envelope.seq;
  if (items.has(seq)) return items.get(seq);
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  card.dataset.seq = String(seq);
  card.querySelector(".seq").textContent = `#${seq}`;
  const received = card.querySelector(".received");
  received.textContent = time(envelope.received_at);
  received.dateTime = envelope.received_at || "";
  const fields = card.querySelector(".fields");
  for (const [key, value] of mainFields(envelope.data)) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = value;
    fields.append(dt, dd);
  }
  card.querySelector(".raw pre").textContent = JSON.stringify(envelope, null, 2);
  card.querySelector(".seen").addEventListener("click", () => seen(seq));
  const item = { envelope, status: blankStatus(seq), seenHere: !alarm, card };
  items.set(seq, item);
  if (alarm) card.classList.add("new");
  // Newest first, by seq: a resent open emergency goes where it belongs, not on top.
  const later = [...$("list").children].find((other) => Number(other.dataset.seq) < seq);
  $("list").insertBefore(card, later || null);
  while (items.size > MAX_CARDS) {
    const oldest = Math.min(...items.keys());
    items.get(oldest).card.remove();
    items.delete(oldest);
  }
  saveCards();
  renderStatus(item);
  refresh();
  return item;
}

/// Another history: its seqs are not the old cards'. The list starts over.
function clearList() {
  page.generation += 1;
  items.clear();
  $("list").replaceChildren();
  saveCards();
  refresh();
}

/// A card this page had (before a reload) or the server names (`open`, `status`) but did not
/// send: fetched and shown, ringing if it is open and was not acked on this device.
async function rebuildCard(seq) {
  if (items.has(seq) || page.fetching.has(seq)) return;
  const generation = page.generation;
  page.fetching.add(seq);
  try {
    const response = await fetch(`/emergencias/${seq}`, { headers: client.authHeaders(), cache: "no-store" });
    if (response.status === 404) return forget(seq);
    if (!response.ok) return;
    const { emergency, status } = await response.json();
    if (generation !== page.generation || !emergency || items.has(seq)) return;
    addCard(emergency, { alarm: !status?.closed && !client.ackedHere(seq) });
    if (status) updateStatus(seq, (mine) => Object.assign(mine, status));
  } catch {
    // Down again: the next welcome tries again.
  } finally {
    page.fetching.delete(seq);
  }
}

/// No longer on the server: not asked for again.
function forget(seq) {
  remembered.seqs = remembered.seqs.filter((other) => other !== seq);
}

function renderStatus(item) {
  const { status, card } = item;
  const who = status.acked_by.length ? status.acked_by.join(", ") : "nadie";
  const of = status.delivered ? ` de ${status.delivered}` : "";
  const count = status.acked || status.delivered ? `: ${status.acked}${of}` : "";
  card.querySelector(".seen-by").textContent = `visto por ${who}${count}`;
  card.classList.toggle("closed", !!status.closed);
  card.classList.toggle("escalated", !!status.escalated && !status.closed);
  const badge = card.querySelector(".badge");
  badge.textContent = status.closed ? "cerrada" : status.escalated ? "SIN RESPUESTA" : "";
  card.dataset.acked = String(status.acked);
}

function updateStatus(seq, change) {
  const item = items.get(seq);
  if (!item) return;
  change(item.status);
  renderStatus(item);
  // Closed elsewhere: nothing left to call anyone's attention to.
  if (item.status.closed && !item.seenHere) markSeen(item);
}

function seen(seq) {
  const item = items.get(seq);
  if (!item) return;
  client.ack(seq);
  markSeen(item);
}

function markSeen(item) {
  item.seenHere = true;
  item.card.classList.remove("new");
  refresh();
}

function unseenCount() {
  let count = 0;
  for (const item of items.values()) if (!item.seenHere) count += 1;
  return count;
}

function refresh() {
  const unseen = unseenCount();
  $("count-unseen").textContent = String(unseen);
  $("count-received").textContent = String(page.received);
  $("empty").hidden = items.size > 0;
  document.title = unseen ? `(${unseen}) resq-push · consola` : "resq-push · consola";
  alarm(unseen > 0);
}

// ---- the alarm: a tone pattern every 2 s while something is unseen, once audio is unlocked ----

function unlockAudio() {
  if (!page.audio) {
    const Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) {
      document.body.dataset.alarm = "unsupported";
      return;
    }
    page.audio = new Context();
  }
  page.audio.resume().catch(() => {});
  if (document.body.dataset.alarm === "locked") document.body.dataset.alarm = "off";
  requestWakeLock();
  refresh();
}

function beep() {
  const audio = page.audio;
  if (!audio || audio.state !== "running") return;
  const start = audio.currentTime;
  [880, 660, 880].forEach((frequency, index) => {
    const oscillator = audio.createOscillator();
    const gain = audio.createGain();
    oscillator.type = "square";
    oscillator.frequency.value = frequency;
    const at = start + index * 0.3;
    gain.gain.setValueAtTime(0.0001, at);
    gain.gain.exponentialRampToValueAtTime(0.3, at + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, at + 0.25);
    oscillator.connect(gain).connect(audio.destination);
    oscillator.start(at);
    oscillator.stop(at + 0.26);
  });
}

function alarm(on) {
  const state = document.body.dataset.alarm;
  if (state === "locked" || state === "unsupported") return;
  document.body.dataset.alarm = on ? "on" : "off";
  if (on && page.alarmTimer === null) {
    beep();
    page.alarmTimer = setInterval(beep, 2000);
  } else if (!on && page.alarmTimer !== null) {
    clearInterval(page.alarmTimer);
    page.alarmTimer = null;
  }
}

// ---- wake lock and notifications: secure contexts only ------------------------------------

async function requestWakeLock() {
  if (!("wakeLock" in navigator) || page.wakeLock || document.visibilityState !== "visible") return;
  try {
    page.wakeLock = await navigator.wakeLock.request("screen");
    page.wakeLock.addEventListener("release", () => (page.wakeLock = null));
    $("wake-note").textContent = "Pantalla: se mantiene encendida.";
  } catch (error) {
    $("wake-note").textContent = `Pantalla: el navegador no permite mantenerla encendida (${error.name}).`;
  }
}

function describeDevice() {
  const secure = window.isSecureContext;
  if (!("wakeLock" in navigator)) {
    $("wake-note").textContent = secure
      ? "Pantalla: este navegador no puede mantenerla encendida; ajuste la suspensión del equipo."
      : "Pantalla: mantenerla encendida requiere abrir la consola por https; ajuste la suspensión del equipo.";
  } else {
    $("wake-note").textContent = "Pantalla: se mantendrá encendida tras el primer toque.";
  }
  if (!("Notification" in window) || !secure) {
    $("notify-note").textContent = secure
      ? "Notificaciones: este navegador no las ofrece."
      : "Notificaciones: requieren abrir la consola por https (contexto seguro).";
    return;
  }
  const permission = Notification.permission;
  $("notify-note").textContent =
    permission === "granted" ? "Notificaciones: activas cuando la consola no está a la vista."
      : permission === "denied" ? "Notificaciones: bloqueadas en los ajustes del navegador."
        : "Notificaciones: desactivadas.";
  $("notify-enable").hidden = permission !== "default";
}

function notify(envelope) {
  if (!("Notification" in window) || !window.isSecureContext || Notification.permission !== "granted") return;
  if (document.visibilityState === "visible") return;
  const summary = mainFields(envelope.data).map(([, value]) => value).join(" · ");
  try {
    new Notification(`Emergencia #${envelope.seq}`, { body: summary, tag: `resq-${envelope.seq}`, requireInteraction: true });
  } catch {
    // Some browsers allow notifications only from a service worker.
  }
}

// ---- the connection ----------------------------------------------------------------------

const STATE_TEXT = {
  connecting: "Conectando…",
  open: "Conectado",
  reconnecting: "Sin conexión",
  stopped: "Detenido",
};

client.on("state", (state) => {
  document.body.dataset.state = state.state;
  const since = new Date(state.since).toLocaleTimeString();
  const down = state.state === "reconnecting" || (state.state === "connecting" && state.attempt > 0);
  let label = STATE_TEXT[state.state] || state.state;
  if (down) label = `Reconectando desde ${since} (intento ${state.attempt})`;
  $("state-text").textContent = label;
  $("banner-down").hidden = !down;
  $("down-since").textContent = `desde las ${since}`;
  $("server-transport").textContent = state.transport === "sse" ? "Server-Sent Events" : "WebSocket";
  if (state.state === "reconnecting" && state.attempt > 0) probeToken();
});

client.on("welcome", (welcome) => {
  $("banner-token").hidden = true;
  const replay = welcome.replay || {};
  if (replay.reset || replay.stream_changed || (page.stream && welcome.stream !== page.stream)) {
    remembered.seqs = [];
    clearList();
  }
  page.stream = welcome.stream;
  saveCards();
  // The replay and the open ones come as envelopes; what this page had before a reload does not.
  for (const seq of remembered.seqs) rebuildCard(seq);
  pollServer();
});

client.on("gap", (gap) => {
  if (gap.reason === "stream_changed" || gap.reason === "reset") $("banner-stream").hidden = false;
  if (gap.missed > 0) {
    page.missed += gap.missed;
    $("missed-text").textContent = `${page.missed} emergencias ya no están en el servidor y no se pueden recuperar: consulte a la central.`;
    $("banner-missed").hidden = false;
  }
});

client.on("emergency", (envelope) => {
  page.received += 1;
  $("count-seq").textContent = String(envelope.seq);
  soonPollServer();
  addCard(envelope, { alarm: true });
  notify(envelope);
});

// Still open, sent to a connection with no stored position (a new device, cleared storage):
// it rings unless it was acked on this device.
client.on("reopened", (envelope) => {
  if (!items.has(envelope.seq)) addCard(envelope, { alarm: !client.ackedHere(envelope.seq) });
});

client.on("status", (status) => {
  if (!items.has(status.seq)) return rebuildCard(status.seq);
  updateStatus(status.seq, (mine) => Object.assign(mine, status));
});
client.on("ack", (ack) =>
  updateStatus(ack.seq, (status) => {
    if (ack.by && !status.acked_by.includes(ack.by)) status.acked_by.push(ack.by);
    if (typeof ack.acked === "number") status.acked = ack.acked;
    if (typeof ack.delivered === "number") status.delivered = ack.delivered;
  }),
);
client.on("closed", (closed) =>
  updateStatus(closed.seq, (status) => {
    status.closed = true;
    status.close = closed.close;
  }),
);
client.on("unacked", (unacked) =>
  updateStatus(unacked.seq, (status) => {
    status.escalated = true;
    if (typeof unacked.delivered === "number") status.delivered = unacked.delivered;
  }),
);

// A connection refused before its welcome may be a wrong token (a browser does not show the 401
// to the page): ask over HTTP, at most every 30 s.
async function probeToken() {
  if (Date.now() - page.lastProbe < 30000) return;
  page.lastProbe = Date.now();
  try {
    const response = await fetch(`/emergencias?since=${client.position.lastSeq ?? 0}`, { method: "HEAD", headers: client.authHeaders() });
    $("banner-token").hidden = response.status !== 401;
  } catch {
    // The server is down: the down banner says so.
  }
}

// ---- the server's counters and the roster, polled -----------------------------------------

async function fetchJson(path) {
  const response = await fetch(path, { headers: client.authHeaders(), cache: "no-store" });
  if (!response.ok && response.status !== 503) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

async function pollServer() {
  // While the link is down the state and the banner say so; a fetch would only fail too.
  if (client.state.state !== "open") return;
  let health;
  try {
    health = await fetchJson("/healthz");
    $("count-clients").textContent = String(health.clients);
    $("count-seq").textContent = String(health.seq);
    $("server-storage").textContent = health.storage?.state === "failing" ? `FALLANDO (${health.storage.cause})` : health.storage?.state ?? "–";
    const history = health.history || {};
    $("server-history").textContent = history.count ? `${history.count} (#${history.first_seq}–#${history.last_seq})` : "vacío";
    $("server-started").textContent = health.started_at ? new Date(health.started_at).toLocaleString() : "–";
    $("server-version").textContent = health.version ?? "–";
  } catch {
    // Down: the state and the banner say so; the next poll tries again.
  }
  // A server without acknowledgements (older than the roster) has no /tablets.
  if (!health || !health.tablets) {
    $("roster").replaceChildren(rosterLine("Este servidor no informa las tablets.", "muted"));
    return;
  }
  try {
    renderRoster(await fetchJson("/tablets"));
  } catch {
    $("roster").replaceChildren(rosterLine("Sin datos de tablets.", "muted"));
  }
}

/// One poll shortly after a burst of emergencies, not one per emergency.
function soonPollServer() {
  if (page.soonPoll) return;
  page.soonPoll = setTimeout(() => {
    page.soonPoll = null;
    pollServer();
  }, 1000);
}

function rosterLine(label, className) {
  const li = document.createElement("li");
  li.textContent = label;
  if (className) li.className = className;
  return li;
}

function renderRoster(roster) {
  const tablets = Array.isArray(roster.tablets) ? roster.tablets : [];
  const lines = tablets.map((tablet) => {
    const seenSeq = tablet.last_acked_seq ? `, vio #${tablet.last_acked_seq}` : "";
    const detail = tablet.connected ? `conectada${tablet.connections > 1 ? ` ×${tablet.connections}` : ""}${seenSeq}` : "desconectada";
    const line = rosterLine(`${tablet.name}: ${detail}`, tablet.connected ? "connected" : "");
    line.dataset.name = tablet.name;
    return line;
  });
  if (!lines.length) lines.push(rosterLine("Sin tablets con nombre (tokens sin nombre).", "muted"));
  $("roster").replaceChildren(...lines);
  const unnamed = roster.unnamed_connections || 0;
  const minimum = roster.min_subscribers ? ` · mínimo requerido: ${roster.min_subscribers}` : "";
  $("roster-extra").textContent = `${unnamed} conexiones sin nombre${minimum}`;
}

// ---- wiring ------------------------------------------------------------------------------

// On the click, not the pointerdown: hiding the unlock banner moves the list up, and a tap whose
// press unlocked would then be released off the button it was meant for.
for (const type of ["click", "keydown"]) document.addEventListener(type, unlockAudio, { capture: true, passive: true });
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && page.audio) requestWakeLock();
});
$("missed-dismiss").addEventListener("click", () => ($("banner-missed").hidden = true));
$("stream-dismiss").addEventListener("click", () => ($("banner-stream").hidden = true));
$("token-open").addEventListener("click", () => $("token-input").focus());
$("notify-enable").addEventListener("click", async () => {
  await Notification.requestPermission().catch(() => {});
  describeDevice();
});
$("token-input").value = token;
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  saveToken($("token-input").value.trim());
  location.reload();
});

describeDevice();
refresh();
client.start();
pollServer();
setInterval(pollServer, POLL_MS);
window.resqConsole = { client, items };
