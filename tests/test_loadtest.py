"""scripts/loadtest.py run as a user runs it, against real chatd processes.

Each case is a one-second scenario with a few clients, whose ``--json``
report is checked for the fields a reader relies on. The cases run as
concurrent subprocesses, started together by a module fixture, so the
file takes a few seconds rather than the sum of them.

Both engines are run: the compiled one (``--engine go``, multichat in
fanout, rooms, connect and idle; it needs ``go``: without it those tests
skip, except under CI=true, where they fail) and the Python one (every
protocol and scenario, and the fallback).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SECRET, ServerProcess

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "loadtest.py"
SHORT = ["--duration", "1", "--json"]
# A hang guard for one scenario subprocess, never a timing assertion.
RUN_GUARD = 90

SPAWNED = {
    "fanout": ["fanout", "--spawn", "--subscribers", "6", "--publishers", "2", "--workers", "2",
               "--engine", "python"],
    "fanout-socialvp": ["fanout", "--spawn", "--protocol", "socialvp", "--subscribers", "4"],
    "fanout-wschat": ["fanout", "--spawn", "--protocol", "wschat", "--subscribers", "4",
                      "--rate", "200"],
    "fanout-wcp": ["fanout", "--spawn", "--protocol", "wcp", "--subscribers", "4"],
    "rooms": ["rooms", "--spawn", "--rooms", "3", "--room-size", "3"],
    "gradagenda": ["gradagenda", "--spawn", "--rooms", "2", "--room-size", "3", "--rate", "100"],
    "connect": ["connect", "--spawn", "--connect-rate", "40"],
    "connect-churn": ["connect", "--spawn", "--connect-rate", "40", "--churn",
                      "--protocol", "gradagenda"],
    "idle": ["idle", "--spawn", "--connections", "40", "--protocol", "socialvp"],
    # Paced, so that a busy machine cannot starve a worker into a slow consumer.
    "python-fanout": ["fanout", "--spawn", "--engine", "python", "--subscribers", "6",
                      "--publishers", "2", "--workers", "2", "--rate", "1000"],
}


# The same multichat scenarios on the compiled engine, named explicitly;
# started by a second fixture once the first batch is done, so that fewer
# servers start at once. Paced, like python-fanout.
GO_SPAWNED = {
    "go-fanout": ["fanout", "--spawn", "--engine", "go", "--subscribers", "6",
                  "--publishers", "2", "--workers", "2", "--rate", "1000"],
    "go-paced": ["fanout", "--spawn", "--engine", "go", "--subscribers", "4", "--rate", "200"],
    "go-rooms": ["rooms", "--spawn", "--engine", "go", "--rooms", "3", "--room-size", "3"],
    "go-connect": ["connect", "--spawn", "--engine", "go", "--connect-rate", "40"],
    "go-churn": ["connect", "--spawn", "--engine", "go", "--connect-rate", "40", "--churn"],
    "go-idle": ["idle", "--spawn", "--engine", "go", "--connections", "40"],
    "go-tls": ["fanout", "--spawn", "--tls", "--subscribers", "4", "--rate", "500"],
}


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args, *SHORT],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, dict | None, str]:
    out, err = proc.communicate(timeout=RUN_GUARD)
    lines = out.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else None, err


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Start every scenario of SPAWNED at once; each test collects its own report."""
    yield from launch(tmp_path_factory, SPAWNED, "")


@pytest.fixture(scope="module")
def go_reports(tmp_path_factory):
    """The same for GO_SPAWNED (the compiled engine)."""
    yield from launch(tmp_path_factory, GO_SPAWNED, "go-")


