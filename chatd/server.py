"""The listener, the nursery, and graceful shutdown.

One nursery holds the router task (and its services) and, in a child
nursery, one task per TCP connection. A connection task takes the socket
from accept to close:

1. limits: the total cap and, for a peer that is not a trusted proxy, the
   per-address limits (``chatd.limits``);
2. behind a trusted proxy, the PROXY protocol header (``proxy-protocol``)
   and ``X-Forwarded-For`` / ``X-Real-IP`` name the client, whose address
   is then the one logged, limited and counted (``chatd.proxy``);
3. the HTTP request head (``chatd.handshake``): a plain GET is answered by
   ``chatd.http``; an upgrade is routed by path, checked (RFC 6455), its
   Origin checked, and accepted with 101;
4. the WebSocket connection itself (``chatd.connection``).

Anything a client sends ends, at worst, its own connection, logged; the
server keeps serving.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import resource
import socket
from dataclasses import dataclass

import trio

from chatd.api import Api
from chatd.broker import Broker, LocalBroker, generated_node_id, open_broker
from chatd.outbox import Flusher
from chatd.cluster import Cluster
from chatd.config import SPARE_FILES, Config, ConfigError, check_cluster, tls_context
from chatd.connection import Connection
from chatd.handshake import (
    BadRequest, HeadReader, HttpRequest, Refusal, Route, accept_response, decide,
    refusal_response,
)
from chatd.http import Routes
from chatd.marks import Marks
from chatd.media import Media
from chatd.limits import ConnectionLedger
from chatd.logs import ClientSource, client_lines, client_source, report_suppressed
from chatd.lobby import Lobby
from chatd.metrics import Metrics
from chatd.moderation import Moderation
from chatd import parking
from chatd.parking import Parking
from chatd.protocols import PROTOCOL_CLASSES
from chatd.protocols.base import Context, Protocol
from chatd.proxy import Address, ProxyHeaderError, forwarded_address, in_networks, parse_networks
from chatd.proxy import parse_proxy_header, proxy_header_length
from chatd.router import Router, Service
from chatd.sessions import Sessions
from chatd.store import Store, StoreError, open_store
from chatd.transport import Transport

log = logging.getLogger("chatd")

#: Seconds a refused client gets to send its request: it only earns a 4xx.
_REFUSAL_WAIT = 1.0
#: Most connections accepted per wake-up of a listener (then others run).
#: Measured at a storm of 5,000/s (docs/performance.md): 1 → 341 µs of
#: CPU per connection, 4 → 266-280 µs, 16 → 285 µs, 64 → 482 µs (a large
#: batch lets more handshakes than chatd can finish pile up at once).
_ACCEPT_BATCH = 4
#: accept(2) failures that mean "out of descriptors or memory": wait, retry.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
#: accept(2) failures about one connection that went away: take the next.
_ACCEPT_SKIP_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
_ACCEPT_RETRY = 0.1
#: trio's accept loop's logger, kept for chatd's own: ``chatd.logs`` turns
#: its out-of-descriptors errors into one warning every 10 s.
_accept_log = logging.getLogger("trio.serve_listeners")


class StartupError(RuntimeError):
    """chatd cannot start; the message is one line for the operator."""


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
        self.metrics = Metrics()
        self.flusher = Flusher(self.metrics.deliveries, config.outbox_size)
        self.router = Router(self.flusher)
        self.metrics.queue_depth = lambda: self.router.queued
        #: Cross-node traffic (``chatd.broker``): in-process until ``run``
        #: opens the configured one; ``cluster`` is its router service.
        self.broker: Broker = LocalBroker()
        self.lobby: Lobby | None = None
        self.cluster: Cluster | None = None
        self.media: Media | None = None  # GradAgenda images and voice clips (issue 23)
        #: The router's services (``chatd.router.Service``), made by ``run``
        #: once the broker and the store are open, installed in this order.
        self.services: list[Service] = []
        self.connections: set[Connection] = set()
        self.mounts: dict[str, Mount] = {}
        self.ports: list[int] = []
        self.admin_ports: list[int] = []
        self.secrets: dict[str, str] = {}
        self.trusted = parse_networks(config.trusted_proxies)
        #: ``max-connections`` in effect (unset: what the open-file limit allows).
        self.max_connections = config.connection_cap(_open_file_limit())
        self.ledger = ConnectionLedger(
            self.max_connections, config.max_connections_per_ip,
            config.connect_rate_per_ip, config.connect_burst_per_ip,
            exempt=parse_networks(config.limits_exempt))
        separate_admin = config.admin_host is not None
        self.routes = Routes(admin=not separate_admin, web_path=config.web_client_path,
                             ready=self.ready, metrics=self.metrics)
        self.admin_routes = Routes(admin=True, web_path=None, ready=self.ready,
                                   metrics=self.metrics) if separate_admin else None
        self._stopping = trio.Event()
        #: Set when ``run`` has finished (store closed).
        self.stopped = trio.Event()
        self._listen_scopes: list[trio.CancelScope] = []
        self._keepalive_scope = trio.CancelScope()
        #: Handshakes under way, cancelled at shutdown.
        self._handshakes: set[trio.CancelScope] = set()
        self._spawn = None
        #: Called when a connection's task ends: one bound method for all.
        self._on_end = self._ended
        #: Idle connections waiting without a task (``chatd.parking``).
        self._parking: Parking | None = None
        #: The TLS context of ``wss`` (chatd terminates TLS), or None.
        self._tls = None
        self._shutdown_deadline = float("inf")
        # Moderation and the server API (issue 22): set up in ``run``.
        self.moderation: Moderation | None = None
        self.api: Api | None = None

    # --- lifecycle -------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop accepting, close every client (``shutdown-close-code``), then
        return from run()."""
        self._stopping.set()

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        # Listen first: a taken port is reported before anything else happens.
        listeners = await self._listen(config.bind, tls=True)
        admin_listeners = []
        if config.admin_host is not None:
            admin_listeners = await self._listen(config.admin_bind, tls=False)
            self.admin_ports = _ports(admin_listeners)
        self.ports = _ports(listeners)
        try:
            check_cluster(config)
            node = config.node_id or generated_node_id()
            self.broker = open_broker(config.broker, node)
        except (ValueError, RuntimeError) as exc:
            _close_listeners(listeners + admin_listeners)
            raise StartupError(str(exc)) from None
        rooms = {e.room for e in config.mounted() if e.protocol != "gradagenda"}
        self.lobby = Lobby(self.broker, rooms)
        self.services.append(self.lobby)
        try:
            # Blocking: connecting to PostgreSQL, or waiting out a locked file.
            self.store = await trio.to_thread.run_sync(functools.partial(
                open_store, config.store, busy_timeout=config.store_busy_timeout))
        except StoreError as exc:
            _close_listeners(listeners + admin_listeners)
            raise StartupError(str(exc)) from None
        sessions = None
        if any(e.protocol == "gradagenda" for e in config.mounted()):
            sessions = Sessions(self.store, max_sessions_per_user=config.max_sessions_per_user,
                                max_groups_per_user=config.max_groups_per_user,
                                max_members_per_session=config.max_members_per_session,
                                max_messages_per_user_per_session=(
                                    config.max_messages_per_user_per_session),
                                broker=self.broker,
                                on_commit=self.metrics.commit_seconds.observe)
            self.services.append(sessions)
            self.services.append(Marks(sessions, config.marks_flush_ms))  # issue 23
            self.media = Media(sessions, secret=lambda: self.secrets.get("jwt-secret"),
                               leeway=config.jwt_leeway, max_bytes=config.media_max_bytes,
                               quota=config.media_quota_bytes,
                               banned=lambda user, ip: self.moderation.user_refusal(user, ip)
                               if self.moderation is not None else None)
        # Moderation (issue 22): guards the others' handlers.
        self.moderation = Moderation(self, config.retention_count, config.retention_age,
                                     config.retention_interval)
        self.services.append(self.moderation)
        self.metrics.registry.register(self.moderation)
        if self.broker.shared:
            # Last: it dispatches other nodes' items to the services above.
            self.cluster = Cluster(self.broker, list(self.services), self.lobby.heartbeat)
            self.services.append(self.cluster)
            self.metrics.registry.register(self.cluster)
            if sessions is not None:
                self.metrics.registry.register(sessions)
        try:
            await self._resolve_secrets()
            await self._start_api()  # issue 22
            self._mount()
            async with trio.open_nursery() as nursery:
                for service in self.services:
                    service.install(self.router)
                    await nursery.start(service.run)
                await nursery.start(self.router.run)
                async with trio.open_nursery() as connections:
                    self._spawn = connections.start_soon
                    if parking.AVAILABLE:
                        self._parking = Parking(self._spawn)
                        connections.start_soon(self._park_idle)
                    self._serve(listeners, self._handle_stream, connections)
                    self._serve(admin_listeners, self._handle_admin, connections)
                    if config.ping_interval > 0:
                        connections.start_soon(self._keepalive)
                    connections.start_soon(self._report_suppressed)
                    self._log_start()
                    task_status.started(self)
                    await self._stopping.wait()
                    self._close_all(connections)
                self.router.close()
                # One deadline for the whole shutdown, set when it began.
                with trio.move_on_at(self._shutdown_deadline):
                    await self.router.closed.wait()
                    for service in self.services:
                        await service.aclose()
                nursery.cancel_scope.cancel()
        finally:
            self.store.close()
            self.stopped.set()
            log.info("stopped")

    def _close_all(self, connections: trio.Nursery) -> None:
        code = self.config.shutdown_close_code
        reason = "server restart" if code == 1012 else "server shutdown"
        log.info("shutting down: closing %d connections with %d", len(self.connections), code)
        for scope in self._listen_scopes:
            scope.cancel()
        self._keepalive_scope.cancel()
        for handshake in list(self._handshakes):
            handshake.cancel()
        for connection in list(self.connections):
            connection.kill(code, reason)
        self._shutdown_deadline = trio.current_time() + self.config.shutdown_timeout
        connections.cancel_scope.deadline = self._shutdown_deadline

    async def ready(self) -> str | None:
        """Why chatd cannot do its work now (for /readyz), or None."""
        if self._stopping.is_set():
            return "shutting down"
        for service in self.services:
            reason = await service.ready()
            if reason is not None:
                return reason
        return None

    async def _keepalive(self) -> None:
        """Ping every connection silent for ``ping-interval``; close 1011 one
        that stays silent ``ping-timeout`` more. One sweeping task for the
        server: no task or timer per connection."""
        interval, timeout = self.config.ping_interval, self.config.ping_timeout
        with self._keepalive_scope:
            while True:
                await trio.sleep(min(interval, timeout) / 2)
                now = trio.current_time()
                for connection in list(self.connections):
                    sent = connection.ping_sent
                    if sent is not None and connection.last_heard > sent:
                        connection.ping_sent = sent = None  # heard since: alive
                    if sent is not None:
                        if now - sent >= timeout:
                            log.info("%s closed: no pong within %gs", connection.peer, timeout)
                            connection.kill(1011, "keepalive ping timeout")
                    elif now - connection.last_heard >= interval:
                        connection.ping(now)
                self.flusher.flush()

    async def _report_suppressed(self) -> None:
        client_lines.exempt = self.ledger.exempt
        with trio.CancelScope() as scope:
            self._listen_scopes.append(scope)  # cancelled when shutdown begins
            await report_suppressed()

    def _log_source(self, ip: str | None, shown: str) -> ClientSource:
        return ClientSource(None if self.ledger.is_exempt(ip) else ip, shown)

    async def _park_idle(self) -> None:
        with trio.CancelScope() as scope:
            self._listen_scopes.append(scope)  # cancelled when shutdown begins
            await self._parking.run()

    def _serve(self, listeners: list[socket.socket], handler, nursery: trio.Nursery) -> None:
        for listener in listeners:
            nursery.start_soon(self._accept, listener, handler, nursery)

    async def _accept(self, listener: socket.socket, handler, nursery: trio.Nursery) -> None:
        """Accept connections until shutdown, each handled by ``handler(sock,
        address)`` in its own task: every connection waiting when the
        listener wakes up is taken at once (up to ``_ACCEPT_BATCH``), and an
        accepted socket inherits the listener's options (no system call
        each). Out of file descriptors (or memory), it logs and retries
        after ``_ACCEPT_RETRY`` seconds, as ``trio.serve_listeners`` does."""
        spawn = nursery.start_soon
        with trio.CancelScope() as scope:
            self._listen_scopes.append(scope)
            try:
                while True:
                    await trio.lowlevel.wait_readable(listener)
                    for _ in range(_ACCEPT_BATCH):
                        try:
                            sock, address = listener.accept()
                        except BlockingIOError:
                            break
                        except OSError as exc:
                            if exc.errno in _ACCEPT_SKIP_ERRNOS:
                                continue
                            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                                raise
                            # Filtered by chatd.logs: one plain line every 10 s.
                            _accept_log.error("accept returned %s (%s); retrying in %s seconds",
                                              errno.errorcode[exc.errno], os.strerror(exc.errno),
                                              _ACCEPT_RETRY, exc_info=True)
                            await trio.sleep(_ACCEPT_RETRY)
                            break
                        spawn(handler, sock, address)
            finally:
                _close_listeners([listener])

    # --- one TCP connection ----------------------------------------------------

    async def _handle_stream(self, sock: socket.socket, address: tuple) -> None:
        """One accepted connection, from its handshake to its end: an
        accepted WebSocket is served in this same task (a task of its own
        would cost a spawn and a scheduling round per connection). The
        handshake's objects (request, parser, its scope and frame) are
        gone by then: ``_open`` has returned."""
        connection = await self._open(sock, address)
        if connection is not None:
            await connection.run()

    async def _open(self, sock: socket.socket, address: tuple) -> Connection | None:
        """The handshake of one accepted socket: the ``Connection`` it
        upgraded to (counted, ready to run), or None when it was answered
        or dropped (then the socket is closed and the ledger let go)."""
        peer = _peer_address(address)
        trusted = in_networks(peer.ip, self.trusted)
        counted = None if trusted else peer.ip
        # Lines logged while serving this connection are charged to it
        # (chatd.logs): to its client's address once known.
        client_source.set(self._log_source(None if trusted else peer.ip, peer.ip))
        refusal = self.ledger.admit(counted, trio.current_time())
        if refusal is not None:
            if not self.ledger.hold_refusal(peer.ip):
                # Already answering as many refusals for this address as it
                # may have connections: drop this one without a word.
                sock.close()
                return None
        transport = Transport(sock, self._spawn, self._tls)
        connection = None
        try:
            accepted, counted = await self._handshake(transport, peer, trusted, refusal, counted)
            if accepted is not None:
                mount, trailing, client, path = accepted
                name = mount.protocol.name
                opened = Connection(transport, trailing, mount.protocol, mount.ctx,
                                    mount.room, client, path, self.router, self.config,
                                    self.flusher, self.metrics, counted, self._on_end,
                                    self._parking)
                log.info("%s connected to %s (%s)", client, path, name,
                         extra={"peer": client, "path": path})
                self.connections.add(opened)
                self.metrics.connections[name] += 1
                if self._stopping.is_set():
                    opened.kill(self.config.shutdown_close_code, "server shutdown")
                connection = opened  # from here on, its end is the connection's
        except Exception:
            log.exception("%s connection failed", peer)
        finally:
            if connection is None:
                if refusal is None:
                    self.ledger.release(counted)
                else:
                    self.ledger.release_refusal(peer.ip)
                transport.close()
        return connection

    def _ended(self, connection: Connection) -> None:
        """A connection's task is over (``Connection.run`` calls this last)."""
        self.connections.discard(connection)
        self.metrics.connections[connection.protocol.name] -= 1
        self.ledger.release(connection.counted)
        connection.transport.close()

    async def _handshake(self, transport: Transport, peer: Address, trusted: bool,
                         refusal: Refusal | None, counted: str | None,
                         ) -> tuple[tuple[Mount, bytes, str, str] | None, str | None]:
        """Read the request and answer it. For an accepted WebSocket:
        ((mount, bytes read after the request, client address, path),
        counted); else (None, counted). ``counted`` is the address the
        ledger counted the connection against (None if none), for release."""
        config = self.config
        timeout = config.handshake_timeout if refusal is None else min(
            config.handshake_timeout, _REFUSAL_WAIT)
        reader = HeadReader()
        client = peer
        request: HttpRequest | None = None
        with trio.move_on_after(timeout) as handshake:
            self._handshakes.add(handshake)
            if self._stopping.is_set():
                handshake.cancel()
            try:
                buffer = b""
                if config.proxy_protocol and trusted:
                    client, buffer = await _read_proxy_header(transport, peer)
                request = reader.feed(buffer) if buffer else None
                while request is None:
                    request = reader.feed(await transport.receive())
            except BadRequest as exc:
                if exc.refusal is not None:
                    await self._refuse(transport, client, exc.refusal)
                else:
                    log.info("%s closed before sending a request", client)
                return None, counted
            except ProxyHeaderError as exc:
                log.info("%s dropped: %s", peer, exc)
                return None, counted
            finally:
                self._handshakes.discard(handshake)
        if request is None:
            log.info("%s sent no request within %gs", client, timeout)
            return None, counted
        if trusted:
            if not config.proxy_protocol:
                # Behind an HTTP proxy. With the PROXY protocol the proxy is a
                # TCP one, which passes these headers on from the client as
                # they came: its header alone names the client.
                forwarded = forwarded_address(request.headers.get("x-forwarded-for", []),
                                              request.header("x-real-ip"), self.trusted)
                if forwarded is not None:
                    client = Address(forwarded)
            source = client_source.get()
            if source is not None:
                source.address = None if self.ledger.is_exempt(client.ip) else client.ip
                source.shown = client.ip
            if refusal is None:
                # The client's address if a header named one, else the
                # proxy's own (docs/deployment.md): always counted.
                refusal = self.ledger.admit_address(client.ip, trio.current_time())
                if refusal is None:
                    counted = client.ip
        head = request.method == "HEAD"
        if refusal is not None:
            await self._refuse(transport, client, refusal, head)
            return None, counted
        mount = self._route(request.path)
        websocket = request.wants_websocket
        route = decide(
            request, endpoint=mount.protocol.name if mount is not None else None,
            api=self.routes.admin and self._serves_api(request),
            media=self.media is not None and self.media.serves(request),
            origin_allowed=not websocket or self._origin_allowed(request),
            banned=(self.moderation.address_refusal(client.ip)
                    if websocket and mount is not None and self.moderation is not None
                    else None))
        if isinstance(route, Refusal):
            await self._refuse(transport, client, route, head)
            return None, counted
        if route is Route.API:
            await _answer(transport, await self.api.answer(
                request, reader.trailing, transport.receive, str(client)))
            return None, counted
        if route is Route.MEDIA:
            await _answer(transport, await self.media.answer(request, reader.trailing,
                                                             transport.receive, client.ip))
            return None, counted
        if route is Route.PAGE:
            status, data = await self.routes.answer(request)
            log.debug("%s GET %s: %d", client, request.path, status)
            await _answer(transport, data)
            return None, counted
        transport.write(accept_response(request))
        return (mount, reader.trailing, str(client), request.path), counted

    async def _refuse(self, transport: Transport, client: Address, refusal: Refusal,
                      head: bool = False) -> None:
        log.info("%s refused with %d: %s", client, refusal.status, refusal.reason,
                 extra={"peer": str(client), "code": refusal.status})
        self.metrics.refused[refusal.status] += 1
        await _answer(transport, refusal_response(refusal, head))

    async def _handle_admin(self, sock: socket.socket, address: tuple) -> None:
        """The admin listener: plain HTTP only (/healthz, /readyz, /metrics)."""
        transport = Transport(sock, self._spawn)
        reader = HeadReader()
        try:
            with trio.move_on_after(self.config.handshake_timeout):
                request = None
                try:
                    while request is None:
                        request = reader.feed(await transport.receive())
                except BadRequest as exc:
                    if exc.refusal is not None:
                        await _answer(transport, refusal_response(exc.refusal))
                    return
                if self._serves_api(request):  # the server API (issue 22)
                    await _answer(transport, await self.api.answer(
                        request, reader.trailing, transport.receive, str(_peer_address(address))))
                    return
                _, data = await self.admin_routes.answer(request)
                await _answer(transport, data)
        except Exception:
            log.exception("admin request failed")
        finally:
            transport.close()

    def _route(self, path: str) -> Mount | None:
        """The endpoint at ``path``. A config without ``endpoints`` matches
        ``ws-path`` as the original multichat server's Go ServeMux did: a
        pattern ending in "/" matches every path under it."""
        mount = self.mounts.get(path)
        if mount is None and self.config.endpoints is None:
            pattern = self.config.ws_path
            if pattern.endswith("/") and path.startswith(pattern):
                mount = self.mounts.get(pattern)
        return mount

    def _origin_allowed(self, request: HttpRequest) -> bool:
        origin = request.header("origin")
        if origin is None:
            return not self.config.require_origin
        allowed = self.config.allowed_origins
        if allowed == "same-origin":
            return _same_origin(origin, request.header("host"))
        return allowed is None or origin in allowed

    # --- set-up --------------------------------------------------------------

    async def _resolve_secrets(self) -> None:
        """Secrets the config leaves out are generated once and kept in the store."""
        config = self.config
        protocols = {e.protocol for e in config.mounted()}
        needed = {"secret-key": "multichat" in protocols,
                  "jwt-secret": "gradagenda" in protocols}
        for key, wanted in needed.items():
            value = getattr(config, key.replace("-", "_"))
            if value is None and wanted:
                value, new = await trio.to_thread.run_sync(self.store.secret, key)
                log.info("%s %s (kept in %s): %s", "generated" if new else "stored",
                         key, self.store.name, value)
            if value is not None:
                self.secrets[key] = value

    # --- the server API (issue 22; chatd.api) ----------------------------------

    def _serves_api(self, request: HttpRequest) -> bool:
        return (self.api is not None and not request.wants_websocket
                and self.api.serves(request.path))

    async def _start_api(self) -> None:
        """The API with the configured key, or one generated and kept in the
        store (``api-key: null``); none when ``api-key`` is false."""
        key = self.config.api_key
        if key is False:
            return
        if key is None:
            key, new = await trio.to_thread.run_sync(self.store.secret, "api-key")
            log.info("%s api-key (kept in %s; 'chatd admin key' prints it)",
                     "generated" if new else "stored", self.store.name)
        self.api = Api(self.moderation, self.router, key, self.metrics)

    def _mount(self) -> None:
        config = self.config
        for endpoint in config.mounted():
            ctx = Context(room=endpoint.room,
                          secret_key=self.secrets.get("secret-key"),
                          jwt_secret=self.secrets.get("jwt-secret"),
                          jwt_configured=config.jwt_secret is not None,
                          jwt_leeway=config.jwt_leeway,
                          max_frame_bytes=config.frame_limit(endpoint))
            self.mounts[endpoint.path] = Mount(endpoint.path, PROTOCOL_CLASSES[endpoint.protocol],
                                               endpoint.room, ctx)

    async def _listen(self, bind: tuple[str | None, int], *, tls: bool) -> list[socket.socket]:
        """Listening sockets for ``bind`` (trio opens them: both address
        families for no host, SO_REUSEADDR, a long backlog), as
        non-blocking ``socket.socket``s that chatd's accept loop reads.
        Their options are set once here and inherited by every accepted
        socket (Linux): TCP_NODELAY (frames go out as written; chatd
        coalesces them itself), TCP_NOTSENT_LOWAT and SO_KEEPALIVE
        (half-open TCP connections are reaped even where pings are off)."""
        host, port = bind
        shown = _show_host(host, port)
        try:
            opened = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise StartupError(f"cannot listen on {shown}: {exc.strerror or exc}") from None
        listeners = []
        for listener in opened:
            trio_sock = listener.socket
            sock = socket.socket(trio_sock.family, trio_sock.type, trio_sock.proto,
                                 fileno=os.dup(trio_sock.fileno()))
            await listener.aclose()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_NOTSENT_LOWAT"):
                # As trio's SocketStream: the kernel queues at most 16 KiB
                # unsent, the rest waits in chatd's backlog, where a slow
                # consumer is seen and counted.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 2**14)
            listeners.append(sock)
        if tls and self.config.wss is not None:
            try:
                self._tls = tls_context(self.config)
            except ConfigError as exc:
                _close_listeners(listeners)
                raise StartupError(str(exc)) from None
        return listeners

    @property
    def port(self) -> int:
        return self.ports[0]

    def _log_start(self) -> None:
        config = self.config
        host, _ = config.bind
        scheme = "wss" if config.wss else "ws"
        base = _show_host(host, self.port)
        mounts = ", ".join(f"{m.path} {m.protocol.name}"
                           + ("" if m.protocol.name == "gradagenda" else f" (room {m.room})")
                           for m in self.mounts.values())
        if self.cluster is not None:
            log.info("cluster node %s (boot %s), broker %s, store %s", self.broker.node,
                     self.broker.boot, getattr(self.broker, "shown", config.broker),
                     self.store.name)
        log.info("chatd listening on %s://%s; endpoints: %s", scheme, base, mounts)
        http = "https" if config.wss else "http"
        if config.web_client_path:
            log.info("web client: %s://%s%s", http, base, config.web_client_path)
        if self.admin_ports:
            admin_host, _ = config.admin_bind
            log.info("health and metrics: http://%s/healthz, /readyz, /metrics",
                     _show_host(admin_host, self.admin_ports[0]))
        if self.api is not None:  # issue 22
            api_host, api_port = (config.admin_bind[0], self.admin_ports[0]) if self.admin_ports \
                else (host, self.port)
            log.info("server API: http://%s/api/, admin page: http://%s/admin/",
                     _show_host(api_host, api_port), _show_host(api_host, api_port))
        if config.allowed_origins is None:
            log.warning("allowed-origins is not set: any web page can open a WebSocket "
                        "to chatd (docs/security.md)")
        files = _open_file_limit()
        if config.max_connections is None:
            if files is not None and self.max_connections >= files - SPARE_FILES:
                # The open-file limit, not the default, sets the cap: say so once.
                log.info("max-connections %d: the open-file limit %d less %d for chatd's own "
                         "files (set max-connections, or raise LimitNOFILE=, "
                         "docs/operations.md)", self.max_connections, files, SPARE_FILES)
        elif files is not None and files < config.max_connections + SPARE_FILES:
            log.warning("open-file limit %d is below max-connections %d + %d: connections past "
                        "about %d wait to be accepted (raise LimitNOFILE=, docs/operations.md)",
                        files, config.max_connections, SPARE_FILES,
                        max(files - SPARE_FILES, 0))


