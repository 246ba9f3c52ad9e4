"""A minimal multichat server on the `websockets` library, for comparison.

It is one of the yardsticks chatd's fan-out is measured against
(``scripts/bench_peers.py``; the other is the Node ``ws`` peer in
``scripts/peers/node_ws/``, which behaves alike): the multichat protocol
only, the way a careful small asyncio server would do it. ``register`` with the shared
secret must come first (else close 1008); each ``client-message`` goes to
every other registered client as one ``forwarding-message``, framed once
and written to all of them by ``websockets.broadcast()``, which writes
synchronously and buffers what a socket cannot take at once.

    python scripts/peer_server.py --port 8766 --secret-key s3cret

It prints ``listening on ws://HOST:PORT`` once it accepts connections and
stops on SIGINT/SIGTERM. Needs ``pip install websockets`` (the ``bench``
extra).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import signal
import sys

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

# Like chatd's default: a frame over 4 KB closes the connection with 1009.
MAX_FRAME_BYTES = 4096


class MultichatPeer:
    """Registered clients and the broadcast between them."""

    def __init__(self, secret_key: str) -> None:
        self.secret_key = secret_key.encode()
        self.registered: set[ServerConnection] = set()

    async def handle(self, ws: ServerConnection) -> None:
        try:
            name = self._register(await ws.recv())
        except ConnectionClosed:
            return
        if name is None:
            await ws.close(1008, "first frame must be a valid register")
            return
        await ws.send('{"action":"register-ack"}')
        self.registered.add(ws)
        try:
            async for message in ws:
                self._forward(ws, name, message)
        except ConnectionClosed:
            pass
        finally:
            self.registered.discard(ws)

    def _register(self, message: str | bytes) -> str | None:
        try:
            frame = json.loads(message)
        except ValueError:
            return None
        if not isinstance(frame, dict) or frame.get("action") != "register":
            return None
        name, secret = frame.get("client-name"), frame.get("secret-key")
        if not (isinstance(name, str) and name and isinstance(secret, str)):
            return None
        if not hmac.compare_digest(secret.encode(), self.secret_key):
            return None
        return name

    def _forward(self, sender: ServerConnection, name: str, message: str | bytes) -> None:
        try:
            frame = json.loads(message)
        except ValueError:
            return  # ignored, as multichat does after registration
        if not isinstance(frame, dict) or frame.get("action") != "client-message":
            return
        content = frame.get("content")
        if not isinstance(content, str) or not content:
            return
        out = json.dumps({"action": "forwarding-message", "source-client-name": name,
                          "content": content}, separators=(",", ":"))
        broadcast((c for c in self.registered if c is not sender), out)


async def main(host: str, port: int, secret_key: str) -> None:
    peer = MultichatPeer(secret_key)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    # compression=None: chatd negotiates no extension either, so both
    # servers write the same bytes.
    async with serve(peer.handle, host, port, max_size=MAX_FRAME_BYTES, compression=None,
                     backlog=4096) as server:
        bound = server.sockets[0].getsockname()
        print(f"listening on ws://{bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766, help="0 picks a free port")
    parser.add_argument("--secret-key", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port, args.secret_key))