def launch(tmp_path_factory, cases: dict[str, list[str]], prefix: str):
    """Start ``cases`` and the runs against an external server at once; yield
    a function returning a case's (exit code, JSON result, stderr)."""
    engine = ["--engine", "go" if prefix else "python"]
    tmp = tmp_path_factory.mktemp("loadtest")
    config = tmp / "config.json"
    config.write_text(json.dumps({
        "host": "127.0.0.1:0", "secret-key": SECRET, "store": str(tmp / "chatd.db"),
        "endpoints": [{"path": "/chat", "protocol": "multichat"},
                      {"path": "/throttled", "protocol": "multichat", "room": "throttled"}]}))
    server = ServerProcess(["serve", "--config", str(config)], tmp).start()
    external = ["--port", str(server.port), "--config", str(config)]
    procs = {name: start(args) for name, args in cases.items()}
    # Under chatd's default message-rate (100 frames/s per connection).
    procs[prefix + "external"] = start(["fanout", *external, "--subscribers", "3", "--rate",
                                        "50", "--server-pid", "port", *engine])
    if not prefix:
        # Over it: 400 asked of one publisher, which chatd reads at 100/s after a burst of 200.
        procs["throttled"] = start(["fanout", *external, "--path", "/throttled",
                                    "--subscribers", "2", "--rate", "400",
                                    "--server-pid", str(server.proc.pid), *engine])
    procs[prefix + "wrong-secret"] = start(["fanout", *external, "--subscribers", "3",
                                            "--secret-key", "not the secret", *engine])
    cache: dict[str, tuple[int, dict | None, str]] = {}

    def report(name: str) -> tuple[int, dict | None, str]:
        if name not in cache:
            cache[name] = finish(procs[name])
        return cache[name]

    yield report
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):  # a case no test collected
            stream.close()
    server.stop()


def require_go() -> None:
    """Skip without go (fail under CI=true, where .ci/run installs it)."""
    sys.path.insert(0, str(SCRIPT.parent))
    from loadgen.gobuild import go_problem
    problem = go_problem("loadgen-engine")
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the compiled load engine: {problem}")
        pytest.skip(f"the compiled load engine cannot be built: {problem}")


def healthy(report: tuple[int, dict | None, str]) -> dict:
    code, result, err = report
    assert code == 0, err
    assert result["errors"] == {} and result["error_count"] == 0, err
    assert result["close_codes"] == {}, err
    assert result["client"]["cpu_pct"] >= 0
    return result


def check_messages(result: dict) -> None:
    """Deliveries happened, all arrived, and their latency was measured."""
    assert result["publishes"] > 0
    assert result["deliveries"] > 0
    assert result["deliveries_per_s"] == pytest.approx(result["deliveries"] / 1, rel=1e-3)
    assert result["delivered_ratio"] == 1.0
    latency = result["latency_ms"]
    assert latency["count"] == result["deliveries"] + result["late_deliveries"]
    assert 0 <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"] * 1.02


def test_fanout_reports_deliveries_latency_and_server_figures(reports):
    result = healthy(reports("fanout"))
    check_messages(result)
    # 6 subscribers, 2 publishers and their 2 probes, over two workers.
    assert (result["subscribers"], result["publishers"], result["connections"]) == (6, 2, 10)
    assert len(result["client"]["worker_cpu_pct"]) == 2
    # Each message reaches every other client in the lobby.
    assert result["expected_deliveries"] == result["publishes"] * 9
    server = result["server"]
    assert server["rss_before_kib"] > 0 and server["rss_after_setup_kib"] > 0
    assert server["cpu_pct"] > 0


@pytest.mark.parametrize("protocol", ["socialvp", "wschat", "wcp"])
def test_fanout_speaks_each_lobby_protocol(reports, protocol):
    result = healthy(reports(f"fanout-{protocol}"))
    assert result["protocol"] == protocol
    check_messages(result)


def test_wschat_echo_counts_the_sender_and_rate_paces_publishing(reports):
    result = healthy(reports("fanout-wschat"))
    # wschat sends a message back to its sender too: 4 subscribers + 1.
    assert result["expected_deliveries"] == result["publishes"] * 5
    assert 0 < result["publishes"] <= 200 + 1


def test_rooms_spread_over_one_endpoint_per_room(reports):
    result = healthy(reports("rooms"))
    check_messages(result)
    assert result["rooms"] == 3
    assert result["paths"] == ["/room-0", "/room-1", "/room-2"]
    # A room's message reaches its 3 subscribers and its probe only.
    assert result["expected_deliveries"] == result["publishes"] * 4


