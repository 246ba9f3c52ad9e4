"""Fuzzing what nodes read from Redis: the envelope decoder answers
``WireError`` for anything that is not a batch, never anything else, and
the lobby applies any well-formed batch without raising."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.broker import wire
from chatd.broker.local import LocalBroker
from chatd.broker.wire import Batch, Joined, Left, Member, Presence, Said, WireError, Whisper
from chatd.client import Client, Flusher
from chatd.events import Join
from chatd.lobby import Lobby
from chatd.protocols.wcp import Wcp
from tests.strategies import json_values, odd_frames

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

texts = st.text(max_size=12)
names = st.sampled_from(["alice", "ALICE", "bob", "аlice"]) | texts
members = st.builds(Member, st.integers(-5, 5), names, st.none() | names,
                    st.sampled_from(["wcp", "socialvp", "multichat", "wschat", "nope"]),
                    st.booleans())
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
