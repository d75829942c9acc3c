#!/usr/bin/env python3
"""Watch a resq-push stream from a shell: prints each WebSocket message, one JSON object a line.

Python 3 standard library only, so it runs on a fresh board. Answers the server's pings, so it
can stay connected for as long as you like. The Debian package installs it as
/usr/share/resq-push/listen.py.

    python3 /usr/share/resq-push/listen.py                              # ws://127.0.0.1:8000/ws/emergencias
    python3 /usr/share/resq-push/listen.py 'ws://127.0.0.1:8000/ws/emergencias?since=0&token=T'
    python3 listen.py --emergencies 1 --timeout 20 URL   # exit 0 after one emergency, 1 on timeout
    python3 listen.py --cacert /etc/resq-push/tls/ca.crt 'wss://BOARD:8443/ws/emergencias?token=T'

wss:// trusts the system's CAs, or only --cacert's (the site CA), and checks the host name.

Exit status: 0 after --emergencies emergencies (or on a close when none were asked for),
1 on a timeout, a refused upgrade or a close before enough emergencies arrived.
"""

import argparse
import base64
import hashlib
import os
import socket
import ssl
import struct
import sys
import time
import urllib.parse

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="ws://127.0.0.1:8000/ws/emergencias")
    parser.add_argument("--emergencies", type=int, default=0, help="exit 0 after this many emergencies")
    parser.add_argument("--timeout", type=float, default=0, help="give up (exit 1) after this many seconds")
    parser.add_argument("--cacert", help="for wss://: trust only this CA file (the site CA)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout if args.timeout else None

    url = urllib.parse.urlsplit(args.url)
    if url.scheme not in ("ws", "wss"):
        sys.exit("only ws:// and wss:// URLs")
    host = url.hostname or "127.0.0.1"
    port = url.port or (443 if url.scheme == "wss" else 80)
    path = (url.path or "/") + ("?" + url.query if url.query else "")

    sock = socket.create_connection((host, port), timeout=10)
    if url.scheme == "wss":
        context = ssl.create_default_context(cafile=args.cacert)
        try:
            sock = context.wrap_socket(sock, server_hostname=host)
        except (ssl.SSLError, OSError) as error:
            fail(f"TLS handshake failed: {error}")
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + f"{host}:{port}".encode()
        + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key
        + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    reader = Reader(sock, deadline)
    head = reader.until(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        body = reader.buffer.decode(errors="replace")
        fail(f"upgrade refused: {status.decode(errors='replace')} {body}")
    expected = base64.b64encode(hashlib.sha1(key + GUID).digest())
    if b"sec-websocket-accept: " + expected.lower() not in head.lower():
        fail("bad Sec-WebSocket-Accept")

    seen = 0
    fragments, fragment_opcode = b"", 0
    while True:
        fin, opcode, payload = read_frame(reader)
        if opcode == 0x9:  # ping: answer with a masked pong of the same payload
            sock.sendall(frame(0xA, payload))
        elif opcode == 0x8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            print(f"closed by server: {code} {payload[2:].decode(errors='replace')}", file=sys.stderr)
            sys.exit(1 if args.emergencies else 0)
        elif opcode in (0x0, 0x1, 0x2):
            if opcode:
                fragments, fragment_opcode = b"", opcode
            fragments += payload
            if not fin:
                continue
            if fragment_opcode == 0x1:
                text = fragments.decode()
                print(text, flush=True)
                if '"type":"emergencia"' in text:
                    seen += 1
                    if args.emergencies and seen >= args.emergencies:
                        sock.sendall(frame(0x8, struct.pack("!H", 1000)))
                        return


class Reader:
    def __init__(self, sock, deadline):
        self.sock, self.deadline, self.buffer = sock, deadline, b""

    def fill(self):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                fail("timed out")
            self.sock.settimeout(left)
        else:
            self.sock.settimeout(None)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            fail("timed out")
        if not chunk:
            fail("connection closed without a close frame")
        self.buffer += chunk

    def until(self, marker):
        while marker not in self.buffer:
            self.fill()
        found, self.buffer = self.buffer.split(marker, 1)
        return found

    def take(self, n):
        while len(self.buffer) < n:
            self.fill()
        found, self.buffer = self.buffer[:n], self.buffer[n:]
        return found


def read_frame(reader):
    first, second = reader.take(2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", reader.take(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", reader.take(8))[0]
    mask = reader.take(4) if second & 0x80 else None
    payload = reader.take(length)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bool(first & 0x80), first & 0x0F, payload


def frame(opcode, payload):
    """A client frame: always masked (RFC 6455 5.3)."""
    mask = os.urandom(4)
    header = bytes([0x80 | opcode, 0x80 | len(payload)])  # control frames are under 126 bytes
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def fail(message):
    print(f"listen.py: {message}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