def test_gradagenda_groups_store_and_deliver_messages(reports):
    result = healthy(reports("gradagenda"))
    check_messages(result)
    assert result["rooms"] == 2
    # Every member device gets a group message, the sender's included.
    assert result["expected_deliveries"] == result["publishes"] * 4


def test_connect_storm_reports_connects_per_second_and_holds_them(reports):
    result = healthy(reports("connect"))
    assert result["connects"] > 0
    assert result["connects_per_s"] == pytest.approx(result["connects"] / 1, rel=1e-3)
    assert result["connect_attempts"] == 40
    # Attempts under way at the end may finish just after it.
    held = result["connects"] + result["late_connects"]
    assert held == 40
    assert result["connect_latency_ms"]["count"] == held
    assert result["connections"] == held


def test_connect_storm_with_churn_closes_each_connection(reports):
    result = healthy(reports("connect-churn"))
    assert result["protocol"] == "gradagenda"
    assert result["connects"] + result["late_connects"] == result["connect_attempts"] == 40
    assert result["connections"] == 0


def test_idle_reports_server_memory_per_connection(reports):
    result = healthy(reports("idle"))
    assert result["connections"] == 40
    assert result["server"]["rss_per_connection_kib"] > 0


def test_external_server_with_its_config_and_pid(reports):
    # --server-pid port: the pid is the process listening on the target port.
    _, _, err = reports("external")
    result = healthy(reports("external"))
    check_messages(result)
    assert result["paths"] == ["/chat"]  # found in the config's endpoints
    assert result["server"]["rss_before_kib"] > 0
    assert "held the publishers back" not in err


def test_a_throttled_run_says_the_server_held_it_back(reports):
    code, result, err = reports("throttled")
    assert code == 0, err
    assert result["rate_target"] == 400
    assert "note: the server held the publishers back" in err
    assert "of 400.0/s asked" in err and "message-rate (100/s a connection, burst 200)" in err


def test_the_summary_never_rounds_a_loss_up_to_100_percent():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from loadgen.histogram import percent_floor
        from loadgen.report import throttled
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert percent_floor(4_000_448 / 4_006_912) == "99.8%"
    assert percent_floor(0.99999) == "99.9%" and percent_floor(1.0) == "100.0%"
    assert percent_floor(0.5) == "50.0%" and percent_floor(0.0) == "0.0%"
    base = {"duration_s": 10, "publishers": 2, "publishes": 1340, "publish_rate": 134.0,
            "expected_deliveries": 13400, "deliveries": 13400, "rate_target": 0,
            "server_message_rate": 100.0, "server_message_burst": 200}
    # Window-paced, 134 messages/s relayed from 2 publishers: under the limit.
    assert throttled(base) is None
    at_limit = throttled({**base, "publishers": 1})
    assert at_limit and "message-rate (100/s" in at_limit
    short = throttled({**base, "rate_target": 1000, "server_message_rate": None})
    assert short and "relayed 134.0 messages/s of 1,000.0/s asked" in short
    # Written at the rate asked, but waiting in TCP buffers: relayed is what counts.
    buffered = throttled({**base, "rate_target": 400, "publish_rate": 396.0, "publishes": 3960,
                          "expected_deliveries": 39600, "deliveries": 30000,
                          "server_message_rate": None})
    assert buffered and "relayed 300.0 messages/s of 400.0/s asked (396.0/s written)" in buffered
    assert throttled({**base, "rate_target": 135, "server_message_rate": None}) is None


def test_wrong_secret_is_reported_as_errors_and_close_codes(reports):
    code, result, err = reports("wrong-secret")
    assert code == 0, err
    assert result["connections"] == 0
    assert result["error_count"] == 5  # 3 subscribers, the publisher, its probe
    assert any(kind.startswith("auth: closed 1008") for kind in result["errors"])
    assert result["close_codes"] == {"1008": 5}
    assert result["deliveries"] == 0


def test_refuses_a_target_that_is_not_loopback(tmp_path):
    # 192.0.2.1 is a documentation address; the refusal comes before any socket.
    config = tmp_path / "remote.json"
    config.write_text(json.dumps({"host": "192.0.2.1:8765", "secret-key": "s"}))
    proc = subprocess.run([sys.executable, str(SCRIPT), "idle", "--config", str(config),
                           "--connections", "1", "--duration", "1"],
                          capture_output=True, text=True, timeout=RUN_GUARD)
    assert proc.returncode != 0
    assert "not a loopback address" in proc.stderr
    assert "--host" in proc.stderr


