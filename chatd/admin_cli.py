"""``chatd admin METHOD [FIELD=VALUE ...]``: the server API from the command line.

Reads where the API is and its key from the config the server runs with
(``--config``, else ``./config.json``, else the embedded default): the
``admin-host`` listener if set, else ``host`` (an all-interfaces host is
reached on loopback); the key is ``api-key``, or, when that is null, the
one the server generated and keeps in its store. ``chatd admin key``
prints that key (for the admin page). Fields become the JSON body:
``name``, ``user``, ``address``, ``device``, ``room``, ``session``,
``reason``, ``text`` and ``id`` are always strings; any other value is
read as JSON when it is JSON (``duration=3600``, ``count=null``,
``prune=true``), else as a string. The answer is printed as JSON; any
error is one line on stderr and exit 1 (docs/api.md).
"""

from __future__ import annotations

import http.client
import json
import sys
from typing import Any

from chatd.config import Config

#: Fields whose values are always strings, whatever they look like.
STRING_FIELDS = {"name", "user", "address", "device", "room", "session", "reason", "text", "id"}
#: Seconds the CLI waits for the server.
TIMEOUT = 30.0


def add_parser(commands: Any) -> None:
    admin = commands.add_parser(
        "admin", help="call the server API (ban, mute, publish, ...; see docs/api.md)",
        description="Call the running server's API: METHOD with FIELD=VALUE pairs as its "
                    "JSON body, e.g. 'chatd admin ban name=mallory duration=3600 reason=spam'. "
                    "'chatd admin key' prints the API key. The address and key come from "
                    "the config.")
    admin.add_argument("method", metavar="METHOD",
                       help="publish, presence, info, disconnect, ban, unban, bans, mute, "
                            "unmute, mutes, history, delete-message, erase-user, retention; "
                            "or key")
    admin.add_argument("fields", nargs="*", metavar="FIELD=VALUE")
    admin.add_argument("--config", metavar="PATH", help="the server's config file")
    admin.add_argument("--store", metavar="PATH",
                       help="the server's store, if its config does not name it")


def run(config: Config, method: str, fields: list[str]) -> int:
    try:
        body = _body(fields)
        key = _key(config)
    except ValueError as exc:
        print(f"chatd: admin {method}: {exc}", file=sys.stderr)
        return 1
    if method == "key":
        print(key)
        return 0
    host, port, scheme = _address(config)
    shown = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}/api/{method}"
    conn_class = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    conn = conn_class(host, port, timeout=TIMEOUT)
    try:
        conn.request("POST", f"/api/{method}", body=json.dumps(body).encode(),
                     headers={"Authorization": f"Bearer {key}",
                              "Content-Type": "application/json"})
        answer = conn.getresponse()
        status, data = answer.status, answer.read()
    except (OSError, http.client.HTTPException) as exc:
        print(f"chatd: admin {method}: cannot reach the server API at {shown}: "
              f"{getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    try:
        decoded = json.loads(data)
    except ValueError:
        decoded = {"error": data.decode(errors="replace").strip()}
    if status != 200:
        error = decoded.get("error") if isinstance(decoded, dict) else None
        print(f"chatd: admin {method}: {status} {error or decoded}", file=sys.stderr)
        return 1
    print(json.dumps(decoded, indent=2, ensure_ascii=False))
    return 0


def _body(fields: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for field in fields:
        name, sep, value = field.partition("=")
        if not sep or not name:
            raise ValueError(f"{field!r} is not FIELD=VALUE")
        if name in STRING_FIELDS:
            body[name] = value
            continue
        try:
            body[name] = json.loads(value)
        except ValueError:
            body[name] = value
    return body


def _key(config: Config) -> str:
    key = config.api_key
    if isinstance(key, str):
        return key
    if key is not None:
        raise ValueError("the server API is off (api-key is false): set api-key in the config "
                         "(docs/api.md)")
    from chatd.store import StoreError, read_setting

    try:
        stored = read_setting(config.store, "api-key")
    except StoreError as exc:
        raise ValueError(f"api-key is null (kept in the store) and {exc}: name the server's "
                         "config (--config) or store (--store)") from None
    if stored is None:
        raise ValueError(f"{config.store} holds no generated api-key: start the server once")
    return stored


def _address(config: Config) -> tuple[str, int, str]:
    if config.admin_host is not None:
        host, port = config.admin_bind
        scheme = "http"
    else:
        host, port = config.bind
        scheme = "https" if config.wss else "http"
    if host in (None, "", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port, scheme


__all__ = ["add_parser", "run"]
