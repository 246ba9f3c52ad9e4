"""Whatever ``chatd serve`` refuses about a config, ``chatd check-config``
refuses too, with the same line (issue 20 item 4).

Both run ``chatd.config.preflight`` before anything starts; this test
enumerates every refusal ``serve`` makes at start-up and runs the real
commands on it. Each row is one way a config can be unusable:

- a value (``decode_config``: keys, ranges, secrets);
- the cluster keys (``check_cluster``): a broker without a shared store;
- a backend that is not installed (the ``[cluster]`` extras): coredis for
  a Redis broker, psycopg for a PostgreSQL store;
- a SQLite store that cannot be created or used: its directory missing,
  not a directory, the store path a directory, a file that is not a
  SQLite database, or one from a newer chatd;
- the TLS files (``tls_context``);
- an address the listener cannot bind here (``host``, ``admin-host``).

What ``serve`` refuses that depends on the moment, not on the config, is
not refused by ``check-config`` (the check may run beside the very server
it checks): a port another process listens on, a SQLite store another
chatd holds, a PostgreSQL or Redis server that is down. The last test
shows the first of these.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GUARD

SECRET = "a-secret-key-of-more-than-16-bytes"


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "JWT_SECRET"}
    return subprocess.run([sys.executable, "-m", "chatd", *args], cwd=cwd,
                          env={**environ, **(env or {})}, capture_output=True, text=True,
                          timeout=GUARD)


def missing_module(tmp_path: Path, name: str, make: bool) -> dict[str, str]:
    """An environment where ``import NAME`` fails, as without the extras."""
    shadow = tmp_path / "without" / name
    if not make:
        return {}
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(f"raise ImportError('{name} is not installed')\n")
    return {"PYTHONPATH": str(tmp_path / "without")}


def refusals(tmp_path: Path, make: bool = True) -> dict[str, tuple[dict, dict[str, str] | None, str]]:
    """name -> (config, environment, what the one line must say); with
    ``make``, the files and directories they need are made in ``tmp_path``."""
    if make:
        (tmp_path / "a-file").write_text("")
        (tmp_path / "a-dir").mkdir()
        (tmp_path / "notes.txt").write_text("these are my notes, not a database\n" * 40)
        import sqlite3
        newer = sqlite3.connect(tmp_path / "newer.db")
        newer.execute("PRAGMA user_version=999")
        newer.execute("CREATE TABLE t (x)")
        newer.close()
    base = {"host": "127.0.0.1:0", "secret-key": SECRET}
    pg = "postgresql://chatd@127.0.0.1:5432/chatd"
    return {
        "bad value": ({**base, "max-frame-bytes": 10}, None, "max-frame-bytes"),
        "endpoint's limit": ({**base, "endpoints": [
            {"path": "/", "protocol": "multichat", "max-frame-bytes": 2**30}]}, None,
            "max-frame-bytes"),
        "placeholder secret": ({**base, "secret-key": "\u2026"}, None, "placeholder"),
        "broker without a shared store": ({**base, "broker": "redis://127.0.0.1:6379/0",
                                           "store": str(tmp_path / "c.db")}, None,
                                          "broker needs a store every node shares"),
        "store directory missing": ({**base, "store": str(tmp_path / "nowhere" / "c.db")},
                                    None, "does not exist"),
        "store directory is a file": ({**base, "store": str(tmp_path / "a-file" / "c.db")},
                                      None, "is not a directory"),
        "store is a directory": ({**base, "store": str(tmp_path / "a-dir")}, None,
                                 "is a directory"),
        "store not a SQLite file": ({**base, "store": str(tmp_path / "notes.txt")}, None,
                                    "not a SQLite database"),
        "store from a newer chatd": ({**base, "store": str(tmp_path / "newer.db")}, None,
                                     "is newer than this chatd's"),
        "PostgreSQL without psycopg": ({**base, "store": pg}, missing_module(tmp_path, "psycopg", make),
                                       "PostgreSQL needs psycopg"),
        "Redis without coredis": ({**base, "store": pg, "broker": "redis://127.0.0.1:6379/0"},
                                  missing_module(tmp_path, "coredis", make), "Redis needs coredis"),
        "TLS file missing": ({**base, "store": ":memory:", "wss": {
            "keyfile": str(tmp_path / "no-key.pem"), "certfile": str(tmp_path / "no-cert.pem")}},
            None, "wss.certfile"),
        "host not on this machine": ({**base, "store": ":memory:", "host": "192.0.2.1:8765"},
                                     None, "cannot listen on 192.0.2.1"),
        "admin-host not on this machine": ({**base, "store": ":memory:",
                                            "admin-host": "192.0.2.1:9100"},
                                           None, "admin-host 192.0.2.1:9100"),
        "host that does not resolve": ({**base, "store": ":memory:",
                                        "host": "no-such-host.invalid:8765"},
                                       None, "cannot resolve"),
    }


CASES = list(refusals(Path("/nonexistent"), make=False))


@pytest.mark.parametrize("case", CASES)
def test_every_refusal_of_serve_is_a_refusal_of_check_config(tmp_path, case):
    config, env, says = refusals(tmp_path)[case]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    serve = run("serve", "--config", str(path), cwd=tmp_path, env=env)
    check = run("check-config", str(path), cwd=tmp_path, env=env)
    for result in (serve, check):
        assert result.returncode == 1, result
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("chatd: "), result.stderr
        assert says in lines[0], (says, lines[0])
    # The same line: one code path (chatd.config.preflight).
    assert serve.stderr == check.stderr
    assert check.stdout == ""


def test_serve_store_override_is_checked_as_check_config_checks_a_store(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"host": "127.0.0.1:0", "secret-key": SECRET}))
    result = run("serve", "--config", str(path), "--store", str(tmp_path / "no" / "c.db"),
                 cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("chatd: ") and "does not exist" in result.stderr


def test_a_port_in_use_is_refused_by_serve_but_not_by_check_config(tmp_path):
    # The server being checked may be the one listening (ExecStartPre runs
    # before a restart's new process binds; an operator checks a running one).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"host": f"127.0.0.1:{port}", "secret-key": SECRET,
                                    "store": ":memory:"}))
        check = run("check-config", str(path), cwd=tmp_path)
        serve = run("serve", "--config", str(path), cwd=tmp_path)
    assert check.returncode == 0 and check.stderr == ""
    # Once starting, a failure is a log line (docs/operations.md, "Logs").
    assert serve.returncode == 1
    assert " ERROR chatd: cannot start: cannot listen on 127.0.0.1:" in serve.stderr
    assert "Address already in use" in serve.stderr
