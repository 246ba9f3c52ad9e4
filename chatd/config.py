"""The JSON config file, decoded into typed structs.

Keys are kebab-case, unknown keys are an error that names the key, and a
config written for the original multichat Go server (``ws-path``,
``host``, ``secret-key``, ``wss``) works unchanged: with no ``endpoints``
it mounts multichat alone at ``ws-path``.

Every check an operator can get wrong without starting the server lives
here, so ``chatd check-config`` and ``chatd serve`` refuse the same
things with the same one-line message: values (``decode_config``), the
``JWT_SECRET`` environment variable (``apply_environment``) and the TLS
files (``tls_context``). ``config_warnings`` lists what works but should
not be left as it is.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import stat
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Literal

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
    """The config file cannot be used; the message names the key.

    The message is one line: characters that do not print (a newline in a
    key, a control character in a value) are shown escaped, as in Python.
    """

    def __init__(self, message: str) -> None:
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


#: What ``chatd check-config`` prints in place of a secret (see
#: ``effective_config``); refused as a secret, so a printed config fed back
#: to chatd cannot run with it.
REDACTED = "********"
#: RFC 7518 section 3.2: an HS256 key MUST be at least as long as the hash
#: output, 256 bits.
MIN_JWT_SECRET_BYTES = 32
#: The multichat ``secret-key`` is only ever guessed online (each guess is a
#: connection, limited per address), so 128 bits of key, the level of
#: AES-128 and of RFC 4086 section 8's "secret" guidance, put it far beyond
#: reach; shorter is warned about, not refused: a config written for the
#: original Go server, which took any secret, must keep working.
MIN_SECRET_KEY_BYTES = 16
# The placeholders chatd's own examples once shipped ("change me: ..."),
# in any spelling, and an ellipsis standing for "your secret here" ("…",
# "...", "<secret>"): anyone who read the example knows them.
_PLACEHOLDER = re.compile(r"\s*change[\s_-]*me\b|\s*(?:\.{2,}|\u2026+|<[^<>]*>)\s*$",
                          re.IGNORECASE)


def secret_problem(value: str) -> str | None:
    """Why ``value`` cannot serve as a secret (``secret-key``, ``jwt-secret``),
    or None. Refused: empty or blank (no client could present it, and
    PyJWT refuses an empty HMAC key), a placeholder from an example
    (publicly known): "change me", an ellipsis (``…``, ``...``) or
    ``<...>``, and check-config's ``REDACTED`` mask. A short secret is a
    warning (``config_warnings``), not a refusal."""
    if not value.strip():
        return "is empty"
    if _PLACEHOLDER.match(value):
        return f"is the example's placeholder {value!r}, which anyone can read"
    if value == REDACTED:
        return "is check-config's mask for a hidden secret, not the secret"
    return None


class Wss(msgspec.Struct, forbid_unknown_fields=True, rename="kebab"):
    keyfile: str
    certfile: str


#: ``max-frame-bytes`` for an endpoint that names none, on a config that
#: has ``endpoints`` and on the embedded default: GradAgenda's document
#: rule ("shall not exceed 4KB"), chatd's choice for the other protocols.
DEFAULT_FRAME_BYTES = 4096
#: ``max-frame-bytes`` on a config written for the original multichat Go
#: server (no ``endpoints``): that server reads messages of any length, and
#: real bridges escape every CJK character as six bytes (``\\u4f60``), so a
#: 1,700-character message is a 10 KB frame; 64 KiB (about 10,900 escaped
#: CJK characters) is chatd's documented bound (docs/protocols.md).
GO_CONFIG_FRAME_BYTES = 65536
#: The largest ``max-frame-bytes`` accepted (16 MiB): one frame is held whole
#: in memory while it is read.
MAX_FRAME_BYTES = 16 * 1024 * 1024


def _check_frame_limit(where: str, value: int | None) -> None:
    if value is not None and not 64 <= value <= MAX_FRAME_BYTES:
        raise ValueError(f"{where}max-frame-bytes must be 64 to {MAX_FRAME_BYTES} (16 MiB)")


class EndpointConfig(msgspec.Struct, forbid_unknown_fields=True, rename="kebab"):
    path: str
    protocol: ProtocolName
    room: str = "lobby"
    #: This endpoint's own limit; absent: the top-level ``max-frame-bytes``.
    max_frame_bytes: int | None = None


class Config(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", kw_only=True):
    host: str = "127.0.0.1:8765"
    ws_path: str = "/"
    secret_key: str | None = None
    wss: Wss | None = None
    jwt_secret: str | None = None
    endpoints: list[EndpointConfig] | None = None
    store: str = "chatd.db"
    # Largest message a client may send (UTF-8 bytes; over it: close 1009),
    # for every endpoint that sets none; null: 4096, or 65536 on a config
    # without endpoints (see ``frame_limit``).
    max_frame_bytes: int | None = None
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
    # max-connections null: what the open-file limit allows (``connection_cap``).
    max_connections: int | None = None
    max_connections_per_ip: int = 200
    connect_rate_per_ip: float = 50.0
    connect_burst_per_ip: int = 200
    # Frames a second one connection may send, and the burst it may save
    # up; a client over it is read later (throttled: TCP pushes back on
    # it), and nothing it sent is dropped (chatd.connection).
    message_rate: float = 100.0
    message_burst: int = 200
    # Keepalive: ping a connection silent for ping-interval seconds; close
    # it 1011 if no pong comes within ping-timeout. 0 turns pings off.
    ping_interval: float = 30.0
    ping_timeout: float = 20.0
    # Browser origins allowed to open a WebSocket (others: HTTP 403); null
    # allows any; "same-origin" allows a page served from the host the
    # handshake names (its Host header), as gorilla/websocket and tornado
    # do by default. Handshakes without Origin (non-browser clients) are
    # allowed unless require-origin is true.
    allowed_origins: list[str] | Literal["same-origin"] | None = None
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
    # Group sessions one GradAgenda user may have created that are still
    # stored, whether or not they are still a member (issue 19).
    max_groups_per_user: int = 200
    # Members of one GradAgenda session.
    max_members_per_session: int = 100
    # Messages one GradAgenda user may have stored in one session.
    max_messages_per_user_per_session: int = 100_000
    # Seconds a store write is retried while the database is locked or
    # busy before the asker is told "busy".
    store_busy_timeout: float = 5.0
    # --- GradAgenda beyond 2014 (issue 23; docs/protocols.md) ---
    # Milliseconds a session's delivery and read marks are gathered before
    # members' devices are told (one providing-marks per session per flush).
    marks_flush_ms: int = 250
    # Bytes of one uploaded image or voice clip, and of all a user's media.
    media_max_bytes: int = 5 * 1024 * 1024
    media_quota_bytes: int = 100 * 1024 * 1024
    # --- moderation and the server API (issue 22; docs/api.md) ---
    # The server API's key: false (the default), the API is off; null, one
    # is generated and kept in the store (the embedded default); a string,
    # that key.
    api_key: str | bool | None = False
    # GradAgenda retention: the most messages kept per session and their
    # longest age in seconds (null: no limit), pruned every
    # retention-interval seconds; the API can set them per session.
    retention_count: int | None = None
    retention_age: float | None = None
    retention_interval: float = 60.0

    def __post_init__(self) -> None:
        # Runs inside msgspec's decode, so a ValueError here becomes a
        # ValidationError that names the struct; the messages name the key.
        for key in ("secret_key", "jwt_secret"):
            value = getattr(self, key)
            problem = None if value is None else secret_problem(value)
            if problem:
                raise ValueError(f"{key.replace('_', '-')} {problem}: set a real secret, or "
                                 "leave the key out (or null) to have one generated and kept "
                                 "in the store")
        _check_frame_limit("", self.max_frame_bytes)
        for endpoint in self.endpoints or ():
            _check_frame_limit(f"endpoints: {endpoint.path!r}: ", endpoint.max_frame_bytes)
        _check_moderation(self)  # issue 22
        if self.auth_timeout <= 0:
            raise ValueError("auth-timeout must be positive")
        if self.outbox_size < 1:
            raise ValueError("outbox-size must be at least 1")
        parse_host(self.host)
        for key in ("max_connections", "max_connections_per_ip", "connect_burst_per_ip",
                    "message_burst"):
            if (getattr(self, key) or 1) < 1:
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
        if not self.store.strip():
            raise ValueError("store must be a SQLite file path or a postgresql:// URL, not empty")
        if self.close_timeout > self.shutdown_timeout:
            raise ValueError("close-timeout must not exceed shutdown-timeout: a shutdown "
                             "waits for clients' closing handshakes")
        if self.jwt_leeway < 0:
            raise ValueError("jwt-leeway must not be negative")
        for key in ("max_sessions_per_user", "max_groups_per_user",
                    "max_messages_per_user_per_session"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key.replace('_', '-')} must be at least 1")
        if self.max_members_per_session < 2:
            raise ValueError("max-members-per-session must be at least 2")
        for key in ("marks_flush_ms", "media_max_bytes", "media_quota_bytes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key.replace('_', '-')} must be at least 1")
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

    def frame_limit(self, endpoint: EndpointConfig) -> int:
        """The ``max-frame-bytes`` of ``endpoint`` (one of ``mounted()``):
        its own, else the top-level one, else ``DEFAULT_FRAME_BYTES``, or
        ``GO_CONFIG_FRAME_BYTES`` on a config without ``endpoints`` (as the
        original Go server, which had no limit, within a bound)."""
        if endpoint.max_frame_bytes is not None:
            return endpoint.max_frame_bytes
        if self.max_frame_bytes is not None:
            return self.max_frame_bytes
        return GO_CONFIG_FRAME_BYTES if self.endpoints is None else DEFAULT_FRAME_BYTES

    def connection_cap(self, open_files: int | None) -> int:
        """``max-connections`` in effect: as set, else what ``open_files``
        (the process's RLIMIT_NOFILE; None: unlimited) leaves after
        ``SPARE_FILES``, at most ``DEFAULT_MAX_CONNECTIONS``."""
        if self.max_connections is not None:
            return self.max_connections
        if open_files is None:
            return DEFAULT_MAX_CONNECTIONS
        return max(1, min(DEFAULT_MAX_CONNECTIONS, open_files - SPARE_FILES))

    def mounted(self) -> list[EndpointConfig]:
        """The endpoints this config serves: ``endpoints`` if set, else
        multichat alone at ``ws-path``, as the original multichat server
        (README, "Endpoints")."""
        if self.endpoints is not None:
            return list(self.endpoints)
        return [EndpointConfig(path=self.ws_path, protocol="multichat")]


#: ``max-connections`` when unset and the open-file limit allows it.
DEFAULT_MAX_CONNECTIONS = 20000
#: Descriptors chatd holds besides connections: listeners, the store, the
#: broker, logs, worker threads' files.
SPARE_FILES = 64
#: Largest number the store's INTEGER columns hold (SQLite and PostgreSQL
#: bigint): a seq, a count, milliseconds. A larger one makes a store job
#: raise, and a raising job fails the store until a restart.
MAX_STORED_INT = 2**63 - 1
#: Longest retention age, in seconds (a hundred years).
MAX_RETENTION_AGE = 100 * 365 * 86400


def _check_moderation(config: Config) -> None:
    """The server API's and retention's keys (docs/api.md); ValueError naming the key."""
    if config.api_key is True:
        raise ValueError("api-key true is not a key: set a key, null to have one generated "
                         "and kept in the store, or false (API off)")
    if isinstance(config.api_key, str):
        problem = secret_problem(config.api_key)
        if problem:
            raise ValueError(f"api-key {problem}: set a real key, null to have one generated "
                             "and kept in the store, or false (API off)")
        # It travels in a header: HTTP strips the spaces round a field value,
        # cannot carry a control character, and a client's UTF-8 is read as
        # Latin-1 (RFC 9110 section 5.5), so such a key would never match.
        key = config.api_key
        if not all(" " <= c <= "~" for c in key) or key != key.strip():
            raise ValueError("api-key must be printable ASCII without leading or trailing "
                             "spaces: it is sent in an HTTP header")
    if config.retention_count is not None and not 1 <= config.retention_count <= MAX_STORED_INT:
        raise ValueError(f"retention-count must be 1 to {MAX_STORED_INT} (or null: no limit)")
    if config.retention_age is not None and not 0 < config.retention_age <= MAX_RETENTION_AGE:
        raise ValueError(f"retention-age must be 0 < seconds <= {MAX_RETENTION_AGE} "
                         "(or null: no limit)")
    if not config.retention_interval > 0:
        raise ValueError("retention-interval must be positive")


#: A node id: what other nodes, Redis keys and logs call this node.
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _check_redis_url(url: str) -> None:
    """``redis://[USER:PASSWORD@]HOST[:PORT][/DB]`` (``rediss://`` for TLS),
    the form coredis reads; DB a number (default 0). Raises ValueError
    saying what is wrong: a DB that is not a number would silently be 0."""
    form = "must be a redis://HOST:PORT/DB URL (rediss:// for TLS)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"broker {url!r} {form}: {exc}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"broker {url!r} {form}")
    if not parts.hostname:
        raise ValueError(f"broker {url!r} {form}: it names no host")
    if port == 0:
        raise ValueError(f"broker {url!r} {form}: port 0")
    db = parts.path.strip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ValueError(f"broker {url!r} {form}: the database {db!r} is not a number")
    if parts.query:
        raise ValueError(f"broker {url!r} {form}: options after '?' are not read; "
                         "put the database in the path")


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
    _check_redis_url(config.broker)
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
    """The embedded default: all five protocols on 127.0.0.1:8765, each at
    its own path (multichat also at ``/``), all in room ``lobby``."""
    endpoints = [EndpointConfig(path="/multichat", protocol="multichat"),
                 EndpointConfig(path="/", protocol="multichat")]
    endpoints += [EndpointConfig(path=f"/{p}", protocol=p)
                  for p in PROTOCOLS if p != "multichat"]
    # Bound to loopback and serving its own web client: pages from
    # elsewhere have no business opening a WebSocket to it. The server API
    # is on, with a key generated and kept in the store (issue 22).
    return Config(endpoints=endpoints, max_frame_bytes=DEFAULT_FRAME_BYTES,
                  allowed_origins="same-origin", api_key=None)


def decode_config(data: bytes | str) -> Config:
    try:
        config = msgspec.json.decode(data, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc}") from None
    return apply_environment(config)


def apply_environment(config: Config) -> Config:
    """``JWT_SECRET`` in the environment, when set, sets ``jwt-secret`` (as
    the original wschat server reads it). Set but empty, blank or a
    placeholder, it is refused (``ConfigError``) rather than ignored: the
    operator meant to set a secret."""
    secret = os.environ.get("JWT_SECRET")
    if secret is not None:
        problem = secret_problem(secret)
        if problem:
            raise ConfigError(f"JWT_SECRET in the environment {problem}: set a real secret, "
                              "or unset it")
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


def effective_config(config: Config, *, show_secrets: bool = False) -> dict[str, Any]:
    """The config as chatd runs it, every key in order with its default
    filled in: ``endpoints`` as mounted (multichat at ``ws-path`` when the
    file has none; GradAgenda, which has no room, without ``room``),
    ``web-client`` as in effect (a path, or null: off), and each secret
    that is set shown as ``REDACTED`` unless ``show_secrets`` (null: chatd
    generates it and keeps it in the store)."""
    out: dict[str, Any] = {}
    for field in msgspec.structs.fields(Config):
        value = getattr(config, field.name)
        if field.name == "endpoints":
            value = [{"path": e.path, "protocol": e.protocol}
                     | ({} if e.protocol == "gradagenda" else {"room": e.room})
                     | {"max-frame-bytes": config.frame_limit(e)}
                     for e in config.mounted()]
        elif field.name == "max_frame_bytes" and value is None:
            value = GO_CONFIG_FRAME_BYTES if config.endpoints is None else DEFAULT_FRAME_BYTES
        elif field.name == "web_client":
            value = config.web_client_path
        elif field.name in ("secret_key", "jwt_secret") and value is not None and not show_secrets:
            value = REDACTED
        elif field.name == "api_key" and isinstance(value, str) and not show_secrets:
            value = REDACTED  # issue 22
        out[field.encode_name] = msgspec.to_builtins(value)
    return out


def encode_config(config: Config, *, show_secrets: bool = False) -> bytes:
    """``effective_config`` as indented JSON."""
    return msgspec.json.format(
        msgspec.json.encode(effective_config(config, show_secrets=show_secrets)), indent=2)


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> str:
    # Without this, OpenSSL would prompt on the terminal and a service
    # would hang at start.
    raise _EncryptedKey


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context for ``wss``, or None when ``wss`` is unset.

    Checks what can be checked without listening, and raises
    ``ConfigError`` with one line naming the key and the path: each file
    (``wss.certfile``, ``wss.keyfile``; relative paths are from the working
    directory) exists, is a regular file, is readable and holds PEM (a
    certificate; a private key without a passphrase), and the key belongs
    to the certificate. The server should build its listener's context
    with this function, so that ``check-config`` and ``serve`` agree.
    """
    if config.wss is None:
        return None
    certfile, keyfile = config.wss.certfile, config.wss.keyfile
    cert_text = _read_file("wss.certfile", certfile)
    key_text = _read_file("wss.keyfile", keyfile)
    try:
        # Load the certificate alone first, so a bad one is named as such.
        ssl.create_default_context().load_verify_locations(cadata=cert_text)
    except (ssl.SSLError, ValueError):
        raise ConfigError(f"wss.certfile {certfile}: not a PEM certificate "
                          "(expected -----BEGIN CERTIFICATE-----)") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_passphrase)
    except _EncryptedKey:
        raise ConfigError(f"wss.keyfile {keyfile}: the key is encrypted; chatd needs it "
                          "without a passphrase (openssl pkey -in KEY -out PLAIN-KEY)") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"wss.keyfile {keyfile} is not the key of wss.certfile "
                              f"{certfile}") from None
        if "PRIVATE KEY-----" not in key_text:
            raise ConfigError(f"wss.keyfile {keyfile}: not a PEM private key "
                              "(expected -----BEGIN PRIVATE KEY-----)") from None
        raise ConfigError(f"wss.keyfile {keyfile}: cannot load the key with wss.certfile "
                          f"{certfile}: {exc.reason or exc}") from None
    except OSError as exc:  # the file changed since it was read
        raise ConfigError(f"wss: cannot load {certfile} and {keyfile}: "
                          f"{exc.strerror or exc}") from None
    return context


