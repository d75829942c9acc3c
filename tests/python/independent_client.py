#!/usr/bin/env python3
"""Drives a resq-push binary with an independent client: Python `websockets`, not tungstenite.

Usage: python3 tests/python/independent_client.py <path-to-resq-push-binary>

Starts the server on a free port with a Unix socket in a temp dir, then checks the welcome,
server pings, publishing over the Unix socket and HTTP, verbatim delivery, heartbeat texts,
?since= replay, acks (the broadcast, the status a resuming client is told), a client-side
close and shutdown on SIGTERM. Prints
`independent client: all checks passed` and exits 0, or prints what failed with the server's
stderr and exits 1. `cargo test --test independent_client` runs it.
"""

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from datetime import datetime, timezone

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

TIMEOUT = 5.0
ALL_CHECKS_TIMEOUT = 60.0
PING_INTERVAL = 0.2
PONG_TIMEOUT = 1.0
WELCOME_MESSAGE = "Conectado! listo para recibir emergencias"
PONG = '{"type":"pong"}'
LISTENING = re.compile(r"listening on (\S+):(\d+) ")
RECEIVED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


async def within(awaitable, what, timeout=TIMEOUT):
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise CheckFailed(f"timed out after {timeout} s waiting for {what}") from None


class Server:
    """The binary as a subprocess; a thread keeps draining its stderr so it never blocks."""

    def __init__(self, binary, tmp):
        self.socket_path = os.path.join(tmp, "resq.sock")
        args = [binary, "--listen", "127.0.0.1:0", "--unix-socket", self.socket_path,
                "--data-dir", os.path.join(tmp, "data"),
                "--ping-interval", str(PING_INTERVAL), "--pong-timeout", str(PONG_TIMEOUT)]
        self.proc = subprocess.Popen(
            args, env={**os.environ, "RUST_LOG": "info"}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
        self.lines = []
        self.port = None
        self.stream = None  # the history's id, from the first welcome
        self.listening = threading.Event()
        self.drainer = threading.Thread(target=self._drain, daemon=True)
        self.drainer.start()

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            match = LISTENING.search(line)
            if match and self.port is None:
                self.port = int(match.group(2))
                self.listening.set()
        self.listening.set()  # stderr ended: the server exited before it listened

    def wait_listening(self):
        self.listening.wait(TIMEOUT)
        check(self.port is not None, "the server did not log 'listening on 127.0.0.1:PORT '")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.drainer.join(2)

    def stderr(self):
        return "".join(self.lines)


class PingCounter(logging.Handler):
    """Counts the Ping frames websockets receives, from its debug log of incoming frames."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record):
        if record.getMessage().startswith("< PING"):
            self.count += 1

    def install(self):
        logger = logging.getLogger("websockets.client")
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self


# --- publishing (blocking sockets, run in a thread) ---------------------------------------------

def unix_publish(path, payload):
    """Sends `payload` in one sendall and returns one reply line per input line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        sock.sendall(payload)
        received = b""
        while received.count(b"\n") < payload.count(b"\n"):
            chunk = sock.recv(4096)
            check(chunk, f"the Unix socket closed after replying only {received!r}")
            received += chunk
    return received.decode().splitlines()


def http_request(port, method, path, body=None):
    """Returns (status, Content-Type, body text); error statuses are returned, not raised."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.headers.get("Content-Type"), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type"), error.read().decode()


class Emergencies:
    """What this script published, in seq order: (source, exact JSON text)."""

    def __init__(self):
        self.published = []

    def add(self, source, text):
        self.published.append((source, text))
        return len(self.published)

    def expected(self, seq):
        return (seq, *self.published[seq - 1])


def check_publish_reply(server, what, reply, seq, queued_to):
    """The reply names the stream, the seq and the counts: `delivered` may already count the
    tablets the emergency reached while the reply was on its way, no ack can have come yet."""
    try:
        parsed = json.loads(reply)
    except ValueError:
        raise CheckFailed(f"{what}: the reply is not JSON: {reply}") from None
    want = {"ok": True, "stream": server.stream, "seq": seq, "queued_to": queued_to, "acked": 0}
    delivered = parsed.pop("delivered", None)
    check(parsed == want, f"{what}: expected {want} and delivered, got {reply}")
    check(isinstance(delivered, int) and 0 <= delivered <= queued_to, f"{what}: delivered: {reply}")


async def publish_unix(server, emergencies, texts, queued_to):
    payload = "".join(text + "\n" for text in texts).encode()
    replies = await within(asyncio.to_thread(unix_publish, server.socket_path, payload),
                           "Unix socket replies")
    check(len(replies) == len(texts), f"expected {len(texts)} reply lines, got {replies}")
    for text, reply in zip(texts, replies):
        seq = emergencies.add("unix", text)
        check_publish_reply(server, f"Unix publish of {text}", reply, seq, queued_to)


async def publish_http(server, emergencies, text, queued_to):
    status, content_type, body = await within(
        asyncio.to_thread(http_request, server.port, "POST", "/emergencias", text.encode()),
        "the HTTP publish response")
    seq = emergencies.add("http", text)
    check(status == 202, f"POST /emergencias: expected 202, got {status} {body}")
    check(content_type == "application/json", f"POST /emergencias: Content-Type {content_type}")
    check_publish_reply(server, "POST /emergencias", body, seq, queued_to)


# --- WebSocket checks -----------------------------------------------------------------------------

async def receive_text(ws, what):
    frame = await within(ws.recv(), what)
    check(isinstance(frame, str), f"{what}: expected a text frame, got {frame!r}")
    return frame


async def open_client(server, query, seq, history, replay):
    """Connects, checks the welcome frame and returns (connection, client_id)."""
    url = f"ws://127.0.0.1:{server.port}/ws/emergencias{query}"
    ws = await within(connect(url, ping_interval=None, open_timeout=TIMEOUT,
                              close_timeout=TIMEOUT), f"the WebSocket handshake with {url}")
    welcome = json.loads(await receive_text(ws, "the welcome frame"))
    check(welcome.get("type") == "connection", f"welcome type: {welcome}")
    check(welcome.get("message") == WELCOME_MESSAGE, f"welcome message: {welcome}")
    check(welcome.get("seq") == seq, f"welcome seq: expected {seq}: {welcome}")
    check(welcome.get("history") == history, f"welcome history: expected {history}: {welcome}")
    check(welcome.get("replay") == replay, f"welcome replay: expected {replay}: {welcome}")
    check(welcome.get("ping_interval_ms") == round(PING_INTERVAL * 1000), f"ping_interval_ms: {welcome}")
    check(welcome.get("pong_timeout_ms") == round(PONG_TIMEOUT * 1000), f"pong_timeout_ms: {welcome}")
    client_id = welcome.get("client_id")
    check(isinstance(client_id, int) and client_id >= 1, f"welcome client_id: {welcome}")
    stream = welcome.get("stream")
    check(isinstance(stream, str) and stream, f"welcome stream: {welcome}")
    check(server.stream in (None, stream), f"the stream changed within one run: {welcome}")
    server.stream = stream
    return ws, client_id


async def expect_event(ws, emergencies, seq):
    seq, source, text = emergencies.expected(seq)
    raw = await receive_text(ws, f"emergency seq {seq}")
    check(f'"data":{text}' in raw, f"seq {seq}: data is not {text} byte for byte: {raw}")
    event = json.loads(raw)
    check(event.get("type") == "emergencia", f"seq {seq}: type: {raw}")
    check(event.get("seq") == seq, f"expected seq {seq} next, got: {raw}")
    check(event.get("source") == source, f"seq {seq}: expected source {source}: {raw}")
    check(event.get("data") == json.loads(text), f"seq {seq}: data: {raw}")
    received_at = event.get("received_at", "")
    check(RECEIVED_AT.fullmatch(received_at), f"seq {seq}: received_at not RFC 3339 UTC ms: {raw}")
    age = datetime.now(timezone.utc) - datetime.fromisoformat(received_at)
    check(abs(age.total_seconds()) < 60, f"seq {seq}: received_at is not now in UTC: {raw}")


async def check_stays_open_while_idle(ws, pings):
    """Sends nothing for 10 ping intervals: websockets' automatic pongs must keep it open."""
    before = pings.count
    await asyncio.sleep(10 * PING_INTERVAL)
    state = ws.protocol.state
    check(state is State.OPEN, f"not open after idling: {state.name}, {ws.protocol.close_rcvd}")
    seen = pings.count - before
    check(seen >= 5, f"expected about 10 server pings in {10 * PING_INTERVAL} s, saw {seen}")


async def check_heartbeat_texts(ws):
    for text in ("ping", '{"type":"ping"}'):
        await within(ws.send(text), f"sending {text}")
        reply = await receive_text(ws, f"the answer to {text}")
        check(reply == PONG, f"answer to {text}: expected {PONG}, got {reply}")


async def check_other_text_ignored(ws, server, emergencies):
    """`hello` gets no answer and does not end the session: the next frame is the next event."""
    await within(ws.send("hello"), "sending hello")
    await publish_unix(server, emergencies, ['{"id":4}'], queued_to=1)
    await expect_event(ws, emergencies, len(emergencies.published))


async def check_ack(ws, server, seq):
    """An ack is broadcast back once (a repeat is not), counted in GET /emergencias/{seq}."""
    for _ in range(2):
        await within(ws.send(json.dumps({"type": "ack", "seq": seq})), f"sending an ack of {seq}")
    await within(ws.send(json.dumps({"type": "ack", "seq": 999})), "sending an ack of an unknown seq")
    told = json.loads(await receive_text(ws, f"the ack broadcast of seq {seq}"))
    check(told.get("type") == "ack" and told.get("seq") == seq, f"expected the ack of {seq}: {told}")
    check(told.get("acked") == 1 and told.get("delivered") == 1, f"ack counts: {told}")
    check(str(told.get("by", "")).startswith("client-"), f"an unnamed tablet is its connection: {told}")
    await check_heartbeat_texts(ws)  # the repeat and the unknown seq: no broadcast, still open
    status, _, body = await asyncio.to_thread(http_request, server.port, "GET", f"/emergencias/{seq}")
    check(status == 200, f"GET /emergencias/{seq}: {status} {body}")
    counted = json.loads(body)["status"]
    check(counted["acked"] == 1 and counted["acked_by"] == [told["by"]], f"status of {seq}: {body}")


async def check_resume(server, emergencies, first, first_id, since):
    """A second client with ?since= gets the missed events oldest first, then the status of the
    open emergency it already had (acked), then live ones."""
    last = len(emergencies.published)
    history = {"first_seq": 1, "last_seq": last, "count": last}
    replay = {"since": since, "count": last - since, "missed": 0, "reset": False, "stream_changed": False}
    second, second_id = await open_client(server, f"?since={since}", last, history, replay)
    check(second_id > first_id, f"client ids: second {second_id} after first {first_id}")
    for seq in range(since + 1, last + 1):
        await expect_event(second, emergencies, seq)
    told = json.loads(await receive_text(second, "the status of seq 1"))
    check(told.get("type") == "status" and told.get("seq") == 1 and told.get("acked") == 1,
          f"expected the status of the acked seq 1 after the replay: {told}")
    await publish_unix(server, emergencies, ['{"id":5,"live":true}'], queued_to=2)
    await expect_event(second, emergencies, last + 1)
    await expect_event(first, emergencies, last + 1)
    return second


async def check_client_close(ws, server):
    await within(ws.close(), "the close handshake")
    code, reason = ws.protocol.close_code, ws.protocol.close_reason  # the server's Close frame
    check(code == 1000, f"close: expected the server to answer 1000, got {code} {reason!r}")
    deadline = time.monotonic() + TIMEOUT
    while True:
        status, _, body = await asyncio.to_thread(http_request, server.port, "GET", "/healthz")
        check(status == 200, f"GET /healthz: {status} {body}")
        if json.loads(body).get("clients") == 1:
            return
        check(time.monotonic() < deadline, f"the closed client is still counted: {body}")
        await asyncio.sleep(0.05)


async def check_shutdown(ws, server):
    """SIGTERM: the connected client gets 1001; the server exits 0 and removes its socket."""
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + TIMEOUT
    try:
        frame = await within(ws.recv(), "the close frame after SIGTERM")
        raise CheckFailed(f"expected a close after SIGTERM, got a frame: {frame!r}")
    except ConnectionClosed as closed:
        code = closed.rcvd.code if closed.rcvd else None
        check(code == 1001, f"after SIGTERM: expected close code 1001, got {code} ({closed})")
    await within(ws.wait_closed(), "the TCP close after the close handshake")
    try:
        status = await asyncio.to_thread(server.proc.wait, max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"the server did not exit within {TIMEOUT} s of SIGTERM") from None
    check(status == 0, f"the server exited with status {status} after SIGTERM")
    check(not os.path.exists(server.socket_path), "the server left its Unix socket file behind")


async def run_checks(server, pings):
    emergencies = Emergencies()
    empty = {"first_seq": 1, "last_seq": 0, "count": 0}
    first, first_id = await open_client(server, "", 0, empty, None)
    await check_stays_open_while_idle(first, pings)
    await publish_unix(server, emergencies, ['{"id":1,"texto":"incendio"}', '{"id": 2}'], 1)
    await publish_http(server, emergencies, '{"id":3}', 1)
    for seq in (1, 2, 3):
        await expect_event(first, emergencies, seq)
    await check_heartbeat_texts(first)
    await check_ack(first, server, 1)
    await check_other_text_ignored(first, server, emergencies)
    second = await check_resume(server, emergencies, first, first_id, since=1)
    await check_client_close(first, server)
    await check_shutdown(second, server)


def main():
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} <path-to-resq-push-binary>", file=sys.stderr)
        return 2
    pings = PingCounter().install()
    with tempfile.TemporaryDirectory(prefix="resq-push-") as tmp:
        server = None
        try:
            server = Server(sys.argv[1], tmp)
            server.wait_listening()
            asyncio.run(within(run_checks(server, pings), "all checks", ALL_CHECKS_TIMEOUT))
        except Exception as error:
            if server:
                server.stop()
            print(f"independent client: FAILED: {error}", file=sys.stderr)
            traceback.print_exc()
            if server:
                print(f"--- server stderr ---\n{server.stderr()}--- end ---", file=sys.stderr)
            return 1
        finally:
            if server:
                server.stop()
    print("independent client: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
