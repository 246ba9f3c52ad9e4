"""Fuzzing the connection state machine against a real server.

Hypothesis draws a sequence of actions on a few client slots: connect,
authenticate, say something valid, send text that is not JSON, JSON of the
wrong shape, an oversized frame, a binary frame, close. Each sequence runs
against a fresh in-process server, one protocol at a time, and a small
model says what every client must see after each action, read strictly in
order, so a missing, wrong or extra frame fails the run:

- valid messages from authenticated clients reach every other
  authenticated client (and, on wschat and gradagenda, the sender);
- each violation gets its documented answer or close code (1003 binary,
  but ignored on a registered multichat bridge and 1008 before it registers,
  1007 gradagenda non-JSON, 1008 multichat bad first frame or a third
  failed gradagenda authentication, 1009 oversized);
- departures are announced where the protocol announces them;
- the server logs no error, and at the end a newcomer's message reaches
  everyone still connected and two fresh clients can chat.

``run_actions`` is shared with ``scripts/fuzz.py``, which runs it for long.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.events import CloseConnection, Ping

from chatd.config import default_config
from chatd.server import Server
from chatd.tokens import mint
from tests.abuse import no_rate_limits
from tests.conftest import GUARD, JWT_SECRET, SECRET
from tests.rawws import BINARY, RawClient, frame

PROTOCOLS = ["multichat", "socialvp", "wschat", "wcp", "gradagenda"]
SLOTS = 3
WITNESS = SLOTS  # the slot that speaks last, to flush out stray frames
FRAME_LIMIT = default_config().max_frame_bytes
ABSENT = object()

# Wrong-shape JSON whose answer is the same before and after authentication.
SHAPES: dict[str, list[Any]] = {
    "multichat": [{"foo": 1}, [1], {"action": "shout"}, {"action": "client-message", "content": ""}],
    "socialvp": [[1, 2], {"foo": 1}, {"command": "identify"}],
    "wschat": [{"usr": "x"}, [1], {"usr": "x", "msg": "unsigned"}],
    "wcp": [[1], {"foo": 1}, {"type": "shout"}, {"type": "message", "data": 5}],
    "gradagenda": [[1], {"foo": 1}, {"type": "shout", "cdid": "g"}],
}

slots = st.integers(0, SLOTS - 1)
words = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)


def actions(protocol: str, max_size: int = 25) -> st.SearchStrategy[list[tuple]]:
    connect = st.tuples(st.just("connect"), slots)
    auth = st.tuples(st.just("auth"), slots)
    say = st.tuples(st.just("say"), slots, words)
    not_json = st.tuples(st.just("not-json"), slots, st.text(max_size=30).map(lambda t: "x" + t))
    wrong_shape = st.tuples(st.just("wrong-shape"), slots,
                            st.integers(0, len(SHAPES[protocol]) - 1))
    ends = st.tuples(st.sampled_from(["oversized", "binary", "close"]), slots)
    # Repeats weight the draw towards conversations: every violation ends
    # the connection, so an even mix would rarely get two clients talking.
    one = st.one_of(connect, auth, auth, say, say, say, not_json, wrong_shape, ends)
    return st.lists(one, min_size=5, max_size=max_size)


# --- the model ---------------------------------------------------------------------


@dataclass
class Slot:
    raw: RawClient | None = None
    name: str = ""
    authed: bool = False
    failures: int = 0  # gradagenda: failed attempts before authenticating
    generation: int = 0


def matches(frame: Any, expected: dict) -> bool:
    """``frame`` has every key of ``expected`` with that value (ABSENT: no such key)."""
    if not isinstance(frame, dict):
        return False
    return all((key not in frame) if value is ABSENT else frame.get(key, ABSENT) == value
               for key, value in expected.items())


class Run:
    """One action sequence against one server, checking the model as it goes."""

    def __init__(self, protocol: str, port: int) -> None:
        self.protocol = protocol
        self.port = port
        self.slots = [Slot() for _ in range(SLOTS + 1)]
        self.session_id: str | None = None  # gradagenda: the direct session in use

    # -- reading -----------------------------------------------------------

    async def next_frame(self, i: int) -> Any:
        """Slot ``i``'s next data frame, or a CloseConnection."""
        while True:
            event = await self.slots[i].raw.next_message()
            if isinstance(event, str):
                return json.loads(event)
            if not isinstance(event, Ping):  # no keepalive pings are expected, but harmless
                return event

    async def expect(self, i: int, expected: dict) -> dict:
        got = await self.next_frame(i)
        assert matches(got, expected), f"slot {i} ({self.protocol}): expected {expected}, got {got}"
        return got

    async def expect_close(self, i: int, code: int) -> None:
        got = await self.next_frame(i)
        assert isinstance(got, CloseConnection) and got.code == code, \
            f"slot {i} ({self.protocol}): expected close {code}, got {got}"
        await self.gone(i)

    async def gone(self, i: int) -> None:
        """Slot ``i`` is closed: drop it and check the others hear of it."""
        slot = self.slots[i]
        await slot.raw.aclose()
        was_authed, name = slot.authed, slot.name
        self.slots[i] = Slot(generation=slot.generation)
        departure = {"socialvp": {"type": "quit", "who": name},
                     "wcp": {"type": "user_left", "user_id": name}}.get(self.protocol)
        if was_authed and departure:
            for j in self.others(i):
                await self.expect(j, departure)

    def others(self, i: int) -> list[int]:
        return [j for j, s in enumerate(self.slots) if j != i and s.raw and s.authed]

    # -- actions -----------------------------------------------------------

    async def step(self, action: tuple) -> None:
        await self.act(action)
        # Until the server has done all it will do with this action: an
        # action nobody sees (a message to an empty room, ignored garbage)
        # must not race the next one from another connection.
        await trio.testing.wait_all_tasks_blocked()

    async def act(self, action: tuple) -> None:
        kind, i, *args = action
        slot = self.slots[i]
        if kind == "close" and slot.raw is None:
            return
        if slot.raw is None:
            await self.connect(i)
        if kind == "connect":
            return
        if kind == "close":
            await slot.raw.send(CloseConnection(code=1000))
            return await self.expect_close(i, 1000)
        if kind == "oversized":
            await slot.raw.send_text("x" * (FRAME_LIMIT + 1))
            return await self.expect_close(i, 1009)
        if kind == "binary":
            await slot.raw.send_bytes(frame(BINARY, b"\x00"))
            if self.protocol == "multichat":
                # As the original Go server: ignored once registered (the
                # next message proves it); before, not a register: 1008.
                if slot.authed:
                    return None
                return await self.expect_close(i, 1008)
            return await self.expect_close(i, 1003)
        if kind == "auth":
            return await self.auth(i)
        if kind == "say":
            return await self.say(i, args[0])
        sent = args[0] if kind == "not-json" else SHAPES[self.protocol][args[0]]
        await slot.raw.send_text(sent if kind == "not-json" else json.dumps(sent))
        await self.garbage(i, sent)

    async def connect(self, i: int) -> None:
        slot = self.slots[i]
        slot.raw = await RawClient.connect(self.port, f"/{self.protocol}")
        slot.generation += 1
        slot.name = f"u{i}g{slot.generation}"
        if self.protocol == "socialvp":
            await self.expect(i, {"type": "init"})
        if self.protocol == "wschat":
            slot.authed = True  # no auth stage: it joins as it connects
            await trio.testing.wait_all_tasks_blocked()

    async def auth(self, i: int) -> None:
        slot, p = self.slots[i], self.protocol
        if slot.authed:
            return
        raw, name = slot.raw, slot.name
        if p == "multichat":
            await raw.send_text(json.dumps({"action": "register", "client-name": name,
                                            "secret-key": SECRET}))
            await self.expect(i, {"action": "register-ack"})
        elif p == "socialvp":
            await raw.send_text(json.dumps({"command": "identify", "name": name}))
            await self.expect(i, {"type": "outcome", "success": True, "code": 300})
        elif p == "wcp":
            joined = json.dumps({"type": "user_joined", "user_id": name, "display_name": name})
            await raw.send_text(joined)
            await raw.send_text(joined)  # its answer proves the join went through
            # First the roster: one user_joined per client already joined.
            present = {self.slots[j].name for j in self.others(i)}
            roster = {(await self.expect(i, {"type": "user_joined"}))["user_id"] for _ in present}
            assert roster == present, (roster, present)
            await self.expect(i, {"type": "error", "message": f"already joined as {name}"})
            for j in self.others(i):
                await self.expect(j, {"type": "user_joined", "user_id": name})
        elif p == "gradagenda":
            await raw.send_text(json.dumps({
                "type": "authenticate", "cdid": "auth", "user-id": "alice", "device-id": name,
                "token": mint(JWT_SECRET, "alice")}))
            await self.expect(i, {"type": "status-response", "cdid": "auth", "status": "succeeded"})
        slot.authed = True

    async def say(self, i: int, words: str) -> None:
        slot, p = self.slots[i], self.protocol
        raw, name = slot.raw, slot.name
        if p == "multichat":
            await raw.send_text(json.dumps({"action": "client-message", "content": words}))
            if not slot.authed:
                return await self.expect_close(i, 1008)
            for j in self.others(i):
                await self.expect(j, {"action": "forwarding-message", "source-client-name": name,
                                      "content": words})
        elif p == "socialvp":
            await raw.send_text(json.dumps({"command": "broadcast", "message": words}))
            if not slot.authed:
                return await self.expect(i, {"type": "outcome", "code": 10})
            for j in self.others(i):
                await self.expect(j, {"type": "broadcast", "from": name, "message": words})
        elif p == "wcp":
            await raw.send_text(json.dumps({"type": "message", "data": words, "timestamp": 7}))
            if not slot.authed:
                return await self.expect(i, {"type": "error", "message": "send user_joined first"})
            for j in self.others(i):
                await self.expect(j, {"type": "message", "user_id": name, "data": words,
                                      "timestamp": 7})
        elif p == "wschat":
            await raw.send_text(json.dumps({"usr": name, "msg": words,
                                            "jwt": mint(JWT_SECRET, name, ttl=None)}))
            for j in [i, *self.others(i)]:
                await self.expect(j, {"usr": name, "msg": words})
        elif p == "gradagenda":
            await self.say_gradagenda(i, words)

    async def say_gradagenda(self, i: int, words: str) -> None:
        slot = self.slots[i]
        if slot.authed and self.session_id is None:
            # A direct session must be asked for before it carries messages.
            await slot.raw.send_text(json.dumps({"type": "request-direct-session-info",
                                                 "cdid": "ds", "user-id": "bob"}))
            info = await self.expect(i, {"type": "providing-session-info", "cdid": "ds"})
            self.session_id = info["session-id"]
        await slot.raw.send_text(json.dumps({
            "type": "request-sending-a-message", "cdid": "say",
            "session-id": self.session_id or "none", "sender-timestamp": 1,
            "message": {"type": "text", "body": words}}))
        if not slot.authed:
            return await self.gradagenda_failure(i, "say")
        # Every device of alice gets it after it is stored, the sender with its cdid.
        body = {"type": "message-broadcast", "sender-id": "alice",
                "message": {"type": "text", "body": words}}
        await self.expect(i, {**body, "cdid": "say"})
        for j in self.others(i):
            await self.expect(j, {**body, "cdid": ABSENT})

    async def gradagenda_failure(self, i: int, cdid: Any) -> None:
        """A failed status; before authentication the third one also closes 1008."""
        slot = self.slots[i]
        await self.expect(i, {"type": "status-response", "status": "failed", "cdid": cdid})
        if not slot.authed:
            slot.failures += 1
            if slot.failures == 3:
                await self.expect_close(i, 1008)

    async def garbage(self, i: int, sent: Any) -> None:
        """The answer to text that is not JSON (a str) or JSON of the wrong shape."""
        slot, p = self.slots[i], self.protocol
        if p == "multichat" and not slot.authed:
            await self.expect_close(i, 1008)
        elif p == "socialvp":
            await self.expect(i, {"type": "outcome", "success": False, "code": 400})
        elif p == "wcp":
            await self.expect(i, {"type": "error", "message": "Invalid message format"})
        elif p == "gradagenda":
            if isinstance(sent, str):
                await self.expect_close(i, 1007)
            else:
                await self.gradagenda_failure(i, sent.get("cdid", ABSENT) if isinstance(sent, dict) else ABSENT)
        # multichat after register, and wschat: ignored, nothing to read

    async def finish(self) -> None:
        """A newcomer authenticates and speaks: everyone still connected must
        get exactly that next (no stray frame before it)."""
        await self.step(("auth", WITNESS))
        await self.step(("say", WITNESS, "the end"))
        for i, slot in enumerate(self.slots):
            if slot.raw is not None:
                await slot.raw.aclose()


