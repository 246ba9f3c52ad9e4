"""Broker outages and departures as operators and users see them, all real:
a private redis-server paused (SIGSTOP) and restarted empty, nodes killed
(-9) and stopped (SIGTERM).

- the log: one WARNING when Redis is lost and one INFO when it is back,
  with the reason; coredis's own lines at DEBUG in one line, never an
  ERROR or a traceback;
- the names: holders keep them across an empty Redis restart while
  challengers on every node try to take them (the grace);
- departures: a name announced gone (a node killed, a client leaving, a
  rename, a node stopped) can be claimed at once, on any node; a node
  stopped cleanly says so, and is not taken for dead.
"""

from __future__ import annotations

import itertools
import re
import signal

import coredis
import pytest
import trio

from chatd.broker.redis import (
    ALIVE_KEY, BACK, BEAT, CLAIM, GRACE_KEY, GRACE_LEFT, NODES_KEY, RESUME,
)

from tests.cluster_helpers import (  # noqa: F401
    Cluster, Node, cluster, redis_server, socialvp, until, wcp,
)
from tests.conftest import GUARD
from tests.pg import pg_run_database, pg_url  # noqa: F401
from tests.test_cluster_lobby import wschat

# Kills, pauses and restarts of Redis or PostgreSQL under way, with timeouts
# and graces measured in seconds: run alone, after the parallel part of
# the suite, so that other tests cannot starve these nodes (README).
pytestmark = pytest.mark.serial

#: The documented bound for a killed node's names (docs/cluster.md): a
#: guard, not a measurement.
DEAD_NODE_BOUND = 15 + 5


def log_lines(node: Node, start: int = 0) -> list[str]:
    """``node``'s log lines from line ``start`` on."""
    return node.output().splitlines()[start:]


async def log_shows(node: Node, pattern: str, start: int = 0) -> str:
    """Wait for a line matching ``pattern`` in ``node``'s log; that line."""
    with trio.fail_after(3 * GUARD):
        while True:
            for line in log_lines(node, start):
                if re.search(pattern, line):
                    return line
            await trio.sleep(0.05)  # polling a log file, not a sync stand-in