async def _read_proxy_header(transport: Transport, peer: Address) -> tuple[Address, bytes]:
    """The client a PROXY header names (or ``peer`` for a LOCAL one), and the
    bytes read after the header."""
    data = b""
    while True:
        length = proxy_header_length(data)
        if length is not None and len(data) >= length:
            client = parse_proxy_header(data[:length])
            return client or peer, data[length:]
        more = await transport.receive()
        if not more:
            raise ProxyHeaderError("closed before a PROXY header")
        data += more


async def _answer(transport: Transport, data: bytes) -> None:
    """Write a whole HTTP response and let the client read it before the
    socket closes (closing with unread request bytes would reset it)."""
    transport.write(data)
    with trio.move_on_after(2.0):
        await transport.drain()
        transport.shutdown_write()
        while await transport.receive():
            pass


def _open_file_limit() -> int | None:
    """This process's soft RLIMIT_NOFILE, or None if unlimited."""
    files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if files == resource.RLIM_INFINITY else files


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether a browser's ``Origin`` names the host the request was sent
    to (its ``Host``), as gorilla/websocket's and tornado's default origin
    checks: scheme aside, ``host[:port]`` equal, case-insensitively."""
    if host is None:
        return False
    _, sep, rest = origin.partition("://")
    return bool(sep) and rest.lower() == host.lower()


def _ports(listeners: list[socket.socket]) -> list[int]:
    return [listener.getsockname()[1] for listener in listeners]


def _close_listeners(listeners: list[socket.socket]) -> None:
    for listener in listeners:
        if listener.fileno() >= 0:
            trio.lowlevel.notify_closing(listener)
            listener.close()


def _show_host(host: str | None, port: int) -> str:
    shown = f"[{host}]" if host and ":" in host else (host or "0.0.0.0")
    return f"{shown}:{port}"


def _peer_address(address: tuple) -> Address:
    """The peer as ``accept`` gave it: (host, port) or IPv6's (host, port, flow, scope)."""
    try:
        host, port = address[:2]
    except (TypeError, ValueError):
        return Address("?")
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return Address(host, port)
