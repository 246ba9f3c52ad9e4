"""The Node ``ws`` and Go benchmark peers and bench_peers.py, run as a user runs them.

The peers (scripts/peers/node_ws, scripts/peers/go_ws in its two modes)
must speak multichat as the websockets peer does, or the figures compared
with them mean nothing: register first (else 1008), then each message goes
to every other registered client. These tests need ``node`` (its ``ws``
package is installed with ``npm ci`` on first use, as bench_peers does)
and ``go`` with Debian's gorilla/websocket (the Go peers are built on first
use): without them they skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from tests.conftest import open_websocket_url

from tests.conftest import SECRET, Peer

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.append(str(SCRIPTS))
from loadgen.gobuild import go_problem  # noqa: E402
from loadgen.servers import ServerProcess, node_peer_problem  # noqa: E402

# A hang guard for one script run, never a timing assertion.
RUN_GUARD = 120


def require_node() -> None:
    """Skip without node (fail under CI=true); fail if the peer cannot be installed."""
    if shutil.which("node") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is not installed: CI must run the Node ws peer's tests")
        pytest.skip("node is not installed: the Node ws peer cannot run")
    problem = node_peer_problem()
    if problem:
        pytest.fail(f"the Node ws peer cannot run: {problem}")


def require_go() -> None:
    """Skip without go and gorilla/websocket (fail under CI=true)."""
    problem = go_problem("go-ws")
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Go peers' tests: {problem}")
        pytest.skip(f"the Go peers cannot be built: {problem}")


def require(peer: str) -> None:
    if peer == "node-ws":
        require_node()
    else:
        require_go()


@pytest.fixture(scope="module", params=["node-ws", "go-ws", "go-coalesce"])
def peer_url(request):
    """Each compiled or Node peer in turn, started as bench_peers starts it."""
    require(request.param)
    server = ServerProcess(request.param, None, SECRET, None)
    yield f"ws://127.0.0.1:{server.port}"
    server.stop()


async def connect(stack: AsyncExitStack, url: str) -> Peer:
    return Peer(await stack.enter_async_context(open_websocket_url(url)))


async def register(peer: Peer, name: str) -> None:
    await peer.send({"action": "register", "client-name": name, "secret-key": SECRET})
    assert await peer.recv() == {"action": "register-ack"}


async def test_peer_acknowledges_register_and_forwards_to_every_other_client(peer_url):
    async with AsyncExitStack() as stack:
        alice, bob, carol = [await connect(stack, f"{peer_url}/chat") for _ in range(3)]
        for peer, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
            await register(peer, name)
        await alice.send({"action": "client-message", "content": "hello, ünïcode"})
        forwarded = {"action": "forwarding-message", "source-client-name": "alice",
                     "content": "hello, ünïcode"}
        assert await bob.recv() == forwarded
        assert await carol.recv() == forwarded
        # Frames multichat ignores after registration change nothing.
        await bob.send("not json")
        await bob.send({"action": "client-message", "content": ""})
        await bob.send({"action": "client-message", "content": "hi alice"})
        # Alice's next frame is Bob's message: her own never came back to her.
        assert await alice.recv() == {"action": "forwarding-message",
                                      "source-client-name": "bob", "content": "hi alice"}
        assert (await carol.recv())["content"] == "hi alice"


@pytest.mark.parametrize("first", [
    {"action": "register", "client-name": "mallory", "secret-key": "not the secret"},
    {"action": "register", "client-name": "", "secret-key": SECRET},
    {"action": "client-message", "content": "before registering"},
    "not json",
    [1, 2],
])
async def test_peer_closes_a_connection_whose_first_frame_is_no_valid_register(
        peer_url, first):
    async with AsyncExitStack() as stack:
        watcher = await connect(stack, peer_url)
        await register(watcher, "watcher")
        intruder = await connect(stack, peer_url)
        await intruder.send(first)
        assert await intruder.closed() == 1008
        # The refused client sends nothing to anyone: the watcher's next frame
        # is a registered client's message.
        speaker = await connect(stack, peer_url)
        await register(speaker, "speaker")
        await speaker.send({"action": "client-message", "content": "still here"})
        assert (await watcher.recv())["source-client-name"] == "speaker"


async def test_peer_closes_a_frame_over_4096_bytes_with_1009(peer_url):
    async with AsyncExitStack() as stack:
        peer = await connect(stack, peer_url)
        await register(peer, "big")
        await peer.send({"action": "client-message", "content": "x" * 5000})
        assert await peer.closed() == 1009


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=RUN_GUARD, env=env)


def test_loadtest_fanout_against_the_node_peer_delivers_every_message():
    require_node()
    proc = run_script(str(SCRIPTS / "loadtest.py"), "fanout", "--spawn", "node-ws",
                      "--subscribers", "4", "--duration", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error_count"] == 0 and result["close_codes"] == {}, proc.stderr
    assert result["publishes"] > 0
    # 4 subscribers and the publisher's probe; multichat does not echo.
    assert result["expected_deliveries"] == result["publishes"] * 5
    assert result["delivered_ratio"] == 1.0
    assert result["server"]["rss_before_kib"] > 0


def test_bench_peers_puts_chatd_beside_the_node_peer():
    require_node()
    proc = run_script(str(SCRIPTS / "bench_peers.py"), "--peers", "node-ws", "--duration", "1",
                      "--rounds", "1", "--attempts", "1", "--subscribers", "4",
                      "--idle-connections", "20", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["servers"] == ["chatd", "node-ws"]
    assert all(summary["peak_deliveries_per_s"][s] > 0 for s in ("chatd", "node-ws"))
    assert set(summary["ratios"]) == {"node-ws"}
    assert set(summary["idle_rss_per_connection_kib"]) == {"chatd", "node-ws"}
    assert all(run["connections"] == 20 for runs in summary["idle_runs"].values()
               for run in runs)
    table = "\n".join(lines[:-1])
    assert "chatd/node-ws" in table
    assert "idle RSS/connection (KiB) at 20" in table


@pytest.mark.parametrize("peer", ["go-ws", "go-coalesce"])
def test_loadtest_fanout_against_a_go_peer_delivers_every_message(peer):
    require_go()
    proc = run_script(str(SCRIPTS / "loadtest.py"), "fanout", "--spawn", peer,
                      "--subscribers", "4", "--duration", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error_count"] == 0 and result["close_codes"] == {}, proc.stderr
    assert result["publishes"] > 0
    assert result["expected_deliveries"] == result["publishes"] * 5
    assert result["delivered_ratio"] == 1.0


def test_loadtest_over_wss_terminated_by_the_go_peer():
    require_go()
    proc = run_script(str(SCRIPTS / "loadtest.py"), "fanout", "--spawn", "go-coalesce", "--tls",
                      "--subscribers", "4", "--duration", "1", "--rate", "500", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["target"].startswith("wss://")
    assert result["error_count"] == 0 and result["close_codes"] == {}, proc.stderr
    assert result["delivered_ratio"] == 1.0


def test_bench_peers_puts_chatd_beside_the_go_peers():
    require_go()
    proc = run_script(str(SCRIPTS / "bench_peers.py"), "--peers", "go-ws,go-coalesce",
                      "--duration", "1", "--rounds", "1", "--attempts", "1",
                      "--subscribers", "4", "--idle-connections", "20", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["servers"] == ["chatd", "go-ws", "go-coalesce"]
    assert all(summary["peak_deliveries_per_s"][s] > 0 for s in summary["servers"])
    assert set(summary["ratios"]) == {"go-ws", "go-coalesce"}


def test_bench_peers_names_a_peer_that_cannot_run_in_one_line():
    env = {**os.environ, "PATH": "/nonexistent"}  # no node, no npm, no go
    proc = run_script(str(SCRIPTS / "bench_peers.py"), "--peers", "node-ws,go-ws,go-coalesce",
                      env=env)
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [
        "bench_peers: node-ws peer left out: node not found",
        "bench_peers: go-ws peer left out: go not found (Debian: apt-get install golang-go)",
        "bench_peers: go-coalesce peer left out: go not found (Debian: apt-get install "
        "golang-go)",
        "bench_peers: no peer can run here to compare chatd with"]
