#!/usr/bin/env python3
"""A wss:// client in Python's `websockets`, trusting only the CA it is given (tests/tls.rs).

Usage: python3 tests/python/wss_listen.py URL CA_FILE

Connects with an ssl context that trusts CA_FILE alone (not the system's CAs) and checks the
host name, then prints every text message it receives on a line of its own, flushed, until the
connection closes: then `closed CODE`. A failed connection prints `failed: REASON` and exits 1.
"""

import asyncio
import ssl
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def listen(url, ca_file):
    context = ssl.create_default_context(cafile=ca_file)
    try:
        async with connect(url, ssl=context, ping_interval=None, open_timeout=10) as ws:
            try:
                async for message in ws:
                    print(message, flush=True)
            except ConnectionClosed:
                pass
            print(f"closed {ws.close_code}", flush=True)
    except (OSError, ssl.SSLError, asyncio.TimeoutError) as error:
        print(f"failed: {error}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(listen(sys.argv[1], sys.argv[2]))
