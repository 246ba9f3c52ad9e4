"""Where the load goes: the address, port and endpoint path, from flags or a chatd config.

Refuses any target that is not a loopback address unless it was named
with ``--host``: a load test points at a remote machine only on purpose.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
from pathlib import Path


def load_config_file(path: str | None) -> dict:
    """The server's chatd config (JSON), or {} without ``--config``."""
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"loadtest: cannot read {path}: {exc}")


def resolve_target(args: argparse.Namespace, config: dict) -> tuple[int, str, str, int]:
    """(family, address, Host header, port); refuses non-loopback unless --host."""
    host, port = "127.0.0.1", 8765
    if "host" in config:
        cfg_host, _, cfg_port = config["host"].rpartition(":")
        host = cfg_host.strip("[]") or "127.0.0.1"
        port = int(cfg_port)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    if args.host:
        host = args.host
    if args.port is not None:
        port = args.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SystemExit(f"loadtest: cannot resolve {host}: {exc}")
    family, _, _, _, sockaddr = infos[0]
    address = sockaddr[0]
    if not ipaddress.ip_address(address).is_loopback and not args.host:
        raise SystemExit(f"loadtest: refusing {host} ({address}): not a loopback address; "
                         "name it with --host to load a remote server")
    host_header = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    return family, address, host_header, port


def default_path(protocol: str, config: dict) -> str:
    """The endpoint path of ``protocol``: the config's, else ``/PROTOCOL``."""
    endpoints = config.get("endpoints")
    if endpoints is not None:
        for endpoint in endpoints:
            if endpoint["protocol"] == protocol:
                return endpoint["path"]
        raise SystemExit(f"loadtest: the config mounts no {protocol} endpoint")
    if config:
        return config.get("ws-path", "/")  # a config without endpoints: multichat alone
    return f"/{protocol}"
