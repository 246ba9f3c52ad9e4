"""The cluster's per-device feeds (chatd/feeds.py) as a state machine:
events in, actions out, no sockets, store or broker."""

from __future__ import annotations

from typing import NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.feeds import (
    EMPTY_READS, FILL_PAGE, Answer, Deliver, Entry, Feeds, Read, Reload, Skipped, Start, Wait,
)


class Msg(NamedTuple):
    """The two fields of a StoredMessage the feeds read."""

    session_id: str
    seq: int


def entry(seq: int, session: str = "s", asker: str | None = None) -> Entry:
    return Entry(Msg(session, seq), asker, f"cdid-{seq}" if asker else None)


def delivered(actions: list, user: str = "ann") -> list[int]:
    return [a.entry.event.seq for a in actions if type(a) is Deliver and a.user == user]


def answered(actions: list) -> list[tuple[str, int]]:
    """(asker, seq) of every answer, whether with a delivery or alone."""
    return [(a.entry.asker, a.entry.event.seq) for a in actions
            if type(a) in (Deliver, Answer) and a.entry.asker is not None]


def reads(actions: list) -> list[Read]:
    return [a for a in actions if type(a) is Read]


def following(last: int = 0, user: str = "ann", session: str = "s") -> Feeds:
    """Feeds with ``user``'s feed of ``session`` at ``last``."""
    feeds = Feeds()
    feeds.open(user, [session])
    feeds.baseline(user, [session], {session: last})
    return feeds


def test_messages_in_order_are_delivered_at_once():
    feeds = following(0)
    assert delivered(feeds.offer("ann", entry(1)) + feeds.offer("ann", entry(2))) == [1, 2]


def test_a_duplicate_is_dropped_but_its_asker_still_answered():
    feeds = following(0)
    feeds.offer("ann", entry(1))
    actions = feeds.offer("ann", entry(1, asker="phone"))
    assert delivered(actions) == []
    assert actions == [Answer(entry(1, asker="phone"))]


def test_a_message_past_a_gap_is_held_and_the_gap_read_from_the_store_after_a_wait():
    feeds = following(3)
    actions = feeds.offer("ann", entry(6))
    assert delivered(actions) == []
    # Pub/sub may still bring 4 and 5 (committed by other nodes just before).
    assert actions == [Wait()]
    assert reads(feeds.due()) == []
    actions = feeds.due()
    assert reads(actions) == [Read("s", 3, 0)]
    # One read per session at a time.
    assert reads(feeds.offer("ann", entry(7))) == [] and reads(feeds.due()) == []
    actions = feeds.filled(Read("s", 3, 0), [Msg("s", 4), Msg("s", 5), Msg("s", 6)])
    assert delivered(actions) == [4, 5, 6, 7]
    assert feeds.reads == 1


def test_a_gap_pubsub_fills_while_it_waits_is_never_read():
    feeds = following(3)
    assert feeds.offer("ann", entry(5, asker="phone")) == [Wait()]
    assert reads(feeds.due()) == []
    # The other node's message arrives within the wait.
    actions = feeds.offer("ann", entry(4))
    assert delivered(actions) == [4, 5] and answered(actions) == [("phone", 5)]
    assert feeds.due() == []  # nothing to read, nothing more to wait for
    assert feeds.reads == 0


def test_a_gap_opened_just_before_a_due_still_waits_a_whole_round():
    feeds = Feeds()
    feeds.open("ann", ["s", "t"])
    feeds.baseline("ann", ["s", "t"], {"s": 0, "t": 0})
    feeds.offer("ann", entry(2))
    feeds.due()
    feeds.offer("ann", entry(2, session="t"))
    actions = feeds.due()
    assert reads(actions) == [Read("s", 0, 0)] and Wait() in actions
    assert reads(feeds.due()) == [Read("t", 0, 0)]


def test_the_askers_copy_replaces_a_held_copy_and_is_answered_on_delivery():
    feeds = following(0)
    feeds.offer("ann", entry(2))
    assert feeds.offer("ann", entry(2, asker="phone")) == []
    actions = feeds.offer("ann", entry(1))
    assert delivered(actions) == [1, 2]
    assert answered(actions) == [("phone", 2)]


def test_nothing_is_delivered_before_the_baseline_is_known():
    feeds = Feeds()
    feeds.open("ann", ["s"])
    assert feeds.offer("ann", entry(5)) == []
    assert feeds.offer("ann", entry(6)) == []
    # The session stood at 5 when the device came: 5 was already seen.
    actions = feeds.baseline("ann", ["s"], {"s": 5})
    assert delivered(actions) == [6]


def test_a_baseline_the_store_could_not_read_starts_at_the_first_message_held():
    feeds = Feeds()
    feeds.open("ann", ["s"])
    feeds.offer("ann", entry(8))
    assert delivered(feeds.baseline("ann", ["s"], None)) == [8]
    # With nothing held, the next message offered is the first.
    feeds.open("bob", ["t"])
    feeds.baseline("bob", ["t"], None)
    assert feeds.users["bob"]["t"].last is Start.NEXT
    assert delivered(feeds.offer("bob", entry(40, "t")), "bob") == [40]
    assert delivered(feeds.offer("bob", entry(41, "t")), "bob") == [41]


