// resq-bench's Node `ws` peer: the subset of resq-push's protocol that resq-bench uses, on Node's
// http server and the `ws` package, a Set of clients that each get the envelope's one Buffer, and
// pings by one setInterval sweep. No history, no storage, no auth, HTTP ingest only: see
// ../README.md.
//
//   node bench/peers/ws/server.js [--listen 127.0.0.1:8000] [--ping-interval 30] [--pong-timeout 10]
"use strict";

const http = require("http");
const { WebSocketServer } = require("ws");
const common = require("../common.js");

const config = common.parseArgs("resq-peer-ws", process.argv.slice(2));
/** Bytes a subscriber may have queued before it is closed (it then reconnects). */
const MAX_BUFFERED = 1024 * 1024;

let seq = 0;
let nextClient = 1;
const clients = new Set();

const json = (res, status, body) => {
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
  res.end(body);
};

const server = http.createServer((req, res) => {
  const url = req.url.split("?")[0];
  if (req.method === "GET" && url === "/healthz") return json(res, 200, common.health(clients.size, seq));
  if (req.method !== "POST" || url !== "/emergencias") return json(res, 404, common.refused("not found"));
  const chunks = [];
  let size = 0;
  req.on("data", (chunk) => {
    size += chunk.length;
    if (size <= common.MAX_BODY_BYTES) chunks.push(chunk);
  });
  req.on("end", () => {
    const body = size > common.MAX_BODY_BYTES ? Buffer.alloc(size) : Buffer.concat(chunks);
    const made = common.envelopeOf(body, seq + 1);
    if (made.error) return json(res, made.status, common.refused(made.error));
    seq += 1;
    for (const ws of clients) {
      if (ws.bufferedAmount > MAX_BUFFERED) ws.terminate();
      else ws.send(made.envelope, { binary: false });
    }
    json(res, 202, common.accepted(seq));
  });
});

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 16 * 1024, clientTracking: false });
server.on("upgrade", (req, socket, head) => {
  if (req.url.split("?")[0] !== "/ws/emergencias") {
    socket.end("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    ws.alive = true;
    ws.on("pong", () => {
      ws.alive = true;
    });
    ws.on("close", () => clients.delete(ws));
    ws.on("error", () => {});
    ws.send(common.welcome(nextClient++, seq, config));
    clients.add(ws);
  });
});

// One timer for every socket: a socket that has not answered the previous sweep's ping is dropped.
setInterval(() => {
  for (const ws of clients) {
    if (!ws.alive) {
      ws.terminate();
      continue;
    }
    ws.alive = false;
    ws.ping();
  }
}, config.pingInterval * 1000);

server.keepAliveTimeout = 60 * 1000;
server.on("error", (error) => {
  console.error(`resq-peer-ws: ${error.message}`);
  process.exit(1);
});
server.listen(config.port, config.host, () => {
  console.error(`resq-peer-ws: listening on ${config.host}:${config.port}`);
});

for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => process.exit(0));
