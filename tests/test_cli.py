"""The command line as an operator meets it (issue #11).

Each mistake ends in one line on stderr naming the thing, a non-zero exit
and no traceback. A representative case of each kind runs ``python -m
chatd`` as a real process; the rest of the kind calls ``main()`` in
process, which takes the same path and is cheaper.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import msgspec
import pytest
import trustme

from chatd.cli import MAX_TTL, main
from chatd.config import REDACTED, Config
from chatd.tokens import verify
from tests.conftest import GUARD

ROOT = Path(__file__).parent.parent
GOOD_SECRET = "a-32-byte-long-secret-for-hs256!"


def chatd(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m chatd ARGS`` in ``cwd``, without the caller's JWT_SECRET."""
    environ = {k: v for k, v in os.environ.items() if k != "JWT_SECRET"}
    return subprocess.run([sys.executable, "-m", "chatd", *args], cwd=cwd,
                          env={**environ, **(env or {})}, capture_output=True, text=True,
                          timeout=GUARD)


def one_line(stderr: str, *named: str) -> str:
    """The single line of ``stderr``, which must name each of ``named``."""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for thing in named:
        assert thing in lines[0], (thing, lines[0])
    return lines[0]


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """``main(args)`` in ``tmp_path``: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JWT_SECRET", raising=False)
    # Whatever goes wrong, no server starts in the test process.
    monkeypatch.setattr("chatd.cli.serve_forever",
                        lambda config: pytest.fail("the server would have started"))

    def call(*args: str) -> tuple[int, str, str]:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return call


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


# --- item 2: every file the config names ------------------------------------------


@pytest.mark.parametrize("content, says", [
    (None, "cannot read {path}: No such file or directory"),
    ("directory", "cannot read {path}: Is a directory"),
    (b"\xff\xfe", "{path}: not valid JSON"),
    (b"", "{path}: not valid JSON"),
    (b"[]", "{path}: Expected `object`, got `array`"),
], ids=["missing", "directory", "binary", "empty", "not-an-object"])
def test_an_unusable_config_file_is_named(run, tmp_path, content, says):
    path = tmp_path / "c.json"
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    for args in (["check-config", str(path)], ["serve", "--config", str(path)],
                 ["token", "alice", "--config", str(path)]):
        code, out, err = run(*args)
        assert code == 1 and out == ""
        one_line(err, says.format(path=path))


@pytest.fixture(scope="module")
def pems(tmp_path_factory) -> dict[str, Path]:
    """A certificate and its key, and every way of getting them wrong."""
    from cryptography.hazmat.primitives import serialization

    d = tmp_path_factory.mktemp("pems")
    ca = trustme.CA()
    cert, other = ca.issue_cert("localhost"), ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(d / "cert.pem")
    cert.private_key_pem.write_to_path(d / "key.pem")
    other.private_key_pem.write_to_path(d / "other-key.pem")
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    (d / "encrypted-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    (d / "key.der").write_bytes(key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (d / "notes.txt").write_text("my certificate is somewhere else\n")
    (d / "empty.pem").write_text("")
    (d / "a-directory").mkdir()
    os.mkfifo(d / "fifo")
    for name in ("key.pem", "other-key.pem", "encrypted-key.pem", "key.der"):
        (d / name).chmod(0o600)
    return {p.name: p for p in d.iterdir()}


# (keyfile, certfile, the key named in the message, what the message says)
TLS_MISTAKES = {
    "key missing": ("/nonexistent/key.pem", "cert.pem", "wss.keyfile",
                    "/nonexistent/key.pem: No such file or directory"),
    "cert missing": ("key.pem", "/nonexistent/cert.pem", "wss.certfile",
                     "/nonexistent/cert.pem: No such file or directory"),
    "key is a directory": ("a-directory", "cert.pem", "wss.keyfile", "is a directory"),
    "cert is a FIFO": ("key.pem", "fifo", "wss.certfile", "not a regular file"),
    "key path empty": ("", "cert.pem", "wss.keyfile", "is empty"),
    "key not PEM": ("notes.txt", "cert.pem", "wss.keyfile", "not a PEM private key"),
    "key is DER": ("key.der", "cert.pem", "wss.keyfile", "not a PEM file"),
    "key empty": ("empty.pem", "cert.pem", "wss.keyfile", "not a PEM private key"),
    "cert not PEM": ("key.pem", "notes.txt", "wss.certfile", "not a PEM certificate"),
    "cert is a key": ("key.pem", "key.pem", "wss.certfile", "not a PEM certificate"),
    "key of another cert": ("other-key.pem", "cert.pem", "wss.keyfile",
                            "is not the key of wss.certfile"),
    "key encrypted": ("encrypted-key.pem", "cert.pem", "wss.keyfile",
                      "encrypted; chatd needs it without a passphrase"),
}


def _wss(pems: dict[str, Path], keyfile: str, certfile: str) -> dict:
    def where(name: str) -> str:
        return str(pems[name]) if name in pems else name
    return {"wss": {"keyfile": where(keyfile), "certfile": where(certfile)}}


@pytest.mark.parametrize("mistake", TLS_MISTAKES)
def test_check_config_refuses_each_unusable_tls_file_naming_key_and_path(run, tmp_path, pems,
                                                                          mistake):
    keyfile, certfile, key, says = TLS_MISTAKES[mistake]
    path = write_config(tmp_path / "c.json", _wss(pems, keyfile, certfile))
    code, out, err = run("check-config", str(path))
    assert code == 1 and out == ""
    one_line(err, str(path), key, says)


def test_check_config_accepts_a_matching_pair_and_a_combined_file(run, tmp_path, pems):
    combined = tmp_path / "combined.pem"
    combined.write_bytes(pems["key.pem"].read_bytes() + pems["cert.pem"].read_bytes())
    combined.chmod(0o600)
    for keyfile, certfile in (("key.pem", "cert.pem"), (str(combined), str(combined))):
        path = write_config(tmp_path / "c.json", _wss(pems, keyfile, certfile))
        code, out, err = run("check-config", str(path))
        assert (code, err) == (0, "")
        assert json.loads(out)["wss"]["keyfile"] in (str(pems["key.pem"]), str(combined))


def test_check_config_names_an_unreadable_key(tmp_path, pems):
    # Root reads every file whatever its mode, so the check runs as nobody
    # (uid 65534) in a forked child when the suite runs as root (CI does).
    shared = Path(tempfile.mkdtemp())
    try:
        shared.chmod(0o755)
        cert = shared / "cert.pem"
        shutil.copy(pems["cert.pem"], cert)
        cert.chmod(0o644)
        locked = shared / "locked.pem"
        shutil.copy(pems["key.pem"], locked)
        locked.chmod(0)
        config = write_config(shared / "c.json", {"wss": {"keyfile": str(locked),
                                                          "certfile": str(cert)}})
        config.chmod(0o644)
        code, err = _check_config_as_another_user(str(config))
    finally:
        shutil.rmtree(shared)
    assert code == 1
    one_line(err, "wss.keyfile", str(locked), "Permission denied")


def _check_config_as_another_user(path: str) -> tuple[int, str]:
    """``chatd check-config PATH``'s exit code and stderr, run without root's
    privileges: in a forked child that drops to ``nobody`` if this process
    is root (the interpreter itself may sit where nobody can read it)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, run, report, leave
        code = 70
        try:
            os.close(read)
            os.dup2(write, 2)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            with open(os.devnull, "w") as quiet:
                sys.stdout = quiet
                code = main(["check-config", path])
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        err = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_check_config_warns_about_a_key_every_user_can_read(run, tmp_path, pems):
    shared = tmp_path / "shared.pem"
    shutil.copy(pems["key.pem"], shared)
    shared.chmod(0o644)
    path = write_config(tmp_path / "c.json", _wss(pems, str(shared), "cert.pem"))
    code, out, err = run("check-config", str(path))
    assert code == 0 and json.loads(out)
    one_line(err, "warning", "wss.keyfile", str(shared), "chmod o-r")


