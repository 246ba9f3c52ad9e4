"""The config file and the command line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

from chatd.config import ConfigError, decode_config, default_config, parse_host
from tests.conftest import GUARD, free_port, open_websocket_url


@pytest.mark.parametrize("text, named", [
    ('{"hots": "127.0.0.1:1"}', "hots"),
    ('{"wss": {"keyfile": "k", "certfile": "c", "passphrase": "x"}}', "passphrase"),
    ('{"endpoints": [{"path": "/a", "protocol": "multichat", "rooom": "x"}]}', "rooom"),
    ('{"endpoints": [{"path": "/a", "protocol": "irc"}]}', "protocol"),
    ('{"max-frame-bytes": "big"}', "max-frame-bytes"),
    ('{"host": "nowhere"}', "host"),
    ('{"host": "127.0.0.1:99999"}', "host"),
    ('{"ws-path": "chat"}', "ws-path"),
    ('{"endpoints": [{"path": "/a", "protocol": "wcp"}, {"path": "/a", "protocol": "wschat"}]}',
     "mounted twice"),
    ('{"secret-key": "x",}', "JSON"),
    # A shutdown waits for closing handshakes (RFC 6455 section 7.1.1).
    ('{"close-timeout": 20, "shutdown-timeout": 5}', "close-timeout must not exceed"),
])
def test_config_errors_name_the_key(text, named):
    with pytest.raises(ConfigError) as info:
        decode_config(text)
    assert named in str(info.value)


@pytest.mark.parametrize("text, shown", [
    ('{"\\n": ""}', "unknown key `\\n`"),
    ('{"host": "a\\u0007b:1x"}', "host 'a\\x07b:1x' has no valid port"),
    ('{"endpoints": [{"path": "/\\r", "protocol": "wcp"}, {"path": "/\\r", "protocol": "wcp"}]}',
     "path '/\\r' is mounted twice"),
])
def test_config_errors_are_one_line_with_unprintables_escaped(text, shown):
    # Found by the fuzzer below: a newline in a key made a two-line error.
    with pytest.raises(ConfigError) as info:
        decode_config(text)
    assert shown in str(info.value) and str(info.value).isprintable()


def test_a_multichat_go_server_config_decodes_unchanged():
    config = decode_config(json.dumps({
        "ws-path": "/chat", "host": ":1234", "secret-key": "s3cret",
        "wss": {"keyfile": "key.pem", "certfile": "cert.pem"}}))
    [endpoint] = config.mounted()
    assert (endpoint.path, endpoint.protocol, endpoint.room) == ("/chat", "multichat", "lobby")
    assert config.bind == (None, 1234)
    assert config.wss.keyfile == "key.pem"


@pytest.mark.parametrize("host, bind", [
    ("127.0.0.1:8765", ("127.0.0.1", 8765)),
    (":9000", (None, 9000)),
    ("[::1]:8765", ("::1", 8765)),
    ("localhost:1", ("localhost", 1)),
])
def test_host_forms(host, bind):
    assert parse_host(host) == bind


def test_default_mounts_all_five_protocols():
    mounted = {e.path: e.protocol for e in default_config().mounted()}
    assert mounted == {"/multichat": "multichat", "/": "multichat", "/gradagenda": "gradagenda",
                       "/socialvp": "socialvp", "/wschat": "wschat", "/wcp": "wcp"}


def test_jwt_secret_from_the_environment(monkeypatch):
    monkeypatch.setenv("JWT_SECRET", "from-env")
    assert decode_config("{}").jwt_secret == "from-env"


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatd", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=GUARD)


def test_check_config_prints_the_effective_config(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"secret-key": "abc", "host": ":8000"}')
    result = run_cli("check-config", str(path))
    assert result.returncode == 0
    effective = json.loads(result.stdout)
    assert effective["host"] == ":8000" and effective["max-frame-bytes"] == 65536  # a Go config: 64 KiB
    assert effective["secret-key"] == "********"  # shown with --show-secrets


def test_check_config_rejects_with_exit_1_naming_the_key(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"secret-key": "abc", "colour": "blue"}')
    result = run_cli("check-config", str(path))
    assert result.returncode == 1
    assert "colour" in result.stderr and str(path) in result.stderr


def test_token_command_prints_a_verifiable_token(tmp_path):
    from chatd.tokens import verify
    (tmp_path / "config.json").write_text('{"jwt-secret": "a-32-byte-long-secret-for-hs256!", "secret-key": "s"}')
    result = run_cli("token", "alice", "--ttl", "60", cwd=tmp_path)
    assert result.returncode == 0
    claims = verify("a-32-byte-long-secret-for-hs256!", result.stdout.strip(), require_exp=True)
    assert claims["sub"] == "alice"


async def _chat_once(port: int, path: str, secret: str) -> str:
    async with open_websocket_url(f"ws://127.0.0.1:{port}{path}") as a, \
            open_websocket_url(f"ws://127.0.0.1:{port}{path}") as b:
        for ws, name in ((a, "a"), (b, "b")):
            await ws.send_message(json.dumps({"action": "register", "client-name": name,
                                              "secret-key": secret}))
            assert json.loads(await ws.get_message()) == {"action": "register-ack"}
        await a.send_message(json.dumps({"action": "client-message", "content": "hi"}))
        return json.loads(await b.get_message())["content"]


async def test_go_server_config_in_cwd_runs_unchanged(process, tmp_path):
    port = free_port()
    (tmp_path / "config.json").write_text(json.dumps(
        {"ws-path": "/", "host": f":{port}", "secret-key": "go-secret"}))
    server = process("serve").start()  # no --config: ./config.json, as the original
    assert server.port == port
    with trio.fail_after(GUARD):
        assert await _chat_once(port, "/", "go-secret") == "hi"


async def test_sigterm_closes_clients_with_1012_and_exits_0(process, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"host": "127.0.0.1:0", "secret-key": "s", "store": str(tmp_path / "c.db")}))
    server = process("serve").start()
    with trio.fail_after(GUARD):
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as ws:
            await ws.send_message(json.dumps({"action": "register", "client-name": "x",
                                              "secret-key": "s"}))
            await ws.get_message()
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason.code == 1012
    assert await trio.to_thread.run_sync(server.proc.wait, GUARD) == 0
    assert "received SIGTERM" in server.output()


async def test_embedded_default_prints_and_keeps_generated_secrets(process, tmp_path):
    server = process("serve", "--host", "127.0.0.1:0").start()
    assert server.stop() == 0
    first = server.output()
    assert "generated secret-key" in first
    secret = first.split("generated secret-key (kept in chatd.db): ")[1].split()[0]
    server.start()
    assert f"stored secret-key (kept in chatd.db): {secret}" in server.output()
    with trio.fail_after(GUARD):
        assert await _chat_once(server.port, "/multichat", secret) == "hi"


def _open_file_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


async def test_serve_raises_the_soft_open_file_limit_to_the_hard_one(process, tmp_path):
    # systemd starts services with a soft limit of 1,024 whatever the hard
    # one: without this the 1,000th client would not be accepted.
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    (tmp_path / "config.json").write_text(json.dumps({"host": "127.0.0.1:0",
                                                      "max-connections": 100}))
    server = process("serve", nofile=(256, hard)).start()
    assert _open_file_limit(server.proc.pid) == (hard, hard)
    assert "open-file limit" not in server.output()
    assert server.stop() == 0


async def test_serve_warns_when_even_the_hard_open_file_limit_is_too_low(process, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"host": "127.0.0.1:0",
                                                      "max-connections": 1000}))
    server = process("serve", nofile=(512, 512)).start()
    assert "open-file limit 512 is below max-connections 1000" in server.output()
    assert server.stop() == 0


async def test_running_out_of_descriptors_is_one_warning_and_clients_are_served_after(
        process, tmp_path):
    # trio's accept loop logs each failed accept (EMFILE) at ERROR with a
    # traceback, ten times a second; an operator needs one line saying why.
    from tests.rawws import open_stream
    # max-connections set above the limit (unset, chatd would cap it below
    # the limit and answer 503 instead).
    (tmp_path / "config.json").write_text(json.dumps({
        "host": "127.0.0.1:0", "secret-key": "s", "store": str(tmp_path / "c.db"),
        "max-connections": 1000,
        "endpoints": [{"path": "/multichat", "protocol": "multichat"}]}))
    server = process("serve", nofile=(48, 48)).start()
    streams = []
    with trio.fail_after(GUARD):
        while "out of file descriptors" not in server.output():
            streams.append(await open_stream(server.port))  # held in the backlog past the limit
        for stream in streams:
            await stream.aclose()
        # Descriptors freed: the next client is served.
        assert await _chat_once(server.port, "/multichat", "s") == "hi"
    assert server.stop() == 0
    output = server.output()
    assert "Traceback" not in output and " ERROR " not in output
    assert output.count("out of file descriptors") == 1, output


def test_the_example_config_is_valid_and_names_every_key():
    from pathlib import Path

    import msgspec

    from chatd.config import Config, load_config
    example = Path(__file__).parent.parent / "config.json.example"
    load_config(example)
    keys = set(json.loads(example.read_text()))
    every = {f.encode_name for f in msgspec.structs.fields(Config)}
    assert every - keys <= {"wss"}, "config.json.example must show every key"


def test_a_port_in_use_is_one_clear_line_and_exit_1(tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--host", f"127.0.0.1:{port}", "--store",
                         str(tmp_path / "c.db"), cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing else happened first: no store opened, no secret printed.
    assert "jwt-secret" not in result.stderr and "stopped" not in result.stderr


async def test_token_uses_the_secret_a_server_generated_in_its_store(process, tmp_path):
    from chatd.tokens import verify
    store = tmp_path / "elsewhere.db"
    server = process("serve", "--host", "127.0.0.1:0", "--store", str(store)).start()
    secret = server.output().split("generated jwt-secret (kept in ")[1].split(": ")[1].split()[0]
    result = run_cli("token", "alice", "--store", str(store), cwd=tmp_path)
    assert result.returncode == 0
    assert verify(secret, result.stdout.strip(), require_exp=True)["sub"] == "alice"


def test_token_refuses_rather_than_invent_a_secret(tmp_path):
    result = run_cli("token", "alice", cwd=tmp_path)  # no config, no chatd.db here
    assert result.returncode == 1
    assert "no jwt-secret configured" in result.stderr
    assert not (tmp_path / "chatd.db").exists()


async def test_tls_context_serves_a_tls_handshake(tmp_path):
    # The context check-config builds is the one the server listens with.
    import ssl

    import trustme

    from chatd.config import Wss, tls_context

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    config = default_config()
    config.wss = Wss(keyfile=str(tmp_path / "key.pem"), certfile=str(tmp_path / "cert.pem"))
    server_context = tls_context(config)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    async with trio.SSLListener(listener, server_context) as tls_listener:
        async with trio.open_nursery() as nursery:
            async def answer() -> None:
                async with await tls_listener.accept() as stream:
                    await stream.send_all(b"hello over tls")
            nursery.start_soon(answer)
            with trio.fail_after(GUARD):
                client = await trio.open_ssl_over_tcp_stream("127.0.0.1", port,
                                                             ssl_context=client_context)
                async with client:
                    assert await client.receive_some(100) == b"hello over tls"


def test_no_wss_means_no_tls_context():
    from chatd.config import tls_context
    assert tls_context(default_config()) is None


# --- fuzzing: every input is a Config or a ConfigError, never another exception ---


def _config_objects():
    from hypothesis import strategies as st

    from chatd.config import Config
    from tests.strategies import json_values

    keys = [f.encode_name for f in __import__("msgspec").structs.fields(Config)]
    values = json_values | st.sampled_from(["", " ", "change me", "********", ":0",
                                            "127.0.0.1:1", "/", "lobby"])
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), values, max_size=6)


def test_fuzzed_configs_decode_or_name_the_problem():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from chatd.config import Config, effective_config

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(_config_objects().map(json.dumps), st.text(max_size=40)))
    def check(text):
        try:
            config = decode_config(text)
        except ConfigError as exc:
            assert str(exc) and str(exc).isprintable()  # one line
            return
        assert isinstance(config, Config)
        effective_config(config)  # printable, whatever was accepted

    check()


def test_fuzzed_jwt_secret_environment_is_set_or_refused(monkeypatch):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None)
    @given(st.text(alphabet=st.characters(blacklist_categories=["Cs"],
                                          blacklist_characters="\x00"), max_size=20))
    def check(value):
        monkeypatch.setenv("JWT_SECRET", value)
        try:
            config = decode_config("{}")
        except ConfigError as exc:
            assert "JWT_SECRET" in str(exc)
            return
        assert config.jwt_secret == value and value.strip()

    check()


def test_fuzzed_ttl_and_user_id_arguments_are_taken_or_refused():
    import argparse

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from chatd.cli import MAX_TTL, _ttl, _user_id

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.text(max_size=12), st.floats().map(repr), st.integers().map(str)))
    def check(text):
        for parse in (_ttl, _user_id):
            try:
                value = parse(text)
            except argparse.ArgumentTypeError as exc:
                assert repr(text) in str(exc)
                continue
            if parse is _ttl:
                assert 1 <= value <= MAX_TTL
            else:
                assert value == text

    check()


def test_fuzzed_tls_files_load_or_name_the_file(tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from chatd.config import Wss, tls_context

    pem = st.sampled_from(["-----BEGIN CERTIFICATE-----\n", "-----END CERTIFICATE-----\n",
                           "-----BEGIN PRIVATE KEY-----\n", "-----END PRIVATE KEY-----\n",
                           "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n", "\n"])
    contents = st.lists(pem, max_size=6).map("".join).map(str.encode) | st.binary(max_size=64)

    @settings(max_examples=50, deadline=None)
    @given(contents, contents)
    def check(key, cert):
        (tmp_path / "key.pem").write_bytes(key)
        (tmp_path / "cert.pem").write_bytes(cert)
        config = default_config()
        config.wss = Wss(keyfile=str(tmp_path / "key.pem"), certfile=str(tmp_path / "cert.pem"))
        with pytest.raises(ConfigError) as info:  # none of these is a usable pair
            tls_context(config)
        assert "wss.keyfile" in str(info.value) or "wss.certfile" in str(info.value)

    check()
