"""What a new operator meets in the first hour (issue 20 items 7 and 8).

A default start prints no warning: a default that warns about itself
teaches operators to ignore warnings. A real misconfiguration still
warns: a config file that leaves ``allowed-origins`` unset, a
``max-connections`` above the open-file limit, a short ``secret-key``.
"""

from __future__ import annotations

import json

import pytest

from tests.test_cli import chatd, one_line


async def test_a_default_start_prints_no_warning(process, tmp_path):
    server = process("serve", "--host", "127.0.0.1:0").start()
    assert server.stop() == 0
    output = server.output()
    assert "listening on" in output
    assert "WARNING" not in output, output


async def test_a_default_start_with_a_low_open_file_limit_says_what_it_caps(process, tmp_path):
    # Unset, max-connections follows the open-file limit: an info line, not a warning.
    server = process("serve", "--host", "127.0.0.1:0", nofile=(512, 512)).start()
    assert server.stop() == 0
    output = server.output()
    assert "max-connections 448: the open-file limit 512 less 64" in output
    assert "WARNING" not in output, output


async def test_a_config_file_without_allowed_origins_still_warns(process, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "host": "127.0.0.1:0", "secret-key": "a-secret-key-of-more-than-16-bytes"}))
    server = process("serve").start()
    assert server.stop() == 0
    assert "WARNING chatd: allowed-origins is not set" in server.output()


async def handshake_status(port: int, host: str, origin: str | None) -> int | None:
    """The status a handshake with ``Host: host`` and ``Origin: origin`` is
    refused with, or None if accepted (as a browser sends them: the Host
    with its port)."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, RejectConnection, Request

    from tests.rawws import open_stream
    stream = await open_stream(port)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        headers = [(b"Origin", origin.encode())] if origin else []
        await stream.send_all(ws.send(Request(host=host, target="/wcp", extra_headers=headers)))
        while True:
            ws.receive_data(await stream.receive_some() or None)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return None
                if isinstance(event, RejectConnection):
                    return event.status_code
    finally:
        await stream.aclose()


@pytest.mark.parametrize("host, origin, status", [
    ("127.0.0.1:{port}", None, None),                        # not a browser
    ("127.0.0.1:{port}", "http://127.0.0.1:{port}", None),   # chatd's own web client
    ("localhost:{port}", "http://localhost:{port}", None),   # the same, by another name
    ("LOCALHOST:{port}", "http://localhost:{port}", None),   # host names ignore case
    ("127.0.0.1:{port}", "http://evil.example", 403),        # any other page
    ("127.0.0.1:{port}", "http://127.0.0.1:1", 403),         # another port: another origin
    ("127.0.0.1:{port}", "null", 403),                       # a sandboxed or file: page
])
async def test_the_embedded_default_accepts_only_its_own_pages(chat, host, origin, status):
    server = await chat.start()  # the embedded default: allowed-origins "same-origin"
    port = server.port
    origin = origin.format(port=port) if origin else None
    assert await handshake_status(port, host.format(port=port), origin) == status


# --- secrets (item 8) ----------------------------------------------------------------


@pytest.mark.parametrize("placeholder", ["\u2026", "...", "<secret>", "\u2026\u2026"])
def test_an_example_s_ellipsis_secret_is_refused(tmp_path, placeholder):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"secret-key": placeholder, "store": ":memory:",
                                "host": "127.0.0.1:0"}))
    result = chatd("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 1
    one_line(result.stderr, "secret-key", "placeholder")


@pytest.mark.parametrize("secret, warned", [("x", True), ("fifteen-bytes!!", True),
                                            ("sixteen-bytes!!!", False)])
def test_a_secret_key_under_16_bytes_is_a_warning(tmp_path, secret, warned):
    # A warning, not a refusal: a config written for the original Go
    # server, which took any secret, must keep working.
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"secret-key": secret, "store": ":memory:",
                                "host": "127.0.0.1:0"}))
    result = chatd("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 0
    if warned:
        one_line(result.stderr, "warning", f"secret-key is {len(secret)} bytes", "16")
    else:
        assert result.stderr == ""


def test_a_gradagenda_endpoint_over_its_document_s_4_kb_is_a_warning(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"store": ":memory:", "host": "127.0.0.1:0",
                                "endpoints": [{"path": "/g", "protocol": "gradagenda",
                                               "max-frame-bytes": 8192}]}))
    result = chatd("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 0
    one_line(result.stderr, "warning", "GradAgenda endpoint /g", "4096")


def test_the_readme_cluster_example_passes_check_config_and_creates_its_database(tmp_path):
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    steps = readme.split("## From one node to three")[1].split("\n## ")[0]
    assert "createuser" in steps and "createdb --owner chatd chatd" in steps
    example = json.loads(steps.split("```json\n", 1)[1].split("```", 1)[0])
    assert "secret-key" not in example  # generated once, kept in the shared store
    example["host"] = "127.0.0.1:0"  # the example's 10.0.0.1 is not this machine's
    path = tmp_path / "node.json"
    path.write_text(json.dumps(example))
    result = chatd("check-config", str(path), cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")


def test_the_store_s_lock_file_is_ignored_by_git():
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    for name in ("chatd.db", "chatd.db.lock", "chatd.db-wal", "chatd.db-shm"):
        result = subprocess.run(["git", "check-ignore", "-q", name], cwd=root)
        assert result.returncode == 0, f"{name} is not ignored"