def test_serve_with_a_missing_key_says_which_and_where(tmp_path, pems):
    # The issue's case: before, "cannot start: [Errno 2] No such file or directory".
    path = write_config(tmp_path / "c.json",
                        _wss(pems, "/nonexistent/key.pem", "cert.pem")
                        | {"host": "127.0.0.1:0", "store": str(tmp_path / "c.db")})
    result = chatd("serve", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 1
    one_line(result.stderr, "wss.keyfile /nonexistent/key.pem: No such file or directory")
    assert not (tmp_path / "c.db").exists()  # refused before anything started


# --- item 5: a secret that cannot work --------------------------------------------


@pytest.mark.parametrize("key", ["secret-key", "jwt-secret"])
@pytest.mark.parametrize("value", ["", " ", "\t\n"], ids=["empty", "space", "blank"])
def test_an_empty_secret_is_refused_naming_the_key(run, tmp_path, key, value):
    path = write_config(tmp_path / "c.json", {key: value})
    for args in (["check-config", str(path)], ["serve", "--config", str(path)],
                 ["token", "alice", "--config", str(path)]):
        code, out, err = run(*args)
        assert code == 1 and out == ""
        one_line(err, str(path), f"{key} is empty")


@pytest.mark.parametrize("value", ["", "   "], ids=["empty", "blank"])
def test_an_empty_jwt_secret_in_the_environment_is_refused(run, tmp_path, monkeypatch, value):
    monkeypatch.setenv("JWT_SECRET", value)
    for args in (["check-config"], ["serve"], ["token", "alice"]):
        code, out, err = run(*args)
        assert code == 1 and out == ""
        one_line(err, "JWT_SECRET in the environment is empty")


def test_token_with_an_empty_environment_secret_is_one_line_not_invalid_key_error(tmp_path):
    # The issue's case: `chatd token` crashed with InvalidKeyError.
    result = chatd("token", "alice", cwd=tmp_path, env={"JWT_SECRET": ""})
    assert result.returncode == 1 and result.stdout == ""
    one_line(result.stderr, "JWT_SECRET in the environment is empty")


def test_serve_refuses_an_empty_secret_before_starting(tmp_path):
    path = write_config(tmp_path / "c.json", {"secret-key": "", "host": "127.0.0.1:0",
                                              "store": str(tmp_path / "c.db")})
    result = chatd("serve", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 1
    one_line(result.stderr, "secret-key is empty")
    assert not (tmp_path / "c.db").exists()


def test_a_short_jwt_secret_is_a_warning_citing_rfc_7518(run, tmp_path):
    path = write_config(tmp_path / "c.json", {"jwt-secret": "short"})
    code, out, err = run("check-config", str(path))
    assert code == 0 and json.loads(out)["jwt-secret"] == REDACTED
    one_line(err, "warning", "jwt-secret is 5 bytes", "RFC 7518")


# --- item 6: the example config ----------------------------------------------------


def test_the_example_config_passes_check_config(tmp_path):
    shutil.copy(ROOT / "config.json.example", tmp_path / "config.json")
    result = chatd("check-config", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    effective = json.loads(result.stdout)
    # Secrets left to chatd, which generates them: nothing publicly known.
    assert effective["secret-key"] is None and effective["jwt-secret"] is None


def test_serving_the_copied_example_runs_on_generated_secrets(process, tmp_path):
    shutil.copy(ROOT / "config.json.example", tmp_path / "config.json")
    server = process("serve", "--host", "127.0.0.1:0", "--store", str(tmp_path / "c.db"))
    server.start()
    assert server.stop() == 0
    log = server.output()
    assert "generated secret-key" in log and "generated jwt-secret" in log
    assert "change me" not in log


@pytest.mark.parametrize("value", [
    "change me: the multichat shared secret",
    "change me: the HS256 key for GradAgenda tokens and wschat jwt",
    "CHANGEME", "change-me-please", REDACTED,
])
@pytest.mark.parametrize("key", ["secret-key", "jwt-secret"])
def test_a_placeholder_secret_is_refused(run, tmp_path, key, value):
    path = write_config(tmp_path / "c.json", {key: value})
    for args in (["check-config", str(path)], ["serve", "--config", str(path)]):
        code, _, err = run(*args)
        assert code == 1
        one_line(err, str(path), key, "set a real secret")


def test_serve_refuses_the_old_example_secrets_in_one_line(tmp_path):
    # The issue's case: it ran on the example's publicly known secrets.
    write_config(tmp_path / "config.json", {
        "host": "127.0.0.1:0", "store": str(tmp_path / "c.db"),
        "secret-key": "change me: the multichat shared secret"})
    result = chatd("serve", cwd=tmp_path)
    assert result.returncode == 1
    one_line(result.stderr, "config.json", "secret-key is the example's placeholder")


# --- item 7: every bad --ttl and user id ---------------------------------------------


@pytest.mark.parametrize("ttl", ["inf", "-inf", "nan", "0", "-5", "0.5", "1e300",
                                 str(MAX_TTL + 1), "abc", "", "1h"])
def test_token_refuses_a_ttl_it_cannot_honour(run, tmp_path, ttl):
    write_config(tmp_path / "config.json", {"jwt-secret": GOOD_SECRET})
    code, out, err = run("token", "alice", f"--ttl={ttl}")
    assert code == 2 and out == ""
    one_line(err, "--ttl", repr(ttl))


@pytest.mark.parametrize("ttl", ["inf", "nan", "0", "-5"])
def test_token_ttl_mistakes_are_one_line_in_a_real_process(tmp_path, ttl):
    # The issue's cases: an OverflowError traceback, a confusing message,
    # and already-expired tokens minted with exit 0.
    result = chatd("token", "alice", "--ttl", ttl, cwd=tmp_path,
                   env={"JWT_SECRET": GOOD_SECRET})
    assert result.returncode == 2 and result.stdout == ""
    one_line(result.stderr, "--ttl", "1 to")


@pytest.mark.parametrize("user_id, why", [
    ("", "empty"), ("a\x00b", "U+0000"), ("bell\x07", "U+0007"), ("x" * 257, "256"),
    ("\x1b[31mred", "U+001B"), ("alice\u200b", "U+200B"), ("ａｌｉｃｅ", "normalised form"),
], ids=["empty", "nul", "bell", "too-long", "escape", "zero-width", "full-width"])
def test_token_refuses_a_user_id_the_server_refuses(run, tmp_path, user_id, why):
    # The server's own rule (chatd.names), so a token is never minted for
    # an id that authenticate would refuse.
    write_config(tmp_path / "config.json", {"jwt-secret": GOOD_SECRET})
    code, out, err = run("token", user_id)
    assert code == 2 and out == ""
    one_line(err, "USER-ID", why)


def test_token_for_an_empty_user_id_in_a_real_process(tmp_path):
    result = chatd("token", "", cwd=tmp_path, env={"JWT_SECRET": GOOD_SECRET})
    assert result.returncode == 2 and result.stdout == ""
    one_line(result.stderr, "USER-ID")


@pytest.mark.parametrize("ttl, lifetime", [("1", 1), ("3600", 3600), ("90.9", 90),
                                           (str(MAX_TTL), MAX_TTL)])
def test_token_lives_for_its_ttl(run, tmp_path, ttl, lifetime):
    write_config(tmp_path / "config.json", {"jwt-secret": GOOD_SECRET})
    code, out, err = run("token", "alice", "--ttl", ttl)
    assert (code, err) == (0, "")
    claims = verify(GOOD_SECRET, out.strip(), require_exp=True)
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == lifetime
    assert claims["exp"] > time.time()


# --- item 8: help is plain text ----------------------------------------------------


@pytest.mark.parametrize("command", [[], ["serve"], ["check-config"], ["token"]])
def test_help_is_plain_text(tmp_path, command):
    result = chatd(*command, "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert "usage: chatd" in result.stdout
    for markup in ("``", "`", ":func:", ":class:"):
        assert markup not in result.stdout


def test_a_usage_error_is_one_line_that_points_to_help(tmp_path):
    result = chatd("serve", "--log-level", "loud", cwd=tmp_path)
    assert result.returncode == 2
    one_line(result.stderr, "--log-level", "'loud'", "chatd serve --help")


# --- item 9: check-config prints the config in effect -------------------------------


def test_check_config_prints_what_a_go_style_config_mounts(tmp_path):
    path = write_config(tmp_path / "c.json", {"ws-path": "/chat", "host": ":1234",
                                              "secret-key": "go-secret-of-16+b"})
    result = chatd("check-config", str(path), cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    effective = json.loads(result.stdout)
    # Before: "endpoints": null. The original's frame bound: 64 KiB.
    assert effective["endpoints"] == [{"path": "/chat", "protocol": "multichat", "room": "lobby",
                                       "max-frame-bytes": 65536}]
    assert effective["web-client"] is None  # off without endpoints
    assert effective["secret-key"] == REDACTED


def test_check_config_shows_gradagenda_without_a_room(run, tmp_path):
    path = write_config(tmp_path / "c.json", {"endpoints": [
        {"path": "/g", "protocol": "gradagenda"}, {"path": "/w", "protocol": "wcp", "room": "r"}]})
    code, out, _ = run("check-config", str(path))
    assert code == 0
    effective = json.loads(out)
    assert effective["endpoints"] == [{"path": "/g", "protocol": "gradagenda",
                                       "max-frame-bytes": 4096},
                                      {"path": "/w", "protocol": "wcp", "room": "r",
                                       "max-frame-bytes": 4096}]
    assert effective["web-client"] == "/app/"


def test_check_config_fills_in_every_key(run, tmp_path):
    path = write_config(tmp_path / "c.json", {})
    code, out, _ = run("check-config", str(path))
    effective = json.loads(out)
    every = [f.encode_name for f in msgspec.structs.fields(Config)]
    assert code == 0 and list(effective) == every
    assert effective["max-frame-bytes"] == 65536 and effective["store"] == "chatd.db"


def test_check_config_without_a_path_checks_what_serve_would_run(run, tmp_path):
    code, out, _ = run("check-config")  # no ./config.json: the embedded default
    paths = {e["path"]: e["protocol"] for e in json.loads(out)["endpoints"]}
    assert code == 0 and paths == {"/multichat": "multichat", "/": "multichat",
                                   "/gradagenda": "gradagenda", "/socialvp": "socialvp",
                                   "/wschat": "wschat", "/wcp": "wcp"}
    write_config(tmp_path / "config.json", {"ws-path": "/here"})
    code, out, _ = run("check-config")
    assert code == 0 and json.loads(out)["endpoints"][0]["path"] == "/here"


def test_check_config_hides_secrets_unless_asked(run, tmp_path, monkeypatch):
    path = write_config(tmp_path / "c.json", {"secret-key": "bridge-secret"})
    monkeypatch.setenv("JWT_SECRET", GOOD_SECRET)
    code, out, _ = run("check-config", str(path))
    assert code == 0 and GOOD_SECRET not in out and "bridge-secret" not in out
    assert json.loads(out)["jwt-secret"] == REDACTED
    code, out, _ = run("check-config", "--show-secrets", str(path))
    shown = json.loads(out)
    assert (shown["secret-key"], shown["jwt-secret"]) == ("bridge-secret", GOOD_SECRET)


def test_the_printed_config_is_a_config_chatd_accepts(run, tmp_path):
    path = write_config(tmp_path / "c.json", {"secret-key": "bridge-secret", "ws-path": "/x"})
    code, out, _ = run("check-config", "--show-secrets", str(path))
    (tmp_path / "again.json").write_text(out)
    code, again, _ = run("check-config", "--show-secrets", str(tmp_path / "again.json"))
    assert code == 0 and json.loads(again) == json.loads(out)


# --- items 10-12: the docs as a newcomer follows them --------------------------------


def _code_block_after(text: str, marker: str) -> str:
    after = text[text.index(marker):]
    return after.split("```sh\n", 1)[1].split("```", 1)[0].strip()


def test_the_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    command = _code_block_after(readme, "Install and run the whole test suite")
    assert "python3 -m venv" in command  # runs on a stock python3 (PEP 668)
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci


def test_the_readme_quick_start_uses_a_virtual_environment():
    readme = (ROOT / "README.md").read_text()
    command = _code_block_after(readme, "## Quick start")
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
    assert command.endswith("chatd serve")
    assert "Python 3.11" in readme.split("## Running it")[0]


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    return [ROOT / name for name in listed
            if name.endswith((".md", ".py", ".toml", ".example", ".txt")) or name == ".ci/run"]


def test_no_document_points_outside_the_repository():
    this = Path(__file__).resolve()
    for path in _tracked_text_files():
        if path.resolve() == this:
            continue
        text = path.read_text()
        for outside in ("../shared", "seeds/", "DESIGN.md"):
            assert outside not in text, f"{path.relative_to(ROOT)} mentions {outside}"


def test_every_file_the_docs_link_or_name_exists():
    import re

    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        links = [target.split("#")[0] for target in re.findall(r"\]\(([^)]+)\)", text)
                 if not target.startswith(("http://", "https://", "#"))]
        for link in links:
            assert (path.parent / link).exists(), f"{path.relative_to(ROOT)} links {link}"
        for named in re.findall(r"`((?:docs|scripts|tests|chatd)/[\w/.-]+)`", text):
            assert (ROOT / named).exists(), f"{path.relative_to(ROOT)} names {named}"


# --- item 13: the suite fails on a leaked socket, and says why it skips -------------


LEAK_TESTS = '''
import socket

import pytest


def test_leaks_a_socket():
    socket.socket()


async def test_skips_without_a_reason():
    pytest.skip()


async def test_skips_with_a_reason():
    pytest.skip("nothing to do here")
'''


def test_the_suite_fails_on_a_leaked_socket_and_a_reasonless_skip(tmp_path):
    # These tests, run with this project's pytest options and conftest.
    (tmp_path / "test_leaks.py").write_text(LEAK_TESTS)
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "test_leaks.py"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=60)
    assert result.returncode == 1, result.stdout
    assert "FAILED test_leaks.py::test_leaks_a_socket" in result.stdout
    assert "ResourceWarning: unclosed <socket.socket" in result.stdout
    assert "test_skips_without_a_reason was skipped without a reason" in result.stdout
    line = LEAK_TESTS.splitlines().index('    pytest.skip("nothing to do here")') + 1
    assert f"SKIPPED [1] test_leaks.py:{line}: nothing to do here" in result.stdout


@pytest.mark.parametrize("args", [("serve", "--store", ""), ("serve", "--store", "  "),
                                  ("token", "alice", "--store", "")])
def test_an_empty_store_argument_is_refused_not_read_as_the_default(run, tmp_path, args):
    # An unset $STORE in `chatd serve --store "$STORE"` used to mean ./chatd.db.
    code, _, err = run(*args)
    assert code == 1
    one_line(err, "--store is empty")
    assert not (tmp_path / "chatd.db").exists()


def test_an_empty_store_in_the_config_is_refused(run, tmp_path):
    (tmp_path / "c.json").write_text('{"store": ""}')
    code, _, err = run("check-config", "c.json")
    assert code == 1
    one_line(err, "store must be a SQLite file path or a postgresql:// URL, not empty")
