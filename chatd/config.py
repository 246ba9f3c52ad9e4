"""The JSON config file, decoded into typed structs.

Keys are kebab-case, unknown keys are an error that names the key, and a
config written for the original multichat Go server (``ws-path``,
``host``, ``secret-key``, ``wss``) works unchanged: with no ``endpoints``
it mounts multichat alone at ``ws-path``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Literal

import msgspec
from msgspec import UNSET, UnsetType

PROTOCOLS = ("multichat", "gradagenda", "socialvp", "wschat", "wcp")
ProtocolName = Literal["multichat", "gradagenda", "socialvp", "wschat", "wcp"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
#: The web client's path when ``web-client`` is not set (and endpoints are).
WEB_CLIENT_PATH = "/app/"
#: RFC 6455 section 7.4: codes an endpoint may send in a close frame.
_RESERVED_CLOSE_CODES = {1004, 1005, 1006, 1015}


class ConfigError(ValueError):
    """The config file cannot be used; the message names the key."""


class Wss(msgspec.Struct, forbid_unknown_fields=True, rename="kebab"):
    keyfile: str
    certfile: str


class EndpointConfig(msgspec.Struct, forbid_unknown_fields=True, rename="kebab"):
    path: str
    protocol: ProtocolName
    room: str = "lobby"


class Config(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", kw_only=True):
    host: str = "127.0.0.1:8765"
    ws_path: str = "/"
    secret_key: str | None = None
    wss: Wss | None = None
    jwt_secret: str | None = None
    endpoints: list[EndpointConfig] | None = None
    store: str = "chatd.db"
    max_frame_bytes: int = 4096
    auth_timeout: float = 10.0
    # Frames queued for one client before it counts as a slow consumer.
    outbox_size: int = 512
    # Seconds a closing handshake may take before the socket is dropped.
    close_timeout: float = 2.0
    # Seconds a client may take to send its HTTP upgrade request.
    handshake_timeout: float = 10.0
    # Seconds the whole graceful shutdown may take.
    shutdown_timeout: float = 5.0
    log_level: LogLevel = "info"
    # --- abuse limits (docs/security.md) ---
    # Open connections in all (beyond: HTTP 503) and per client address
    # (beyond: HTTP 429), and new connections a second per address.
    max_connections: int = 20000
    max_connections_per_ip: int = 200
    connect_rate_per_ip: float = 50.0
    connect_burst_per_ip: int = 200
    # Frames a second one connection may send, and the burst it may save
    # up; frames over it are dropped with the protocol's error answer, and
    # a client still sending after another burst's worth is closed 1008.
    message_rate: float = 100.0
    message_burst: int = 200
    # Keepalive: ping a connection silent for ping-interval seconds; close
    # it 1011 if no pong comes within ping-timeout. 0 turns pings off.
    ping_interval: float = 30.0
    ping_timeout: float = 20.0
    # Browser origins allowed to open a WebSocket (others: HTTP 403); null
    # allows any. Handshakes without Origin (non-browser clients) are
    # allowed unless require-origin is true.
    allowed_origins: list[str] | None = None
    require_origin: bool = False
    # Peers (addresses or CIDRs) whose X-Forwarded-For / X-Real-IP (and,
    # with proxy-protocol, PROXY header) name the real client.
    trusted_proxies: list[str] = []
    # Expect a PROXY protocol v1/v2 header from trusted-proxies peers.
    proxy_protocol: bool = False
    # Client addresses (CIDRs) exempt from the per-address limits; the
    # total connection cap still applies. Loopback by default, as Ergo does.
    limits_exempt: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # A separate HOST:PORT for /healthz, /readyz and /metrics; absent: the
    # main listener serves them.
    admin_host: str | None = None
    log_format: LogFormat = "text"
    # The close code every client gets when the server stops: 1012
    # ("Service Restart", RFC 6455 registry) makes clients reconnect.
    shutdown_close_code: int = 1012
    # Where the browser client is served; null turns it off. Absent: at
    # /app/ when endpoints are configured (or on the embedded default).
    web_client: str | None | UnsetType = UNSET
    # Cluster: "redis://HOST:PORT/DB"; absent runs one node in-process.
    broker: str | None = None
    # This node's name in a cluster; absent: generated at start and logged.
    node_id: str | None = None
    # Seconds of clock skew allowed when checking a token's exp, iat, nbf.
    jwt_leeway: float = 30.0
    # Sessions one GradAgenda user may be a member of (others cannot add
    # them to more).
    max_sessions_per_user: int = 1000
    # Seconds a store write is retried while the database is locked or
    # busy before the asker is told "busy".
    store_busy_timeout: float = 5.0

    def __post_init__(self) -> None:
        # Runs inside msgspec's decode, so a ValueError here becomes a
        # ValidationError that names the struct; the messages name the key.
        if self.max_frame_bytes < 64:
            raise ValueError("max-frame-bytes must be at least 64")
        if self.auth_timeout <= 0:
            raise ValueError("auth-timeout must be positive")
        if self.outbox_size < 1:
            raise ValueError("outbox-size must be at least 1")
        parse_host(self.host)
        for key in ("max_connections", "max_connections_per_ip", "connect_burst_per_ip",
                    "message_burst"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key.replace('_', '-')} must be at least 1")
        for key in ("connect_rate_per_ip", "message_rate", "ping_timeout"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key.replace('_', '-')} must be positive")
        if self.ping_interval < 0:
            raise ValueError("ping-interval must be 0 (off) or positive")
        for key in ("trusted_proxies", "limits_exempt"):
            for cidr in getattr(self, key):
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise ValueError(f"{key.replace('_', '-')}: {cidr!r} is not an address "
                                     "or CIDR") from None
        if self.admin_host is not None:
            parse_host(self.admin_host)
        code = self.shutdown_close_code
        if not (1000 <= code <= 4999) or code in _RESERVED_CLOSE_CODES or 1016 <= code <= 2999:
            raise ValueError("shutdown-close-code must be a close code a server may send "
                             "(1000-1003, 1007-1014, 3000-4999; RFC 6455 section 7.4)")
        if self.jwt_leeway < 0:
            raise ValueError("jwt-leeway must not be negative")
        if self.max_sessions_per_user < 1:
            raise ValueError("max-sessions-per-user must be at least 1")
        if self.store_busy_timeout < 0:
            raise ValueError("store-busy-timeout must not be negative")
        check_cluster(self)
        if isinstance(self.web_client, str) and not (
                self.web_client.startswith("/") and self.web_client.endswith("/")):
            raise ValueError("web-client must be a path that starts and ends with '/'")
        if not self.ws_path.startswith("/"):
            raise ValueError("ws-path must start with '/'")
        paths = [e.path for e in self.endpoints or ()]
        for p in paths:
            if not p.startswith("/"):
                raise ValueError(f"endpoints: path {p!r} must start with '/'")
        dup = {p for p in paths if paths.count(p) > 1}
        if dup:
            raise ValueError(f"endpoints: path {sorted(dup)[0]!r} is mounted twice")

    @property
    def bind(self) -> tuple[str | None, int]:
        return parse_host(self.host)

    @property
    def admin_bind(self) -> tuple[str | None, int]:
        return parse_host(self.admin_host)

    @property
    def web_client_path(self) -> str | None:
        """Where the browser client is served, or None (off)."""
        if self.web_client is UNSET:
            return WEB_CLIENT_PATH if self.endpoints is not None else None
        return self.web_client

    def mounted(self) -> list[EndpointConfig]:
        """The endpoints this config serves (DESIGN.md, 'Endpoints')."""
        if self.endpoints is not None:
            return list(self.endpoints)
        return [EndpointConfig(path=self.ws_path, protocol="multichat")]


#: A node id: what other nodes, Redis keys and logs call this node.
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_cluster(config: Config) -> None:
    """The cluster keys (docs/cluster.md): ``broker`` is a Redis URL and
    comes with a shared store, ``node-id`` is 1 to 64 of ``A-Z a-z 0-9 . _ -``.
    Raises ValueError naming the key; also run at start-up, after
    ``chatd serve --store`` may have changed the store."""
    if config.node_id is not None and not _NODE_ID.fullmatch(config.node_id):
        raise ValueError(f"node-id {config.node_id!r} must be 1 to 64 letters, digits, "
                         "'.', '_' or '-' (it names Redis channels and keys)")
    if config.broker is None:
        return
    if not config.broker.startswith(("redis://", "rediss://")):
        raise ValueError(f"broker {config.broker!r} must be a redis://HOST:PORT/DB URL "
                         "(rediss:// for TLS)")
    if not config.store.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"broker needs a store every node shares: store {config.store!r} is a "
                         "SQLite file, which one node alone can use (two nodes cannot share one "
                         "file); set store to postgresql://USER@HOST:PORT/DB")


def parse_host(host: str) -> tuple[str | None, int]:
    """``HOST:PORT``, ``:PORT`` (all interfaces) or ``[V6]:PORT``."""
    if host.startswith("["):
        addr, sep, port = host[1:].partition("]:")
        if not sep:
            raise ValueError(f"host {host!r} is not [ADDRESS]:PORT")
        ipaddress.IPv6Address(addr)
    else:
        addr, sep, port = host.rpartition(":")
        if not sep:
            raise ValueError(f"host {host!r} is not HOST:PORT")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"host {host!r} has no valid port") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"host {host!r}: port out of range")
    return (addr or None), number


def default_config() -> Config:
    """The embedded default: all five protocols on 127.0.0.1 (DESIGN.md)."""
    endpoints = [EndpointConfig(path="/multichat", protocol="multichat"),
                 EndpointConfig(path="/", protocol="multichat")]
    endpoints += [EndpointConfig(path=f"/{p}", protocol=p)
                  for p in PROTOCOLS if p != "multichat"]
    return Config(endpoints=endpoints)


def decode_config(data: bytes | str) -> Config:
    try:
        config = msgspec.json.decode(data, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc}") from None
    return apply_environment(config)


def apply_environment(config: Config) -> Config:
    """``JWT_SECRET`` in the environment sets ``jwt-secret``."""
    secret = os.environ.get("JWT_SECRET")
    if secret:
        config.jwt_secret = secret
    return config


def load_config(path: str | os.PathLike[str]) -> Config:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return decode_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolve_config(path: str | None) -> tuple[Config, str | None]:
    """``--config PATH``, else ``./config.json`` if present, else the default."""
    if path is None and Path("config.json").is_file():
        path = "config.json"
    if path is None:
        return apply_environment(default_config()), None
    return load_config(path), path


def encode_config(config: Config) -> bytes:
    return msgspec.json.format(msgspec.json.encode(config), indent=2)


def _explain(message: str) -> str:
    # msgspec says "Object contains unknown field `x` - at `$.wss`"; keep
    # its wording, which already names the key and where it is.
    return message.replace("Object contains unknown field", "unknown key")
