// What the Node peers share: their flags (resq-push's names), the JSON they send, the checks on a
// published body. Each envelope is built once, as one Buffer, and that Buffer is what every
// subscriber gets.
"use strict";

/** Largest accepted body, as resq-push's default --max-body-bytes. */
const MAX_BODY_BYTES = 64 * 1024;

/** Parses `--listen HOST:PORT --ping-interval S --pong-timeout S`; exits 2 on anything else. */
function parseArgs(name, argv) {
  const config = { host: "127.0.0.1", port: 8000, pingInterval: 30, pongTimeout: 10 };
  const fail = (message) => {
    console.error(`${name}: ${message}`);
    process.exit(2);
  };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) fail(`${flag} needs a value`);
    const seconds = () => {
      const s = Number(value);
      if (!(s > 0)) fail(`bad ${flag} ${value}`);
      return s;
    };
    if (flag === "--listen") {
      const at = value.lastIndexOf(":");
      config.host = value.slice(0, at).replace(/^\[|\]$/g, "");
      config.port = Number(value.slice(at + 1));
      if (!(at > 0 && Number.isInteger(config.port))) fail(`bad --listen ${value}`);
    } else if (flag === "--ping-interval") config.pingInterval = seconds();
    else if (flag === "--pong-timeout") config.pongTimeout = seconds();
    else fail(`unknown flag ${flag}`);
  }
  return config;
}

function welcome(clientId, seq, config) {
  return JSON.stringify({
    type: "connection",
    message: "Conectado! listo para recibir emergencias",
    client_id: clientId,
    seq,
    ping_interval_ms: Math.round(config.pingInterval * 1000),
    pong_timeout_ms: Math.round(config.pongTimeout * 1000),
  });
}

/**
 * Checks a published body and makes its envelope: `{error}` for a refusal, else `{envelope}`, a
 * Buffer holding the body byte for byte as `data`, as resq-push does.
 */
function envelopeOf(body, seq) {
  if (body.length > MAX_BODY_BYTES) return { status: 413, error: "body too large" };
  const text = body.toString("utf8");
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    return { status: 400, error: "invalid JSON" };
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    return { status: 400, error: "not a JSON object" };
  }
  const head = `{"type":"emergencia","seq":${seq},"received_at":"${new Date().toISOString()}","source":"http","data":`;
  return { envelope: Buffer.from(`${head}${text.trim()}}`) };
}

const accepted = (seq) => JSON.stringify({ ok: true, seq });
const refused = (error) => JSON.stringify({ ok: false, error });
const health = (clients, seq) => JSON.stringify({ status: "ok", clients, seq });

module.exports = { MAX_BODY_BYTES, parseArgs, welcome, envelopeOf, accepted, refused, health };
