// resq-bench's uWebSockets peer (uWebSockets.js v20.30, the C++ server as a Node addon): the
// subset of resq-push's protocol that resq-bench uses, with uWS pub/sub (`app.publish`: one frame
// for every subscriber) and its automatic pings. No history, no storage, no auth, HTTP ingest only:
// see ../README.md.
//
//   node bench/peers/uws/server.js [--listen 127.0.0.1:8000] [--ping-interval 30] [--pong-timeout 10]
"use strict";

const path = require("path");
const common = require("../common.js");

// The native addon itself, never the package's entry (src/uws.js), which falls back to a pure-JS
// imitation on ws when the addon does not load: that fallback must never stand in for uWS here.
const ADDON = path.join(
  __dirname,
  "../node_modules/@trufflesuite/uws-js-unofficial/dist",
  `uws_${process.platform}_${process.arch}_${process.versions.modules}.node`,
);
let uWS;
try {
  uWS = require(ADDON);
} catch (error) {
  console.error(`resq-peer-uws: cannot load the uWebSockets.js addon ${ADDON}: ${error.message}`);
  console.error("resq-peer-uws: run `npm ci` in bench/peers (Node 20, glibc, x64 or arm64)");
  process.exit(1);
}
if (typeof uWS.App !== "function" || typeof uWS.us_listen_socket_close !== "function") {
  console.error(`resq-peer-uws: ${ADDON} is not the uWebSockets.js addon`);
  process.exit(1);
}

const config = common.parseArgs("resq-peer-uws", process.argv.slice(2));
const TOPIC = "emergencias";
/** Bytes a subscriber may have queued before it is closed (it then reconnects), not skipped. */
const MAX_BACKPRESSURE = 1024 * 1024;

// uWS checks sockets on a 4 s tick. With automatic pings it pings a socket that received nothing
// for `idleTimeout - margin` seconds and closes it if nothing (the pong) comes within `margin`
// (4 s here). So pings come every 4-8 s for --ping-interval 5, never more often than every 4 s.
const idleTimeout = Math.max(8, 4 * Math.round(config.pingInterval / 4) + 4);

let seq = 0;
let nextClient = 1;
let clients = 0;

const app = uWS.App();
app.ws("/ws/emergencias", {
  compression: uWS.DISABLED,
  maxPayloadLength: 16 * 1024,
  maxBackpressure: MAX_BACKPRESSURE,
  closeOnBackpressureLimit: true,
  idleTimeout,
  sendPingsAutomatically: true,
  open: (ws) => {
    clients += 1;
    ws.send(common.welcome(nextClient++, seq, config), false);
    // Subscribed after the welcome within one callback: nothing is published in between.
    ws.subscribe(TOPIC);
  },
  message: () => {},
  close: () => {
    clients -= 1;
  },
});

app.post("/emergencias", (res) => {
  const chunks = [];
  let size = 0;
  let aborted = false;
  res.onAborted(() => {
    aborted = true;
  });
  res.onData((chunk, isLast) => {
    // uWS reuses the chunk's memory after the callback: copy it.
    size += chunk.byteLength;
    if (size <= common.MAX_BODY_BYTES) chunks.push(Buffer.from(chunk.slice(0)));
    if (!isLast || aborted) return;
    const body = size > common.MAX_BODY_BYTES ? Buffer.alloc(size) : Buffer.concat(chunks);
    const made = common.envelopeOf(body, seq + 1);
    res.cork(() => {
      if (made.error) {
        const reason = made.status === 413 ? "Payload Too Large" : "Bad Request";
        res.writeStatus(`${made.status} ${reason}`).writeHeader("Content-Type", "application/json");
        res.end(common.refused(made.error));
        return;
      }
      seq += 1;
      app.publish(TOPIC, made.envelope, false);
      res.writeStatus("202 Accepted").writeHeader("Content-Type", "application/json");
      res.end(common.accepted(seq));
    });
  });
});

app.get("/healthz", (res) => {
  res.writeHeader("Content-Type", "application/json").end(common.health(clients, seq));
});

app.any("/*", (res) => {
  res.writeStatus("404 Not Found").end(common.refused("not found"));
});

let listenSocket = null;
app.listen(config.host, config.port, (socket) => {
  if (!socket) {
    console.error(`resq-peer-uws: cannot listen on ${config.host}:${config.port}`);
    process.exit(1);
  }
  listenSocket = socket;
  console.error(`resq-peer-uws: listening on ${config.host}:${config.port} (addon ${path.basename(ADDON)}, idleTimeout ${idleTimeout} s)`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    if (listenSocket) uWS.us_listen_socket_close(listenSocket);
    process.exit(0);
  });
}