def test_python_engine_still_runs_multichat_fanout(reports):
    result = healthy(reports("python-fanout"))
    assert result["engine"] == "python"
    check_messages(result)
    assert result["expected_deliveries"] == result["publishes"] * 9


def test_go_engine_fanout_counts_every_delivery_over_two_workers(go_reports):
    require_go()
    result = healthy(go_reports("go-fanout"))
    assert result["engine"] == "go"
    check_messages(result)
    assert (result["subscribers"], result["publishers"], result["connections"]) == (6, 2, 10)
    assert len(result["client"]["worker_cpu_pct"]) == 2
    assert result["expected_deliveries"] == result["publishes"] * 9
    assert result["bottleneck"]["side"] in ("server", "load", "others", "neither")
    assert result["server"]["cpu_pct"] > 0


def test_go_engine_paces_publishing_by_rate(go_reports):
    require_go()
    result = healthy(go_reports("go-paced"))
    check_messages(result)
    assert 0 < result["publishes"] <= 200 + 1
    assert result["expected_deliveries"] == result["publishes"] * 5


def test_go_engine_rooms_reach_their_own_members_only(go_reports):
    require_go()
    result = healthy(go_reports("go-rooms"))
    check_messages(result)
    assert result["paths"] == ["/room-0", "/room-1", "/room-2"]
    assert result["expected_deliveries"] == result["publishes"] * 4


def test_go_engine_connect_storm_holds_or_churns_every_connection(go_reports):
    require_go()
    held = healthy(go_reports("go-connect"))
    assert held["connect_attempts"] == 40
    assert held["connects"] + held["late_connects"] == held["connections"] == 40
    assert held["connect_latency_ms"]["count"] == 40
    churned = healthy(go_reports("go-churn"))
    assert churned["connects"] + churned["late_connects"] == 40
    assert churned["connections"] == 0


def test_go_engine_idle_reports_server_memory(go_reports):
    require_go()
    result = healthy(go_reports("go-idle"))
    assert result["connections"] == 40
    assert result["server"]["rss_per_connection_kib"] > 0


def test_go_engine_reports_a_refused_register_like_the_python_one(go_reports):
    require_go()
    code, result, err = go_reports("go-wrong-secret")
    assert code == 0, err
    assert result["engine"] == "go"
    assert result["connections"] == 0
    assert result["error_count"] == 5
    assert any(kind.startswith("auth: closed 1008") for kind in result["errors"])
    assert result["close_codes"] == {"1008": 5}


def test_go_engine_over_wss_terminated_by_chatd(go_reports):
    require_go()
    result = healthy(go_reports("go-tls"))
    assert result["engine"] == "go" and result["tls"] is True
    assert result["target"].startswith("wss://")
    check_messages(result)
    assert result["expected_deliveries"] == result["publishes"] * 5


def test_go_engine_external_server_with_its_config_and_pid(go_reports):
    require_go()
    result = healthy(go_reports("go-external"))
    assert result["engine"] == "go"
    check_messages(result)
    assert result["paths"] == ["/chat"]


def test_without_go_the_python_engine_runs_and_says_so(tmp_path):
    # No go on PATH (and a cache with no binary in it): auto falls back.
    env = {**os.environ, "PATH": "/nonexistent", "CHATD_BENCH_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "fanout", "--spawn", "--subscribers",
                           "3", "--rate", "100", *SHORT], capture_output=True, text=True,
                          timeout=RUN_GUARD, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["engine"] == "python"
    assert result["delivered_ratio"] == 1.0
    assert "loadtest: Python engine (go not found" in proc.stderr
    forced = subprocess.run([sys.executable, str(SCRIPT), "fanout", "--spawn", "--engine", "go",
                             *SHORT], capture_output=True, text=True, timeout=RUN_GUARD, env=env)
    assert forced.returncode != 0
    assert "--engine go: go not found" in forced.stderr
