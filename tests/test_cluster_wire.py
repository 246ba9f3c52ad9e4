"""Fuzzing what nodes read from Redis: the envelope decoder answers
``WireError`` for anything that is not a batch, never anything else, and
the lobby applies any well-formed batch without raising."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatd import names as names_module
from chatd.broker import wire
from chatd.broker.base import ClaimDone, Released
from chatd.broker.local import LocalBroker
from chatd.broker.wire import (
    Batch, Bye, Joined, Left, Member, Presence, Said, WireError, Whisper,
)
from chatd.outbox import Client, Flusher
from chatd.protocols.base import MAX_JSON_DEPTH, too_deep
from chatd.events import Join, Leave, Publish
from chatd.lobby import Lobby
from chatd.protocols.multichat import Multichat
from chatd.protocols.wcp import Wcp
from tests.strategies import json_values, odd_frames

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

texts = st.text(max_size=12)
names = st.sampled_from(["alice", "ALICE", "bob", "аlice"]) | texts
members = st.builds(Member, st.integers(-5, 5), names, st.none() | names,
                    st.sampled_from(["wcp", "socialvp", "multichat", "wschat", "nope"]),
                    st.booleans(), st.booleans())
items = st.one_of(
    st.builds(Said, room=st.just("lobby") | texts, sender=st.none() | texts, payload=json_values,
              time_ns=st.integers(0, 2**62),
              client_timestamp=st.none() | st.integers(-2**53, 2**53)),
    st.builds(Joined, room=st.just("lobby"), member=members, version=st.integers(-2, 5)),
    st.builds(Left, room=st.just("lobby"), client=st.integers(-5, 5), version=st.integers(-2, 5)),
    st.builds(Presence, room=st.just("lobby"), version=st.integers(-2, 5),
              members=st.lists(members, max_size=4)),
    st.builds(Whisper, room=st.just("lobby"), client=st.integers(-5, 5), sender=texts, to=texts,
              payload=json_values, time_ns=st.integers(0, 2**62)),
    st.builds(Bye),
)
BATCH_SHAPES = [{"origin": "n2", "boot": "b", "items": []},
                {"origin": "n2", "boot": "b", "items": [{"t": "said", "room": "lobby",
                                                         "sender": "x", "payload": 1,
                                                         "time_ns": 0}]}]


def decodes_or_refuses(data: bytes | str) -> None:
    try:
        batch = wire.decode(data)
    except WireError:
        return
    assert isinstance(batch, Batch)


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_the_decoder_refuses_any_bytes_or_text_with_wire_error(data):
    decodes_or_refuses(data)


@FUZZ
@given(odd_frames(*BATCH_SHAPES, sendable=False))
def test_the_decoder_refuses_deep_odd_and_surrogate_json(text):
    decodes_or_refuses(text.encode("utf-8", "surrogatepass"))
    decodes_or_refuses(text)


@FUZZ
@given(st.dictionaries(st.sampled_from(["origin", "boot", "items", "t", "room"]),
                       json_values | st.lists(st.dictionaries(texts, json_values), max_size=3)))
def test_the_decoder_refuses_batch_shaped_json_of_the_wrong_types(obj):
    decodes_or_refuses(json.dumps(obj))


@FUZZ
@given(st.lists(items, max_size=6))
def test_every_item_survives_encoding(batch_items):
    batch = wire.decode(wire.encode("n1", "boot", batch_items))
    assert batch.origin == "n1" and batch.items == batch_items


@FUZZ
@given(st.lists(items, max_size=4), st.sampled_from(["n1", "n-2", 'odd"node\\']), texts)
def test_a_nodes_own_payloads_are_told_by_their_start_and_no_other_is(batch_items, node, boot):
    """A node drops its own payloads on channels it also subscribes to
    without decoding them: every payload it encodes starts with its prefix;
    those of another boot of the same node-id (told as an error) do not."""
    own = wire.own_prefix(node, boot)
    assert wire.encode(node, boot, batch_items).startswith(own)
    assert not wire.encode(node, boot + "x", batch_items).startswith(own)
    assert not wire.encode(node + "x", boot, batch_items).startswith(own)


def _nested(depth: int, kind: str) -> str:
    opening, closing = ("[", "]") if kind == "array" else ('{"a":', "}")
    return opening * depth + "1" + closing * depth if depth else '"x"'


@FUZZ
@given(st.lists(st.tuples(st.integers(0, MAX_JSON_DEPTH + 2), st.sampled_from(["array", "object"]),
                          st.sampled_from(["", "[", "{x}"])), min_size=1, max_size=40),
       st.sampled_from(["", ', "extra": []', ', "extra": ' + "[" * 70 + "]" * 70]))
def test_a_batch_of_messages_is_refused_as_too_deep_exactly_when_its_payload_is(messages, extra):
    """GradAgenda messages are checked per message (the fast path), with
    the same answer as a scan of the whole payload: messages nested
    around the limit, brackets in text, an unknown field that nests."""
    items = [json.dumps({"t": "stored", "session_id": "s", "seq": i, "sender_id": "u" + text,
                         "sender_timestamp": 1, "server_timestamp": 2})[:-1]
             + ', "message": ' + _nested(depth, kind) + "}"
             for i, (depth, kind, text) in enumerate(messages)]
    payload = '{"origin": "n1", "boot": "b", "items": [' + ", ".join(items) + "]" + extra + "}"
    if too_deep(payload):
        with pytest.raises(WireError, match="nested deeper"):
            wire.decode(payload)
    else:
        assert len(wire.decode(payload.encode()).items) == len(messages)


def test_the_decoder_names_what_is_wrong():
    with pytest.raises(WireError, match="nested deeper than 64"):
        wire.decode("[" * 100 + "]" * 100)
    with pytest.raises(WireError, match="Invalid enum value 'nope'|nope"):
        wire.decode(b'{"origin":"n","boot":"b","items":[{"t":"nope"}]}')
    with pytest.raises(WireError):
        wire.decode(b"\xff\xfe")


class _Transport:
    waiting_frames = 0
    waiting_bytes = 0

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, data: bytes, count: int) -> bool:
        self.frames.append(data)
        return True


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["n2", "n3"]), items), max_size=12))
def test_the_lobby_applies_any_batch_from_another_node_without_raising(received):
    broker = LocalBroker()
    lobby = Lobby(broker)
    flusher = Flusher()
    transport = _Transport()
    client = Client(Wcp, "lobby", "peer", "/wcp", 512, transport, flusher)
    assert lobby.join(Join(client=client, name="alice", display_name="Alice",
                           register=True, announce=True, roster=True)) is True
    for node, item in received:
        kind = type(item)
        if kind is Said:
            lobby.remote_said(item)
        elif kind is Joined:
            lobby.remote_joined(node, item)
        elif kind is Left:
            lobby.remote_left(node, item)
        elif kind is Presence:
            lobby.remote_presence(node, item)
        elif kind is Bye:
            lobby.node_gone(node, "b")
        else:
            lobby.remote_whisper(item)
    flusher.flush()
    for frame in transport.frames:  # every frame sent is a text frame of valid JSON
        assert frame[0] == 0x81
    lobby.node_gone("n2", "b2")
    lobby.node_gone("n3", "b3")
    assert not any(remote.members for remote in lobby.remote.values())
    # alice lost her name only if another node's claim of it came in.
    assert [m.name for m in lobby.presence("lobby").members] in ([], ["alice"])


class OrderedBroker(LocalBroker):
    """The contract ``RedisBroker`` keeps, in process: one registry of name
    keys, each held by one owner or shared by owners of one share tag;
    claims and releases queued in order and run (``step``) when the test
    says, their answers posted to the lobby as the router would."""

    shared = True

    def __init__(self) -> None:
        super().__init__("n1", "b1")
        #: key -> {owner: share tag ('' for a claim of its own)}
        self.registry: dict[str, dict[str, str]] = {}
        self.queue: list[tuple] = []

    def claim(self, room, keys, owner, token, drop=(), share=None):
        self.queue.append(("claim", list(keys), owner, token, list(drop), share or ""))
        return None

    def release(self, room, keys, owner, token=None):
        self.queue.append(("release", list(keys), owner, token, [], ""))
        return None if token is not None else True

    def may_hold(self, keys, owner, share) -> bool:
        """Whether ``owner`` may hold ``keys`` with ``share`` (Redis' CLAIM)."""
        return all(other == owner or (share and tag == share)
                   for key in keys for other, tag in self.registry.get(key, {}).items())

    def hold(self, keys, owner, share) -> None:
        for key in keys:
            self.registry.setdefault(key, {})[owner] = share

    def drop(self, keys, owner) -> None:
        for key in keys:
            holders = self.registry.get(key, {})
            holders.pop(owner, None)
            if not holders:
                self.registry.pop(key, None)

    def step(self, lobby: Lobby) -> None:
        kind, keys, owner, token, drop, share = self.queue.pop(0)
        if kind == "release":
            self.drop(keys, owner)
            if token is not None:
                lobby.released(Released(token=token))
            return
        ok = self.may_hold(keys, owner, share)
        if ok:
            self.hold(keys, owner, share)
            self.drop(drop, owner)
        lobby.claim_done(ClaimDone(token=token, ok=ok))


NAMES = ["sam", "Sam", "ѕam", "wes", "wendy", "qq"]
BRIDGE_NAMES = ["qq", "QQ", "sam"]
operations = st.lists(st.one_of(
    st.tuples(st.just("join"), st.integers(0, 3), st.sampled_from(NAMES)),
    st.tuples(st.just("bridge"), st.integers(4, 7), st.sampled_from(BRIDGE_NAMES)),
    st.tuples(st.just("rename"), st.integers(0, 3), st.sampled_from(NAMES)),
    st.tuples(st.just("leave"), st.integers(0, 7)),
    st.tuples(st.just("remote join"), st.integers(0, 3), st.sampled_from(NAMES),
              st.sampled_from(["n2", "n3"])),
    st.tuples(st.just("remote bridge"), st.integers(4, 7), st.sampled_from(BRIDGE_NAMES),
              st.sampled_from(["n2", "n3"])),
    st.tuples(st.just("remote leave"), st.integers(0, 7)),
    st.tuples(st.just("node gone"), st.sampled_from(["n2", "n3"])),
    st.tuples(st.just("step")), st.tuples(st.just("step")), st.tuples(st.just("step")),
), max_size=40)


@FUZZ
@given(operations)
# Found by this test: another node's bridge sharing the name is dropped
# while this node's bridge is still releasing it; the leave waits for
# that release.
@example([("bridge", 4, "QQ"), ("remote bridge", 4, "QQ", "n2"), ("leave", 4),
          ("node gone", "n2"), ("step",), ("step",)])
def test_a_name_announced_gone_is_free_in_the_registry_on_every_path(ops):
    """Whatever the interleaving of local claims, renames and leaves,
    bridges sharing names here and on other nodes, other nodes' claims and
    leaves, a node gone and the broker's answers: when a watcher is told a
    name left, no key of it is held in the registry, unless by a holder
    whose join it is told next (a name taken over); a name is never told
    joined while the watcher was told it is there (bridges sharing it are
    one user); and at the end the watcher was told the names held."""
    broker = OrderedBroker()
    lobby = Lobby(broker)
    flusher = Flusher()
    watched = _Transport()
    watcher = Client(Wcp, "lobby", "peer", "/wcp", 4096, watched, flusher)
    assert lobby.join(Join(client=watcher, register=False)) is True
    clients: dict[int, Client] = {}
    #: slot -> (node, client id there, name)
    remote: dict[int, tuple[str, int, str]] = {}
    remote_ids = itertools.count(1)
    roster: set[str] = set()
    versions = {"n2": 0, "n3": 0}
    boots = {"n2": itertools.count(), "n3": itertools.count()}
    boot = {node: f"b{next(count)}" for node, count in boots.items()}
    for op in ops:
        kind = op[0]
        if kind in ("join", "rename", "bridge"):
            client = clients.get(op[1])
            if kind in ("join", "bridge") and client is None:
                protocol = Multichat if kind == "bridge" else Wcp
                client = clients[op[1]] = Client(protocol, "lobby", "peer", "/p", 4096,
                                                 _Transport(), flusher)
                lobby.join(Join(client=client, name=op[2], register=True, announce=True,
                                shared=kind == "bridge"))
            elif kind == "rename" and client is not None:
                lobby.publish(Publish(client=client, payload="x", sender=op[2]))
        elif kind == "leave" and op[1] in clients:
            lobby.leave(Leave(client=clients.pop(op[1])))
        elif kind in ("remote join", "remote bridge") and op[1] not in remote:
            # Another node's clients, numbered as a node numbers its
            # clients: never twice.
            node, client_id, shared = op[3], next(remote_ids), kind == "remote bridge"
            keys = names_module.parse(op[2]).keys
            owner = f"{node}:{boot[node]}:{client_id}"
            share = names_module.parse(op[2]).shown if shared else ""
            if broker.may_hold(keys, owner, share):
                broker.hold(keys, owner, share)
                remote[op[1]] = (node, client_id, op[2])
                versions[node] += 1
                lobby.remote_joined(node, Joined(room="lobby", member=Member(
                    client_id, op[2], None, "multichat" if shared else "socialvp", True,
                    shared), version=versions[node]))
        elif kind == "remote leave" and op[1] in remote:
            node, client_id, name = remote.pop(op[1])
            broker.drop(names_module.parse(name).keys, f"{node}:{boot[node]}:{client_id}")
            versions[node] += 1
            lobby.remote_left(node, Left(room="lobby", client=client_id, version=versions[node]))
        elif kind == "node gone":
            node = op[1]
            for slot in [slot for slot, held in remote.items() if held[0] == node]:
                del remote[slot]
            lobby.node_gone(node, boot[node])
            # It comes back as a new process, with no names.
            boot[node], versions[node] = f"b{next(boots[node])}", 0
        elif kind == "step" and broker.queue:
            broker.step(lobby)
        flusher.flush()
        frames = [json.loads(text) for text in _texts(b"".join(watched.frames))]
        watched.frames.clear()
        for i, frame in enumerate(frames):
            if frame["type"] != "user_left":
                continue
            keys = names_module.parse(frame["user_id"]).keys
            joined_next = set().union(*(names_module.parse(f["user_id"]).keys
                                        for f in frames[i + 1:] if f["type"] == "user_joined"))
            held = {key for key in keys if key in broker.registry}
            assert held <= joined_next, (frame, broker.registry)
        for frame in frames:  # the watcher's roster, as a wcp client keeps it
            if frame["type"] == "user_joined":
                assert frame["user_id"] not in roster, frame
                roster.add(frame["user_id"])
            elif frame["type"] == "user_left":
                roster.discard(frame["user_id"])
    while broker.queue:  # every answer in: the roster told is the names held
        broker.step(lobby)
    flusher.flush()
    for frame in [json.loads(text) for text in _texts(b"".join(watched.frames))]:
        if frame["type"] == "user_joined":
            assert frame["user_id"] not in roster, frame
            roster.add(frame["user_id"])
        elif frame["type"] == "user_left":
            roster.discard(frame["user_id"])
    room = lobby.rooms["lobby"]
    held_names = {claim.name.shown for claim in room.claims.values()}
    if "lobby" in lobby.remote:
        held_names |= {m.claim.name.shown for m in lobby.remote["lobby"].members.values()}
    assert roster == held_names


def _texts(data: bytes) -> list[bytes]:
    """The payloads of the unmasked text frames in ``data`` (RFC 6455 5.2)."""
    texts = []
    while data:
        assert data[0] == 0x81
        length, start = data[1], 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(data[2:10], "big"), 10
        texts.append(data[start:start + length])
        data = data[start + length:]
    return texts