def outage_lines(lines: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(WARNING lines, ERROR lines and tracebacks, INFO lines of the broker)."""
    warnings = [line for line in lines if " WARNING " in line]
    errors = [line for line in lines
              if " ERROR " in line or "Traceback" in line or line.startswith(" ")]
    infos = [line for line in lines if " INFO chatd.broker:" in line]
    return warnings, errors, infos


async def identify(cluster: Cluster, node: Node, name: str) -> int:
    """A new socialvp client on ``node`` asks for ``name``: the answer's code."""
    peer = await cluster.connect(node, "socialvp")
    assert (await peer.recv())["type"] == "init"
    await peer.send({"command": "identify", "name": name})
    # At most 5 s waiting for Redis, then the grace (docs/cluster.md): a guard.
    code = (await until(peer, lambda f: "code" in f, 2 * GUARD))["code"]
    if code != 300:
        await peer.close()
    return code


# --- A: the log of an outage ----------------------------------------------------------


async def test_a_redis_pause_and_restart_log_one_warning_and_one_info_and_no_traceback(
        cluster, redis_server):
    # n1 logs at debug, to see coredis's lines routed there; n2 at info.
    n1 = await cluster.start("n1", **{"log-level": "debug"})
    n2 = await cluster.start("n2")
    await socialvp(cluster, n1, "sam")
    for outage in ("pause", "restart"):
        marks = [len(log_lines(node)) for node in (n1, n2)]
        if outage == "pause":
            redis_server.pause()
        else:
            redis_server.kill()
        await cluster.ready(n1, want=False)
        await cluster.ready(n2, want=False)
        if outage == "pause":
            # Until coredis has failed a reconnection (it logged that at
            # ERROR with a trio.Cancelled traceback).
            await log_shows(n1, r"DEBUG coredis: Connection attempt failed", marks[0])
            redis_server.resume()
        else:
            await log_shows(n1, r"WARNING chatd\.broker: broker \S+ lost", marks[0])
            redis_server.start()
        await cluster.ready(n1)
        await cluster.ready(n2)
        for node, mark in zip((n1, n2), marks):
            await log_shows(node, r"INFO chatd\.broker: broker \S+ back after", mark)
            warnings, errors, infos = outage_lines(log_lines(node, mark))
            assert errors == [], (outage, node.name, errors)
            assert len(warnings) == 1, (outage, node.name, warnings)
            assert re.search(r"WARNING chatd\.broker: broker redis://127\.0\.0\.1:\d+/0 lost: "
                             r"\w+Error: ", warnings[0]), warnings
            # The reason never quotes what was being sent (client text).
            assert "PUBLISH" not in warnings[0] or "b'{" not in warnings[0]
            assert len(infos) == 1, (outage, node.name, infos)
            assert re.search(r"back after [\d.]+ s \(lost: \w+Error: .+\); \d+ events for other "
                             r"nodes were dropped meanwhile", infos[0]), infos
        coredis = [line for line in log_lines(n1, marks[0]) if " coredis:" in line]
        assert coredis or outage == "restart"
        assert all(" DEBUG coredis: " in line for line in coredis), coredis
        assert not [line for line in log_lines(n2, marks[1]) if " coredis:" in line]
    # The cluster works again, and nobody lost a name for it.
    assert await identify(cluster, n2, "sam") == 305
    watcher = await socialvp(cluster, n2, "watcher")
    sam2 = await socialvp(cluster, n1, "sam2")
    await sam2.send({"command": "broadcast", "message": "after"})
    assert (await until(watcher, lambda f: f["type"] == "broadcast"))["message"] == "after"


# --- B: names across an empty Redis restart ------------------------------------------


#: Seconds for a name's key to expire in Redis (``name_ttl``) after its
#: last renewal, and a margin.
NAME_TTL = 15 + 2


@pytest.mark.parametrize("outage", ["empty restart", "pause past the names' expiry"])
async def test_holders_keep_their_names_across_a_redis_outage_against_challengers(
        cluster, redis_server, outage):
    n1, n2, n3 = nodes = await cluster.nodes_up("n1", "n2", "n3")
    holders = {"sam": await socialvp(cluster, n1, "sam"),
               "wendy": await wcp(cluster, n2, "wendy", "Wendy W."),
               "sol": await socialvp(cluster, n3, "sol")}
    watcher = await wcp(cluster, n3, "watcher")
    assert {(await watcher.recv())["user_id"] for _ in range(3)} == {"sam", "wendy", "sol"}
    # Each name, a look-alike and a display name, claimed from the nodes
    # that do not hold it.
    contested = [(n2, "sam"), (n3, "Sam"), (n1, "wendy"), (n3, "Wendy W."), (n1, "sol"),
                 (n2, "ѕol")]
    marks = [len(log_lines(node)) for node in nodes]
    granted: list[tuple[str, str]] = []
    over = trio.Event()
    attempts = [0]

    async def challenge(node: Node, name: str) -> None:
        while not over.is_set():
            if await identify(cluster, node, name) == 300:
                granted.append((node.name, name))
            attempts[0] += 1

    newcomer: list[int] = []

    async def newcomer_claims() -> None:
        # A name nobody held, asked for once the nodes are back (during the
        # grace, usually): it is given, not refused.
        newcomer.append(await identify(cluster, n2, "newcomer"))

    async def restart() -> None:
        if outage == "empty restart":
            redis_server.kill()
        else:
            redis_server.pause()
        for node in nodes:
            await cluster.ready(node, want=False)
        if outage == "empty restart":
            redis_server.start()  # empty: every name key is gone
        else:
            # The condition under test: every name's key expires while
            # Redis is stopped (challengers' claims sent meanwhile wait in
            # its sockets, and run the moment it resumes).
            await trio.sleep(NAME_TTL)
            redis_server.resume()
        for node in nodes:
            await cluster.ready(node)
        nursery.start_soon(newcomer_claims)
        # Past the grace too: claims now are decided by the names re-claimed.
        done = attempts[0]
        with trio.fail_after(4 * GUARD):
            while attempts[0] < done + 3 * len(contested):
                await trio.sleep(0.05)  # waiting for attempts counted above
        over.set()

    with trio.fail_after(8 * GUARD):
        async with trio.open_nursery() as nursery:
            for node, name in contested:
                nursery.start_soon(challenge, node, name)
            nursery.start_soon(restart)
    assert granted == []
    assert newcomer == [300]
    # Every holder is still connected, and still speaks under its name.
    late = await wcp(cluster, n1, "late")
    assert {(await late.recv())["user_id"] for _ in range(4)} == {"sam", "wendy", "sol",
                                                                  "watcher"}
    await holders["sam"].send({"command": "broadcast", "message": "still sam"})
    got = await until(watcher, lambda f: f.get("type") == "message")
    assert (got["user_id"], got["data"]) == ("sam", "still sam")
    await holders["wendy"].send({"type": "message", "data": "still wendy"})
    assert (await until(holders["sol"], lambda f: f.get("from") == "wendy")) == {
        "type": "broadcast", "from": "wendy", "message": "still wendy"}
    for node, mark in zip(nodes, marks):
        assert "name lost" not in node.output()
        assert "taken by other nodes" not in node.output()
        # One WARNING and one INFO for the outage, nothing at ERROR.
        warnings, errors, infos = outage_lines(log_lines(node, mark))
        assert errors == [] and len(warnings) == 1 and len(infos) == 1, (warnings, errors, infos)
        # The grace: each node came back into one (it ends when the last is back).
        assert await metric(cluster, node, "chatd_cluster_name_graces_total") >= 1


async def test_the_grace_waits_for_every_node_known_and_ends_when_the_last_is_back(
        redis_server):
    """The registry's scripts, on a private Redis (times in ms)."""
    key = "chatd:name:lobby:sam"
    async with coredis.Redis(port=redis_server.port, decode_responses=True) as redis:
        beat, resume, back, left, claim = (redis.register_script(s) for s in (
            BEAT, RESUME, BACK, GRACE_LEFT, CLAIM))

        async def connects(node: str, before: bool, *view: str, young: int = 4000) -> int:
            return await resume([ALIVE_KEY, GRACE_KEY],
                                [node, "1" if before else "0", 5000, 10_000, young, *view])

        async def claims(owner: str) -> int | str | None:
            return await claim([GRACE_KEY, ALIVE_KEY, key], [owner, 15_000, 1, 10_000, ""])

        # A new node, nobody known, Redis just started: it may be an empty
        # restart whose nodes are not back yet ('?').
        assert await connects("n1", False, young=60_000) > 0
        assert await claims("n1:b:1") > 0
        # A node of before comes back: what it knew replaces '?'.
        assert await connects("n2", True, "n3") > 0
        assert set(await redis.hgetall(GRACE_KEY)) == {"n2", "n3"}
        assert await back([], ["n2"]) > 0  # n3 is not back yet
        assert await claims("n1:b:1") > 0
        assert await back([], ["n3"]) == 0  # the last one: over
        assert await claims("n1:b:1") is None
        # Heartbeats: each node learns the others alive.
        for node in ("n1", "n2", "n3"):
            await beat([ALIVE_KEY], [node, 5000, 10_000])
        assert sorted(await beat([ALIVE_KEY], ["n1", 5000, 10_000])) == ["n2", "n3"]
        # A pause past chatd:alive's expiry (names kept or not): a claim sent
        # before it, run first, begins the grace for every node known.
        await redis.delete([ALIVE_KEY])
        assert await claims("n4:b:1") > 0
        assert set(await redis.hgetall(GRACE_KEY)) == {"n1", "n2", "n3"}
        for node in ("n1", "n2"):
            assert await connects(node, True) > 0 and await back([], [node]) > 0
        assert await connects("n3", True) > 0 and await back([], ["n3"]) == 0
        assert await claims("n4:b:1") == "n1:b:1"  # the holder kept it
        # A node cut off alone (the others kept chatd:alive): no grace.
        assert await connects("n1", True, "n2", "n3") == 0
        # A new node on a Redis up for a while, nobody known: a new cluster.
        await redis.flushall()
        assert await connects("n5", False, young=0) == 0
        # A node that never comes back is waited for until its bound only.
        await redis.delete([ALIVE_KEY])
        assert await resume([ALIVE_KEY, GRACE_KEY], ["n5", "1", 5000, 300, 0, "gone"]) > 0
        assert await back([], ["n5"]) > 0
        with trio.fail_after(GUARD):
            while await left([], []) > 0:
                await trio.sleep(0.05)  # until the 300 ms bound has passed
        assert await claims("n5:b:1") is None


#: How long a holder's node stays stopped after the others are back: more
#: than the 6 s that a fixed grace gave it, less than the 10 s after which
#: the other nodes take a silent node for dead (docs/cluster.md). The
#: condition under test, not a synchronisation.
STALL = 7


async def views_settled(redis_server, names: list[str]) -> None:
    """Wait until every node's last heartbeat reached Redis after every
    other node's first: each node knows all the others alive (the view it
    brings back to Redis after an empty restart)."""
    async with coredis.Redis(port=redis_server.port, decode_responses=True) as redis:
        first = None
        with trio.fail_after(GUARD):
            while True:
                seen = await redis.hgetall(NODES_KEY)
                if set(names) <= set(seen):
                    if first is None:
                        first = seen
                    elif all(int(seen[name]) > int(first[name]) for name in names):
                        return
                await trio.sleep(0.05)  # polling Redis for the next heartbeats


async def challenged(cluster: Cluster, contested: list[tuple[Node, str]], granted: list,
                     over: trio.Event, attempts: list[int]) -> None:
    """Claim each contested name from its node, again and again, until ``over``."""

    async def challenge(node: Node, name: str) -> None:
        while not over.is_set():
            if await identify(cluster, node, name) == 300:
                granted.append((node.name, name))
            attempts[0] += 1

    async with trio.open_nursery() as nursery:
        for node, name in contested:
            nursery.start_soon(challenge, node, name)


async def more_attempts(attempts: list[int], count: int) -> None:
    done = attempts[0]
    with trio.fail_after(4 * GUARD):
        while attempts[0] < done + count:
            await trio.sleep(0.05)  # waiting for answers counted by the challengers


async def still_holds(sam, watcher, nodes: list[Node]) -> None:
    """``sam`` still speaks under its name (``watcher``, on another node,
    hears it), and no node lost a name to the outage."""
    await sam.send({"command": "broadcast", "message": "still sam"})
    got = await until(watcher, lambda f: f.get("type") == "message")
    assert (got["user_id"], got["data"]) == ("sam", "still sam")
    for node in nodes:
        assert "name lost" not in node.output()
        assert "taken by other nodes" not in node.output()


async def test_a_holders_node_back_late_after_an_empty_restart_keeps_its_names(
        cluster, redis_server):
    n1, n2, n3 = nodes = await cluster.nodes_up("n1", "n2", "n3")
    sam = await socialvp(cluster, n1, "sam")
    await wcp(cluster, n1, "wendy", "Wendy W.")
    watcher = await wcp(cluster, n2, "watcher")
    assert {(await watcher.recv())["user_id"] for _ in range(2)} == {"sam", "wendy"}
    await views_settled(redis_server, ["n1", "n2", "n3"])
    marks = [len(log_lines(node)) for node in nodes]
    contested = [(n2, "sam"), (n3, "Sam"), (n2, "Wendy W."), (n3, "wendy")]
    granted: list[tuple[str, str]] = []
    over = trio.Event()
    attempts = [0]

    async def outage() -> None:
        n1.proc.send_signal(signal.SIGSTOP)  # n1 stalls through the restart
        try:
            redis_server.kill()
            for node in (n2, n3):
                await cluster.ready(node, want=False)
            redis_server.start()  # empty
            for node in (n2, n3):
                await cluster.ready(node)
            nursery.start_soon(challenged, cluster, contested, granted, over, attempts)
            await trio.sleep(STALL)
        finally:
            n1.proc.send_signal(signal.SIGCONT)
        await cluster.ready(n1)
        await log_shows(n1, r"INFO chatd\.broker: broker \S+ back after", marks[0])
        await more_attempts(attempts, 2 * len(contested))  # decided after n1 is back
        over.set()

    with trio.fail_after(8 * GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outage)
    assert granted == []
    await still_holds(sam, watcher, nodes)
    for node, mark in zip(nodes, marks):
        assert "taken for dead" not in node.output()
        warnings, errors, infos = outage_lines(log_lines(node, mark))
        assert errors == [] and len(warnings) == 1 and len(infos) == 1, (warnings, errors, infos)


async def test_a_node_started_during_an_empty_restart_grants_no_held_name(
        cluster, redis_server):
    n1, n2 = await cluster.nodes_up("n1", "n2")
    sam = await socialvp(cluster, n1, "sam")
    wendy = await wcp(cluster, n2, "wendy")
    assert await until(wendy, lambda f: f.get("type") == "user_joined") == {
        "type": "user_joined", "user_id": "sam", "display_name": "sam"}
    await views_settled(redis_server, ["n1", "n2"])
    granted: list[tuple[str, str]] = []
    over = trio.Event()
    attempts = [0]

    async def outage() -> None:
        # The holders' nodes stall, so that the new node reaches Redis first.
        for node in (n1, n2):
            node.proc.send_signal(signal.SIGSTOP)
        try:
            redis_server.kill()
            n3 = await cluster.start("n3", ready=False)  # started during the outage
            redis_server.start()  # empty
            await cluster.ready(n3)
            contested = [(n3, "sam"), (n3, "wendy")]
            nursery.start_soon(challenged, cluster, contested, granted, over, attempts)
            # Until n3 holds their claims (a grace: it cannot tell whether
            # nodes that held names are yet to come back).
            with trio.fail_after(GUARD):
                while await metric(cluster, n3, "chatd_cluster_claims_waiting") < len(contested):
                    await trio.sleep(0.05)  # polling /metrics as a monitor does
        finally:
            for node in (n1, n2):
                node.proc.send_signal(signal.SIGCONT)
        for node in (n1, n2):
            await cluster.ready(node)
        await more_attempts(attempts, 2 * len(contested))
        over.set()

    with trio.fail_after(8 * GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outage)
    assert granted == []
    await still_holds(sam, wendy, [n1, n2])


async def test_a_claim_waits_no_longer_than_the_cap_for_a_node_that_never_comes_back(
        cluster, redis_server):
    n1, n2 = await cluster.nodes_up("n1", "n2")
    await views_settled(redis_server, ["n1", "n2"])
    n1.kill9()  # known alive by n2: the grace waits for it, as long as its bound
    redis_server.kill()
    await cluster.ready(n2, want=False)
    # A claim made while Redis is down waits for it, then for the grace.
    peer = await cluster.connect(n2, "socialvp")
    assert (await peer.recv())["type"] == "init"
    await peer.send({"command": "identify", "name": "newcomer"})
    with trio.fail_after(GUARD):
        while await metric(cluster, n2, "chatd_cluster_claims_waiting") < 1:
            await trio.sleep(0.05)  # polling /metrics as a monitor does
    redis_server.start()  # empty
    await cluster.ready(n2)
    # The grace outlasts the claim's cap: the claim is refused, in the
    # protocol's form ("name taken": identify again), and the client is
    # not closed for it.
    answer = await until(peer, lambda f: "code" in f, 2 * GUARD)
    assert answer["code"] == 305
    await peer.send({"command": "broadcast", "message": "am I still here?"})
    assert "code" in await until(peer, lambda f: "code" in f)  # answered, not closed
    # The name was free: once the grace is over it is given.
    with trio.fail_after(3 * GUARD):
        while await identify(cluster, n2, "newcomer") != 300:
            pass  # each claim waits for the grace (at most its cap)
    assert await metric(cluster, n2, "chatd_cluster_claims_waiting") == 0


# --- C: a name announced gone is free -------------------------------------------------


async def test_a_killed_nodes_names_can_be_claimed_as_soon_as_they_are_announced_gone(cluster):
    n1, n2, n3 = await cluster.nodes_up("n1", "n2", "n3")
    await socialvp(cluster, n1, "sam")
    await wcp(cluster, n1, "wendy", "Wendy W.")
    await socialvp(cluster, n1, "sol")
    watcher = await socialvp(cluster, n2, "watcher")
    wally = await wcp(cluster, n3, "wally")
    assert {(await wally.recv())["user_id"] for _ in range(4)} == {"sam", "wendy", "sol",
                                                                  "watcher"}
    n1.kill9()
    # The first departure heard on n2: its name is free on n2 and on n3.
    gone = (await until(watcher, lambda f: f["type"] == "quit", DEAD_NODE_BOUND))["who"]
    others = {"sam", "wendy", "sol"} - {gone}
    assert await identify(cluster, n2, gone) == 300
    # Each departure heard on n3 (wcp): claimable at once, from n3 or n2.
    nodes = itertools.cycle([n3, n2])
    heard = set()
    while others - heard:
        left = (await until(wally, lambda f: f["type"] == "user_left", DEAD_NODE_BOUND))
        heard.add(left["user_id"])
        if left["user_id"] != gone:
            assert await identify(cluster, next(nodes), left["user_id"]) == 300, left
    # The display name of a wcp user gone is free too.
    assert await identify(cluster, n3, "Wendy W.") == 300


async def test_a_leave_and_a_rename_are_announced_once_the_name_is_free(cluster):
    n1, n2 = await cluster.nodes_up("n1", "n2")
    watcher = await wcp(cluster, n1, "watcher")
    for i in range(5):
        leaver = await socialvp(cluster, n1, f"leaver{i}")
        await until(watcher, lambda f: f == {"type": "user_joined", "user_id": f"leaver{i}",
                                             "display_name": f"leaver{i}"})
        await leaver.close()
        await until(watcher, lambda f: f == {"type": "user_left", "user_id": f"leaver{i}"})
        # Heard on n1; claimed on n2 at once.
        assert await identify(cluster, n2, f"leaver{i}") == 300
    wes = await cluster.connect(n1, "wschat")
    await wes.send(wschat("wes", "first"))
    await until(watcher, lambda f: f.get("type") == "message")
    await wes.send(wschat("wesley", "renamed"))
    assert await until(watcher, lambda f: f.get("type") == "user_left") == {
        "type": "user_left", "user_id": "wes"}
    assert await identify(cluster, n2, "wes") == 300
    assert await identify(cluster, n2, "wesley") == 305


# --- D: a node that stops says so -----------------------------------------------------


async def metric(cluster: Cluster, node: Node, name: str) -> float:
    status, body = await cluster.readyz(node, "/metrics")
    assert status == 200
    return float(re.search(rf"^{name} (\S+)$", body, re.M).group(1))


async def test_a_node_stopped_cleanly_says_so_and_is_not_taken_for_dead(cluster):
    n1, n2, n3 = await cluster.nodes_up("n1", "n2", "n3")
    await socialvp(cluster, n1, "sam")
    await wcp(cluster, n1, "wendy")
    watcher = await socialvp(cluster, n2, "watcher")
    with trio.fail_after(GUARD):
        while await metric(cluster, n2, "chatd_cluster_nodes") != 2:
            await trio.sleep(0.05)  # polling /metrics as a monitor does
    mark = len(log_lines(n2))
    assert n1.stop() == 0
    assert {(await until(watcher, lambda f: f["type"] == "quit"))["who"] for _ in range(2)} == {
        "sam", "wendy"}
    # n2 forgets n1 when it says it leaves, not after its silence.
    with trio.fail_after(GUARD):
        while await metric(cluster, n2, "chatd_cluster_nodes") != 1:
            await trio.sleep(0.05)  # polling /metrics as a monitor does
    lines = log_lines(n2, mark)
    assert any(re.search(r"INFO chatd\.cluster: node n1 left the cluster", line)
               for line in lines), lines
    assert not [line for line in lines if " WARNING " in line], lines
    assert re.search(r"INFO chatd\.broker: broker \S+: leaving the cluster", n1.output())
    assert await identify(cluster, n3, "sam") == 300
    # The node comes back under the same id: a newcomer, nothing more.
    await cluster.ready(await cluster_restart(cluster, n1))
    assert await log_shows(n2, r"INFO chatd\.cluster: node n1 is in the cluster", mark)
    assert not [line for line in log_lines(n2, mark) if " WARNING " in line]


async def cluster_restart(cluster: Cluster, node: Node) -> Node:
    await trio.to_thread.run_sync(node.start)
    return node


async def test_a_node_restarted_at_once_has_its_old_names_free_when_announced_gone(cluster):
    n1, n2 = await cluster.nodes_up("n1", "n2")
    await socialvp(cluster, n1, "sam")
    await wcp(cluster, n1, "wendy")
    watcher = await wcp(cluster, n2, "watcher")
    assert {(await watcher.recv())["user_id"] for _ in range(2)} == {"sam", "wendy"}
    n1.kill9()
    await cluster_restart(cluster, n1)  # a new process (boot) long before n1 is missed
    await log_shows(n2, r"node n1 restarted")
    left: set[str] = set()
    while len(left) < 2:  # each name claimable as soon as its leave is heard
        name = (await until(watcher, lambda f: f["type"] == "user_left"))["user_id"]
        left.add(name)
        assert await identify(cluster, n2 if name == "sam" else n1, name) == 300
    assert left == {"sam", "wendy"}