def test_a_removed_member_gets_what_was_sent_before_the_removal_then_nothing():
    feeds = following(2)
    actions = feeds.follow("s", "modified", members=["bob"], old=["ann", "bob"], seq=4)
    assert reads(actions) == [Read("s", 2, 0)]
    actions = feeds.filled(Read("s", 2, 0), [Msg("s", 3), Msg("s", 4)])
    assert delivered(actions) == [3, 4]
    assert not feeds.follows("ann", "s")
    # A message after the removal, from a node that had not heard of it:
    # held until the store says whether ann is in the session; she is not.
    assert feeds.offer("ann", entry(5, asker="pc")) == [Reload()]
    actions = feeds.place({"s": {"bob": 0}})
    assert actions == [Answer(entry(5, asker="pc"))]
    assert not feeds.follows("ann", "s")


def test_a_removal_at_an_unknown_point_closes_the_feed_and_answers_what_it_held():
    feeds = following(2)
    feeds.offer("ann", entry(4, asker="phone"))
    actions = feeds.follow("s", "modified", members=["bob"], old=["ann"], seq=None)
    assert answered(actions) == [("phone", 4)] and delivered(actions) == []
    assert not feeds.follows("ann", "s")


def test_a_deleted_sessions_late_messages_are_answered_and_never_delivered():
    feeds = following(0)
    feeds.follow("s", "deleted", members=["ann"], old=[], seq=0)
    actions = feeds.offer("ann", entry(1, asker="phone"))
    assert actions == [Answer(entry(1, asker="phone"))]
    assert not feeds.follows("ann", "s")


def test_a_message_of_a_session_not_known_here_is_held_until_a_reload_places_it():
    feeds = following(0)
    actions = feeds.offer("ann", entry(9, "new"))
    assert actions == [Reload()]
    # The store says ann joined "new" after message 7: 8 is read, then 9.
    actions = feeds.place({"new": {"ann": 7}})
    assert delivered(actions) == [] and reads(actions) == [Read("new", 7, 0)]
    assert delivered(feeds.filled(Read("new", 7, 0), [Msg("new", 8), Msg("new", 9)])) == [8, 9]


def test_a_new_member_starts_where_they_joined_and_a_modification_reads_the_store_once():
    feeds = following(0)
    actions = feeds.follow("t", "modified", members=["ann", "bob"], old=["bob"], seq=12)
    assert reads(actions) == [Read("t", 12, 0)]
    feeds.filled(Read("t", 12, 0), [])
    assert delivered(feeds.offer("ann", entry(13, "t"))) == [13]
    # Created with the user in it: no read needed.
    assert reads(feeds.follow("u", "created", members=["ann"], old=[], seq=0)) == []


def test_a_gap_the_store_cannot_fill_is_skipped_and_counted():
    feeds = following(1)
    feeds.offer("ann", entry(5))
    actions = feeds.filled(Read("s", 1, 0), None, "storage busy")
    assert Skipped("ann", "s", 2, 4, "storage busy") in actions
    assert delivered(actions) == [5]
    assert feeds.skipped == 1


def test_empty_reads_are_retried_before_the_gap_is_skipped():
    feeds = following(1)
    feeds.offer("ann", entry(3))
    read = Read("s", 1, 0)
    for attempt in range(EMPTY_READS):
        actions = feeds.filled(read, [])
        assert reads(actions) == [Read("s", 1, attempt + 1)]
        read = reads(actions)[0]
    actions = feeds.filled(read, [])
    assert delivered(actions) == [3] and feeds.skipped == 1


def test_a_full_page_is_followed_by_another_read():
    feeds = following(0)
    feeds.offer("ann", entry(FILL_PAGE + 5))
    page = [Msg("s", seq) for seq in range(1, FILL_PAGE + 1)]
    actions = feeds.filled(Read("s", 0, 0), page)
    assert delivered(actions) == list(range(1, FILL_PAGE + 1))
    assert reads(actions) == [Read("s", FILL_PAGE, 0)]


def test_the_last_device_leaving_answers_every_asker_held():
    feeds = following(0)
    feeds.offer("ann", entry(3, asker="phone"))
    assert answered(feeds.drop("ann")) == [("phone", 3)]
    assert "ann" not in feeds


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.just(n),
    st.lists(st.integers(1, n), max_size=3 * n),  # what pub/sub delivers: lost, repeated, reordered
    st.integers(0, n))))  # where the feed starts
def test_every_message_reaches_the_device_once_in_order_whatever_pubsub_does(case):
    """Property: with the store holding 1..n, a feed starting after ``start``
    delivers exactly start+1..n, in order, once the gaps are read, whatever
    subset, order and repetition of messages pub/sub hands it."""
    n, arrivals, start = case
    feeds = following(start)
    got: list[int] = []
    pending: list[Read] = []

    def run(actions: list) -> None:
        got.extend(delivered(actions))
        pending.extend(reads(actions))

    for index, seq in enumerate(arrivals):
        run(feeds.offer("ann", entry(seq)))
        if index % 3 == 2:  # time passes now and then: gaps still open are read
            run(feeds.due())
        while pending:
            read = pending.pop(0)
            run(feeds.filled(read, [Msg("s", s) for s in range(read.after + 1, n + 1)]
                             [:FILL_PAGE]))
    run(feeds.due())
    run(feeds.due())
    # The channel comes back: catch up with the store.
    run(feeds.catch_up("ann"))
    while pending:
        read = pending.pop(0)
        run(feeds.filled(read, [Msg("s", s) for s in range(read.after + 1, n + 1)][:FILL_PAGE]))
    assert got == list(range(start + 1, n + 1))
    assert feeds.skipped == 0
