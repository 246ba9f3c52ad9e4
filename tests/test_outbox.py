"""A lobby room's batched fan-out (``chatd.outbox.Receivers``) writes each
client exactly the frames it was sent, in the order they were sent,
whatever happens within a router pass: the sender left out of its own
message, frames of a client's own between broadcasts, members joining,
leaving, starting and ending a streamed answer, or sealed, and the
deliveries counted once each. Sans-IO: the model is the plain rule "each
frame a client was sent while it could take one, in order"; the real
server's paths are covered by the protocol tests."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.events import Command
from chatd.outbox import OUTBOX_BYTES_PER_FRAME, Client, Flusher, Receivers
from chatd.router import Router
from chatd.protocols.multichat import Multichat
from chatd.transport import text_frame


class _Transport:
    waiting_frames = 0
    waiting_bytes = 0

    def __init__(self) -> None:
        self.data = b""
        self.writes = 0

    def write(self, data: bytes, count: int) -> bool:
        self.data += data
        self.writes += 1
        return True


CLIENTS = 4
step = st.tuples(st.sampled_from(["broadcast", "broadcast", "own", "join", "join", "leave",
                                   "stream", "release", "seal", "flush"]),
                 st.sampled_from([None, *range(CLIENTS)]))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(step, max_size=40))
def test_each_client_is_written_what_it_was_sent_in_order(steps):
    flusher = Flusher()
    room = Receivers(Multichat.name)
    transports = [_Transport() for _ in range(CLIENTS)]
    clients = [Client(Multichat, "lobby", "p", "/multichat", 10_000, t, flusher) for t in transports]
    expected: list[list[bytes]] = [[] for _ in range(CLIENTS)]
    joined: set[int] = set()
    frames = (text_frame(b'"%d"' % n) for n in range(10_000))
    for kind, i in steps:
        client = clients[i] if i is not None else None
        if client is None and kind != "broadcast":
            kind = "flush"
        if kind == "broadcast":
            frame = next(frames)
            room.deliver(frame, exclude=client)
            for j in joined:
                if j != i and not clients[j].sealed:
                    expected[j].append(frame)
        elif kind == "own":
            frame = next(frames)
            if client.deliver(frame):
                expected[i].append(frame)
        elif kind == "join" and i not in joined and not client.sealed:
            room.add(client)
            joined.add(i)
        elif kind == "leave" and i in joined:
            assert room.remove(client)
            joined.discard(i)
        elif kind == "stream":
            client.stream([])
        elif kind == "release" and client.streams is not None:
            client.release_held()
        elif kind == "seal":
            if client.streams is not None:
                client.release_held()
            client.sealed = True
        elif kind == "flush":
            flusher.flush()
    for client in clients:
        if client.streams is not None:
            client.release_held()
    flusher.flush()
    for i in range(CLIENTS):
        assert transports[i].data == b"".join(expected[i]), i
    assert sum(flusher.deliveries.values()) == sum(map(len, expected))


def test_a_room_of_many_is_sent_one_write_each_per_pass():
    """Three messages in one pass reach each of 50 members in one write."""
    flusher = Flusher()
    room = Receivers(Multichat.name)
    transports = [_Transport() for _ in range(50)]
    clients = [Client(Multichat, "lobby", "p", "/multichat", 64, t, flusher) for t in transports]
    for client in clients:
        room.add(client)
    for n in range(3):
        room.deliver(text_frame(b"%d" % n), exclude=clients[0])
    flusher.flush()
    assert transports[0].writes == 0
    assert {t.writes for t in transports[1:]} == {1}
    assert transports[1].data == text_frame(b"0") + text_frame(b"1") + text_frame(b"2")
    assert flusher.deliveries[Multichat.name] == 3 * 49


class _Say(Command, kw_only=True):
    text: bytes = b""


class _Draining(_Transport):
    """A transport whose peer reads everything, but whose kernel takes at
    most ``takes`` bytes of each write at once (a connection whose send
    buffer has not grown yet): the rest waits, counted as a backlog."""

    def __init__(self, takes: int) -> None:
        super().__init__()
        self.takes = takes
        self.sizes: list[int] = []

    def write(self, data: bytes, count: int) -> bool:
        self.sizes.append(len(data))
        self.waiting_bytes = max(0, len(data) - self.takes)
        self.waiting_frames = count if self.waiting_bytes else 0
        return super().write(data, count)


@pytest.mark.parametrize("size", [100, 2_100, 4_090])
async def test_one_pass_never_hands_a_reading_member_more_than_its_share_of_the_bound(size):
    """128 messages queued at once, of up to the 4 KiB frame limit: the
    router ends its pass at a quarter of the slow-consumer bound (128 frames
    or 64 KiB with outbox-size 512), so members that read everything are
    never cut off 1008, and each gets every frame in order."""
    flusher = Flusher(outbox_size=512)
    router = Router(flusher)
    room = Receivers(Multichat.name)
    transports = [_Draining(takes=128 * 1024) for _ in range(3)]
    clients = [Client(Multichat, "lobby", "p", "/multichat", 512, t, flusher) for t in transports]
    for client in clients:
        room.add(client)
    router.handle(_Say, lambda command: room.deliver(text_frame(command.text)))
    frames = [text_frame(b"%d:" % n + b"x" * size) for n in range(128)]
    for n in range(128):
        router.post(_Say(text=b"%d:" % n + b"x" * size))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(router.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    bound = 512 * OUTBOX_BYTES_PER_FRAME
    for client, transport in zip(clients, transports):
        assert client.close_code is None, (client.close_code, transport.sizes)
        assert transport.data == b"".join(frames)
        assert max(transport.sizes) <= bound // 4 + len(frames[0])
