"""The listener, the nursery, and graceful shutdown.

One nursery holds the router task and, in a child nursery, one task per
TCP connection. Each connection task runs trio-websocket's reader beside
chatd's own ``Connection`` and is wrapped so that any exception ends that
connection alone, logged with its traceback: nothing a client sends can
stop the server (including trio-websocket's ping-during-close race, its
issue #184).
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass

import trio
from trio_websocket import WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection

from chatd.config import Config
from chatd.connection import Connection, make_connection
from chatd.limits import ConnectionLedger
from chatd.lobby import Lobby
from chatd.protocols import PROTOCOL_CLASSES
from chatd.protocols.base import Context, Protocol
from chatd.router import Router
from chatd.sessions import Sessions
from chatd.store import Store
from chatd.transport import DirectStream, release_handshake_state

log = logging.getLogger("chatd")


@dataclass(frozen=True)
class Mount:
    path: str
    protocol: type[Protocol]
    room: str
    ctx: Context


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store: Store | None = None
        self.router = Router()
        self.lobby = Lobby()
        self.lobby.install(self.router)
        #: Router services beside the lobby. Each has ``install(router)``;
        #: one with ``async run(task_status=...)`` gets a task in the server's
        #: nursery before the listener opens (cancelled last, after the
        #: router has drained), and ``async aclose()`` runs at shutdown.
        self.services: list = []
        self.connections: set[Connection] = set()
        self.mounts: dict[str, Mount] = {}
        self.ports: list[int] = []
        self.secrets: dict[str, str] = {}
        self.ledger = ConnectionLedger(
            config.max_connections, config.max_connections_per_ip,
            config.connect_rate_per_ip, config.connect_burst_per_ip)
        self._stopping = trio.Event()
        #: Set when ``run`` has finished (store closed).
        self.stopped = trio.Event()
        self._listen_scope = trio.CancelScope()
        self._keepalive_scope = trio.CancelScope()
        #: Handshakes under way, cancelled at shutdown.
        self._handshakes: set[trio.CancelScope] = set()

    # --- lifecycle -------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop accepting, close every client with 1001, then return from run()."""
        self._stopping.set()

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        self.store = Store(config.store)
        if any(e.protocol == "gradagenda" for e in config.mounted()):
            self.services.append(Sessions(self.store))
        try:
            self._resolve_secrets()
            self._mount()
            listeners = await self._listen()
            async with trio.open_nursery() as nursery:
                for service in self.services:
                    service.install(self.router)
                    if hasattr(service, "run"):
                        await nursery.start(service.run)
                await nursery.start(self.router.run)
                async with trio.open_nursery() as connections:
                    connections.start_soon(self._serve, listeners, connections)
                    if config.ping_interval > 0:
                        connections.start_soon(self._keepalive, connections)
                    self._log_start(listeners)
                    task_status.started(self)
                    await self._stopping.wait()
                    log.info("shutting down: closing %d connections", len(self.connections))
                    self._listen_scope.cancel()
                    self._keepalive_scope.cancel()
                    for handshake in list(self._handshakes):
                        handshake.cancel()
                    for connection in list(self.connections):
                        connection.client.kill(1001, "server shutdown")
                    connections.cancel_scope.deadline = trio.current_time() + config.shutdown_timeout
                self.router.close()
                with trio.move_on_after(config.shutdown_timeout):
                    await self.router.closed.wait()
                    for service in self.services:
                        if hasattr(service, "aclose"):
                            await service.aclose()
                nursery.cancel_scope.cancel()
        finally:
            self.store.close()
            self.stopped.set()
            log.info("stopped")

    async def _keepalive(self, nursery: trio.Nursery) -> None:
        """Ping every connection silent for ``ping-interval``: one sweeping
        task for the server, not one sleeping task per connection."""
        interval = self.config.ping_interval
        with self._keepalive_scope:
            while True:
                await trio.sleep(interval / 2)
                now = trio.current_time()
                for connection in self.connections:
                    if not connection.pinging and now - connection.last_heard >= interval:
                        connection.pinging = True
                        nursery.start_soon(connection.ping)

    async def _serve(self, listeners: list[trio.abc.Listener], nursery: trio.Nursery) -> None:
        with self._listen_scope:
            await trio.serve_listeners(self._handle_stream, listeners, handler_nursery=nursery)

    # --- one connection --------------------------------------------------------

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        ip, peer = _peer_address(stream)
        refusal = self.ledger.admit(ip, trio.current_time())
        if refusal is not None and not self.ledger.hold_refusal(ip):
            # Already answering as many refusals for this address as it may
            # have connections: drop this one without a word.
            await trio.aclose_forcefully(stream)
            return
        socket_stream = getattr(stream, "transport_stream", stream)
        if isinstance(socket_stream, trio.SocketStream):
            # Reap half-open TCP connections even where pings are off.
            socket_stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if isinstance(stream, trio.SocketStream):
            stream = DirectStream(stream)
        try:
            async with trio.open_nursery() as nursery:
                connection = WebSocketConnection(
                    stream, WSConnection(ConnectionType.SERVER), message_queue_size=4,
                    max_message_size=self.config.max_frame_bytes, receive_buffer_size=None)
                # Waiting for the upgrade request ends when it comes, when
                # handshake-timeout passes, at shutdown, or when the reader
                # gives up on bad TLS or HTTP (it then never comes).
                # A refused client gets a short wait: it only earns a 429/503.
                timeout = self.config.handshake_timeout
                handshake = trio.move_on_after(timeout if refusal is None else min(timeout, 1.0))

                async def read() -> None:
                    try:
                        await connection._reader_task()
                    finally:
                        handshake.cancel()

                nursery.start_soon(read)
                request = None
                with handshake:
                    self._handshakes.add(handshake)
                    if self._stopping.is_set():
                        handshake.cancel()
                    request = await connection._get_request()
                self._handshakes.discard(handshake)
                if request is None:
                    log.info("%s no WebSocket handshake", peer)
                elif refusal is not None:
                    log.warning("%s refused with %d: %s", peer, refusal.status, refusal.reason)
                    await request.reject(refusal.status, body=refusal.reason.encode() + b"\n")
                else:
                    await self._handle_request(request, peer, nursery)
                nursery.cancel_scope.cancel()
        except Exception:
            log.exception("%s connection failed", peer)
        finally:
            if refusal is None:
                self.ledger.release(ip)
            else:
                self.ledger.release_refusal(ip)
            await trio.aclose_forcefully(stream)

    def _origin_allowed(self, request: WebSocketRequest) -> bool:
        origin = next((value.decode("latin-1") for name, value in request.headers
                       if name.lower() == b"origin"), None)
        if origin is None:
            return not self.config.require_origin
        allowed = self.config.allowed_origins
        return allowed is None or origin in allowed

    async def _handle_request(self, request: WebSocketRequest, peer: str,
                              nursery: trio.Nursery) -> None:
        path = request.path.partition("?")[0]
        mount = self.mounts.get(path)
        if mount is None:
            log.info("%s rejected: no endpoint at %s", peer, path)
            await request.reject(404, body=b"no chat endpoint at this path\n")
            return
        if not self._origin_allowed(request):
            log.warning("%s refused with 403: origin not allowed", peer)
            await request.reject(403, body=b"origin not allowed\n")
            return
        ws = await request.accept()
        release_handshake_state(ws)
        connection, client = make_connection(ws, mount.protocol, mount.ctx, mount.room, peer,
                                             path, self.router, self.config)
        log.info("%s connected to %s (%s)", peer, path, mount.protocol.name)
        self.connections.add(connection)
        if self._stopping.is_set():
            client.kill(1001, "server shutdown")
        try:
            await connection.run(nursery)
        finally:
            self.connections.discard(connection)

    # --- set-up --------------------------------------------------------------

    def _resolve_secrets(self) -> None:
        """Secrets the config leaves out are generated once and kept in the store."""
        config = self.config
        protocols = {e.protocol for e in config.mounted()}
        needed = {"secret-key": "multichat" in protocols,
                  "jwt-secret": "gradagenda" in protocols}
        for key, wanted in needed.items():
            value = getattr(config, key.replace("-", "_"))
            if value is None and wanted:
                value, new = self.store.secret(key)
                log.info("%s %s (kept in %s): %s", "generated" if new else "stored",
                         key, config.store, value)
            if value is not None:
                self.secrets[key] = value

    def _mount(self) -> None:
        config = self.config
        for endpoint in config.mounted():
            ctx = Context(room=endpoint.room,
                          secret_key=self.secrets.get("secret-key"),
                          jwt_secret=self.secrets.get("jwt-secret"),
                          jwt_configured=config.jwt_secret is not None,
                          max_frame_bytes=config.max_frame_bytes)
            self.mounts[endpoint.path] = Mount(endpoint.path, PROTOCOL_CLASSES[endpoint.protocol],
                                               endpoint.room, ctx)

    async def _listen(self) -> list[trio.abc.Listener]:
        host, port = self.config.bind
        listeners: list[trio.abc.Listener] = list(await trio.open_tcp_listeners(port, host=host))
        self.ports = [listener.socket.getsockname()[1] for listener in listeners]
        if self.config.wss is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.config.wss.certfile, self.config.wss.keyfile)
            listeners = [trio.SSLListener(listener, context, https_compatible=True)
                         for listener in listeners]
        return listeners

    @property
    def port(self) -> int:
        return self.ports[0]

    def _log_start(self, listeners: list[trio.abc.Listener]) -> None:
        scheme = "wss" if self.config.wss else "ws"
        host, _ = self.config.bind
        shown = f"[{host}]" if host and ":" in host else (host or "0.0.0.0")
        mounts = ", ".join(f"{m.path} {m.protocol.name}"
                           + ("" if m.protocol.name == "gradagenda" else f" (room {m.room})")
                           for m in self.mounts.values())
        log.info("chatd listening on %s://%s:%d; endpoints: %s", scheme, shown, self.port, mounts)
        if self.config.allowed_origins is None:
            log.warning("allowed-origins is not set: any web page can open a WebSocket "
                        "to chatd (docs/security.md)")


def _peer_address(stream: trio.abc.Stream) -> tuple[str, str]:
    """The client's IP, and ``IP:PORT`` for the logs."""
    inner = getattr(stream, "transport_stream", stream)
    try:
        host, port = inner.socket.getpeername()[:2]
    except (AttributeError, OSError):
        return "?", "?"
    return host, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