class ErrorLog(logging.Handler):
    """Collects what the server logs at ERROR: a handled attack logs none."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def run_actions(protocol: str, sequence: list[tuple]) -> None:
    """Run ``sequence`` against a fresh server on 127.0.0.1; raise on any
    departure from the model, a server error, or a server that stopped serving."""
    config = default_config()
    config.secret_key, config.jwt_secret = SECRET, JWT_SECRET
    config.host, config.store = "127.0.0.1:0", ":memory:"
    config.auth_timeout = config.ping_interval = 3600  # no timer fires mid-run
    for key, value in no_rate_limits().items():
        setattr(config, key, value)
    errors = ErrorLog()
    logger = logging.getLogger("chatd")
    logger.addHandler(errors)
    try:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(Server(config).run)
            run = Run(protocol, server.port)
            with trio.fail_after(3 * GUARD):
                for action in sequence:
                    await run.step(action)
                await run.finish()
                check = Run("multichat", server.port)
                for action in [("auth", 0), ("auth", 1), ("say", 0, "still serving")]:
                    await check.step(action)
                await check.finish()
            server.shutdown()
    finally:
        logger.removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_random_action_sequences_follow_the_model(protocol):
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(actions(protocol))
    def check(sequence):
        trio.run(run_actions, protocol, sequence)

    check()