def _read_file(key: str, path: str) -> str:
    """The text of the file ``key`` names, or ConfigError naming both."""
    if not path:
        raise ConfigError(f"{key} is empty: name a PEM file")
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{key} {path}: is a directory, not a PEM file")
        if not stat.S_ISREG(mode):
            # A FIFO or a device would block or never end.
            raise ConfigError(f"{key} {path}: not a regular file")
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{key} {path}: not a PEM file (binary content; DER must be "
                          "converted to PEM)") from None


def preflight(config: Config, path: str | None = None) -> None:
    """Everything ``chatd serve`` would refuse about ``config`` that does
    not depend on the moment (a port another process holds, a database
    that is down): the one check ``chatd check-config`` and ``chatd serve``
    both run before anything starts, so that whatever one refuses the other
    refuses with the same line (a ``ConfigError`` naming ``path``, when given).

    - the cluster keys (``check_cluster``; ``serve --store`` may have
      changed the store);
    - the TLS files (``tls_context``);
    - the broker's and the store's backends are installed (the
      ``[cluster]`` extras: coredis for Redis, psycopg for PostgreSQL);
    - a SQLite store can be created or opened where it is named: its
      directory exists and is writable, the file is not a directory and
      is readable and writable (``chatd.store.check_store``);
    - the listener's address can be bound here (``host``, ``admin-host``):
      a port in use is not refused (the server being checked may be the
      one holding it), an address this machine does not have, a
      privileged port, or a host name that does not resolve is.
    """
    from chatd.broker import broker_class
    from chatd.store import StoreError, check_store

    try:
        try:
            check_cluster(config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        tls_context(config)
        if config.broker is not None:
            try:
                broker_class(config.broker)
            except RuntimeError as exc:
                raise ConfigError(str(exc)) from None
        try:
            check_store(config.store)
        except StoreError as exc:
            raise ConfigError(str(exc)) from None
        _check_bind("host", config.host)
        if config.admin_host is not None:
            _check_bind("admin-host", config.admin_host)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def _check_bind(key: str, host: str) -> None:
    """Bind ``host`` as the listener would (every address it resolves to),
    without listening; ConfigError unless it can be bound or is only in use."""
    import errno
    import socket

    addr, port = parse_host(host)
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{key} {host}: cannot resolve {addr!r}: {exc.strerror}") from None
    for family, kind, proto, _, sockaddr in infos:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:
            continue  # e.g. no IPv6 here: trio skips it the same way
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise ConfigError(f"{key} {host}: cannot listen on {sockaddr[0]} port {port}: "
                                  f"{exc.strerror or exc}") from None


def config_warnings(config: Config) -> list[str]:
    """What works but should not be left as it is, one line each (printed
    by ``check-config`` and logged by ``serve`` at start)."""
    warnings = []
    key = config.secret_key
    if key is not None and len(key.encode()) < MIN_SECRET_KEY_BYTES:
        warnings.append(f"secret-key is {len(key.encode())} bytes; use at least "
                        f"{MIN_SECRET_KEY_BYTES} random bytes (128 bits), e.g. "
                        "'openssl rand -base64 24', or leave it out to have one generated")
    for endpoint in config.mounted():
        limit = config.frame_limit(endpoint)
        if endpoint.protocol == "gradagenda" and limit > DEFAULT_FRAME_BYTES:
            warnings.append(f"max-frame-bytes {limit} on GradAgenda endpoint {endpoint.path} is "
                            f"above its document's {DEFAULT_FRAME_BYTES} bytes: chatd's answers "
                            "are split to it, and clients written to the document may refuse them")
    secret = config.jwt_secret
    if secret is not None and len(secret.encode()) < MIN_JWT_SECRET_BYTES:
        warnings.append(f"jwt-secret is {len(secret.encode())} bytes; HS256 keys should have at "
                        f"least {MIN_JWT_SECRET_BYTES} (RFC 7518 section 3.2), so it can be "
                        "guessed offline from any token")
    if config.wss is not None:
        try:
            mode = os.stat(config.wss.keyfile).st_mode
        except OSError:
            mode = 0
        if mode & stat.S_IROTH:
            warnings.append(f"wss.keyfile {config.wss.keyfile} is readable by every user of "
                            "this machine: chmod o-r it")
    return warnings


def _explain(message: str) -> str:
    # msgspec says "Object contains unknown field `x` - at `$.wss`"; keep
    # its wording, which already names the key and where it is.
    return message.replace("Object contains unknown field", "unknown key")
