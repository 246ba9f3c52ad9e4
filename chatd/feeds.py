"""GradAgenda message feeds of one cluster node, sans-IO.

Several nodes share a broker (docs/cluster.md). Each committed message is
published on the channel of each member, and pub/sub may lose or reorder
it: two nodes commit messages 5 and 6 of a session and publish them in
the other order, or a reconnect loses one. So for each user with a device
here and each of their sessions, the node keeps a ``Feed``: the last
``seq`` those devices got. A message at or below it is a duplicate; one
past a gap is held until the gap is filled by reading the store. Each
device thus gets every message of its sessions once, in ``seq`` order.

This module holds that bookkeeping and nothing else: no sockets, no
store, no broker, no clock. Its inputs are method calls on ``Feeds``
(a message offered, a baseline or a store read come back, a membership
change); each returns the **actions** the caller carries out, in order:

- ``Deliver(user, entry)``: give ``entry.event`` to the user's devices
  here (all but the asker's connection), then answer the asker;
- ``Answer(entry)``: answer the asker only (a duplicate, or a message the
  user's devices here never get);
- ``Read(session_id, after, attempt)``: read up to ``FILL_PAGE`` stored
  messages of the session after ``seq`` ``after``, then call
  ``Feeds.filled`` with them (or with the failure);
- ``Wait()``: call ``Feeds.due`` in ``FILL_WAIT`` seconds (once, however
  many ``Wait`` came meanwhile);
- ``Reload()``: read the sessions from the store, then call
  ``Feeds.place`` with when each member joined;
- ``Skipped(...)``: a gap the store could not fill, skipped (to log).

**A gap is not read at once.** In a cluster a gap is the ordinary case,
not a loss: when members of one session write from several nodes, each
node offers its own commits to its feeds as soon as they are reported,
while the messages just before them, committed a moment earlier by
other nodes, are still on their way through the broker (commit report,
publisher, Redis, subscriber: a longer path than the local one). So a
message past a gap waits ``FILL_WAIT`` to ``2 x FILL_WAIT`` seconds
(two calls of ``due``) for pub/sub to fill the gap, and only a gap still
open then is read from the store. A read at once would find the same
messages that are about to arrive, cost a store job, and then see them
arrive as duplicates (issue 18). Reads asked for other reasons (a
channel that delivers again, a membership change, a baseline, a page
that was full) still run at once.

``chatd.sessions`` is the caller: it runs the reads as store jobs,
delivers through the hub, and calls ``due`` on a timer. Tested with
events in and actions out (tests/test_feeds.py).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

#: Messages read from the store at once to fill a gap.
FILL_PAGE = 100
#: Seconds between two calls of ``Feeds.due`` while gaps wait: a gap
#: opened by a message offered is read after 1 to 2 of these if pub/sub
#: has not filled it by then.
FILL_WAIT = 0.1
#: Deleted sessions remembered, so that their late messages are dropped.
GONE_KEPT = 10_000
#: Reads that found nothing past a gap before the gap is skipped (the
#: messages may be committed but not yet visible, or the session deleted).
EMPTY_READS = 2


class Start(enum.Enum):
    """Where a feed starts when no ``seq`` is known yet."""

    #: Not known yet (the store is being read): hold every message offered.
    UNKNOWN = "unknown"
    #: Nothing was missed: the first message offered is the first to deliver.
    NEXT = "next"


class Entry(NamedTuple):
    """A message on its way to a user's devices. ``event``: a
    ``StoredMessage`` (its ``session_id`` and ``seq`` are read here);
    ``asker``: the sender's connection, answered with ``cdid`` once the
    message is delivered or dropped (None for everyone else's copy)."""

    event: Any
    asker: Any = None
    cdid: Any = None


class Deliver(NamedTuple):
    user: str
    entry: Entry


class Answer(NamedTuple):
    entry: Entry


class Read(NamedTuple):
    session_id: str
    after: int
    attempt: int


class Reload(NamedTuple):
    pass


class Wait(NamedTuple):
    pass


class Skipped(NamedTuple):
    """Messages ``first`` to ``last`` of the session never reached ``user``
    here: the store did not have them (``why``)."""

    user: str
    session_id: str
    first: int
    last: int
    why: str


Action = Deliver | Answer | Read | Reload | Wait | Skipped


def _answer(entry: Entry) -> list[Action]:
    return [Answer(entry)] if entry.asker is not None else []


class Feed:
    """One local user's messages of one session.

    ``last``: the ``seq`` the user's devices here got last, or a ``Start``
    while that is not known. ``held``: messages past a gap (or before the
    start is known), by ``seq``. ``until``: once the user was removed from
    the session, the last ``seq`` still theirs (messages sent before the
    removal may still be on their way)."""

    __slots__ = ("user", "last", "held", "until")

    def __init__(self, user: str, last: int | Start) -> None:
        self.user = user
        self.last = last
        self.held: dict[int, Entry] = {}
        self.until: int | None = None

    @property
    def anchored(self) -> bool:
        """Whether ``last`` is a ``seq``."""
        return not isinstance(self.last, Start)

    @property
    def gap(self) -> bool:
        """Messages are held past a gap that a store read may fill."""
        return bool(self.held) and self.anchored

    @property
    def finished(self) -> bool:
        """The user left and got everything up to ``until``."""
        return self.until is not None and self.anchored and self.last >= self.until

    def offer(self, entry: Entry) -> tuple[list[Action], bool]:
        """Take one message: the actions, and whether it was new here (held
        or delivered) rather than a duplicate or past ``until``."""
        seq = entry.event.seq
        if self.last is Start.NEXT:
            self.last = seq - 1
        if (self.anchored and seq <= self.last) or (self.until is not None and seq > self.until):
            return _answer(entry), False
        held = self.held.get(seq)
        if held is not None:
            if entry.asker is not None and held.asker is None:
                self.held[seq] = entry  # the asker's copy: answered on delivery
                return [], False
            return _answer(entry), False
        self.held[seq] = entry
        return (self._drain() if self.anchored else []), True

    def start(self, seq: int | None) -> list[Action]:
        """Where the feed starts is known: after ``seq`` (None: from the
        first message held, else from the next one offered)."""
        if seq is None:
            if not self.held:
                self.last = Start.NEXT
                return []
            seq = min(self.held) - 1
        self.last = seq
        actions: list[Action] = []
        for old in [held for held in self.held if held <= seq]:
            actions += _answer(self.held.pop(old))
        return actions + self._drain()

    def skip(self) -> list[Action]:
        """Give up on the gap: deliver from the first message held."""
        self.last = min(self.held) - 1
        return self._drain()

    def close(self) -> list[Action]:
        """The feed is dropped: the askers of what it held are answered."""
        actions = [action for entry in self.held.values() for action in _answer(entry)]
        self.held.clear()
        return actions

    def _drain(self) -> list[Action]:
        actions: list[Action] = []
        while (entry := self.held.pop(self.last + 1, None)) is not None:
            actions.append(Deliver(self.user, entry))
            self.last = entry.event.seq
        return actions


class Feeds:
    """Every feed of one node: user -> session id -> ``Feed``, only for
    users with a device here (``open`` .. ``drop``)."""

    def __init__(self) -> None:
        self.users: dict[str, dict[str, Feed]] = {}
        #: Sessions with a ``Read`` in flight.
        self._reading: set[str] = set()
        #: Sessions with a gap that waits for pub/sub (``due``): the round
        #: it opened in; and the rounds counted (calls of ``due``).
        self._waiting: dict[str, int] = {}
        self._round = 0
        #: Reads issued (for /metrics).
        self.reads = 0
        #: (user, session) feeds holding messages of a session this node did
        #: not know the user was in, until a reload says when they joined.
        self._unplaced: set[tuple[str, str]] = set()
        #: Sessions deleted lately (oldest first), whose late messages are dropped.
        self._gone: dict[str, None] = {}
        #: Gaps skipped because the store did not have them (for /metrics).
        self.skipped = 0

    def __contains__(self, user: str) -> bool:
        return user in self.users

    def follows(self, user: str, session_id: str) -> bool:
        return session_id in self.users.get(user, ())

    def sessions(self, user: str) -> list[str]:
        return list(self.users.get(user, ()))

    # --- a user's devices --------------------------------------------------------

    def open(self, user: str, session_ids: Iterable[str]) -> None:
        """The user's first device here: their feeds wait for ``baseline``."""
        feeds = self.users.setdefault(user, {})
        for session_id in session_ids:
            feeds.setdefault(session_id, Feed(user, Start.UNKNOWN))

    def baseline(self, user: str, session_ids: Iterable[str],
                 newest: Mapping[str, int] | None) -> list[Action]:
        """Where each session stood (its newest ``seq``) when the user's
        device arrived; None if the store could not say."""
        feeds = self.users.get(user)
        if feeds is None:
            return []
        actions: list[Action] = []
        for session_id in session_ids:
            feed = feeds.get(session_id)
            if feed is not None and feed.last is Start.UNKNOWN:
                actions += feed.start(newest.get(session_id) if newest else None)
        for session_id, feed in list(feeds.items()):
            if feed.held:
                actions += self.fill(session_id)
        return actions

    def drop(self, user: str) -> list[Action]:
        """The user's last device here left."""
        return [action for feed in self.users.pop(user, {}).values() for action in feed.close()]

    def close(self, user: str, session_id: str) -> list[Action]:
        feed = self.users.get(user, {}).pop(session_id, None)
        return feed.close() if feed is not None else []

    # --- messages ----------------------------------------------------------------

    def offer(self, user: str, entry: Entry, fill: bool = True) -> list[Action]:
        """A message for ``user`` (from this node or another): delivered in
        ``seq`` order, once; a gap waits for pub/sub (``wait``), then is
        filled from the store (unless ``fill`` is False: the message comes
        from such a read)."""
        feeds = self.users.get(user)
        if feeds is None:
            return _answer(entry)
        session_id = entry.event.session_id
        actions: list[Action] = []
        feed = feeds.get(session_id)
        if feed is None:
            if session_id in self._gone:  # sent just before it was deleted
                return _answer(entry)
            # A session this node did not know the user was in (its change is
            # late, or was lost): hold what comes until a reload of the
            # sessions says when the user joined.
            feed = feeds[session_id] = Feed(user, Start.UNKNOWN)
            self._unplaced.add((user, session_id))
            actions.append(Reload())
        delivered, new = feed.offer(entry)
        actions += delivered
        if not new or not feed.anchored:
            return actions
        if feed.finished:
            actions += self.close(user, session_id)
        elif feed.held and fill:
            actions += self.wait(session_id)
        return actions

    def wait(self, session_id: str) -> list[Action]:
        """A gap in the session: read it on the second ``due`` from now
        unless pub/sub fills it first (``Wait()``: the caller keeps one
        timer for all)."""
        if session_id in self._reading or session_id in self._waiting:
            return []
        self._waiting[session_id] = self._round
        return [Wait()]

    def due(self) -> list[Action]:
        """``FILL_WAIT`` seconds passed (see ``Wait``): the gaps that have
        waited a whole round and are still open are read; ``Wait()`` again
        while gaps wait."""
        self._round += 1
        actions: list[Action] = []
        for session_id, opened in list(self._waiting.items()):
            if opened < self._round - 1:
                del self._waiting[session_id]
                actions += self.fill(session_id)
        if self._waiting:
            actions.append(Wait())
        return actions

    def catch_up(self, user: str) -> list[Action]:
        """The user's channel delivers (again): read what may have been missed."""
        return [action for session_id in self.sessions(user)
                for action in self.fill(session_id, force=True)]

    def fill(self, session_id: str, force: bool = False, attempt: int = 0) -> list[Action]:
        """Read what this node's users of the session miss: after the lowest
        ``last`` among feeds holding messages past a gap (among all, with
        ``force``). One read per session at a time."""
        if session_id in self._reading:
            return []
        lasts = [feeds[session_id].last for feeds in self.users.values()
                 if session_id in feeds and feeds[session_id].anchored
                 and (force or feeds[session_id].held)]
        if not lasts:
            return []
        self._reading.add(session_id)
        self.reads += 1
        return [Read(session_id, min(lasts), attempt)]

    def filled(self, read: Read, events: list[Any] | None, why: str = "") -> list[Action]:
        """A ``Read`` came back: the stored messages (``StoredMessage``s in
        ``seq`` order), or None and ``why`` it failed. A gap the store
        cannot fill (it failed, or the session was deleted: ``EMPTY_READS``
        reads found nothing) is skipped."""
        session_id = read.session_id
        self._reading.discard(session_id)
        actions: list[Action] = []
        for user, feeds in list(self.users.items()):
            feed = feeds.get(session_id)
            if feed is None:
                continue
            for event in events or ():
                if feeds.get(session_id) is not feed:
                    break  # closed on reaching its end
                actions += self.offer(user, Entry(event), fill=False)
        stuck = [(user, feeds[session_id]) for user, feeds in self.users.items()
                 if session_id in feeds and feeds[session_id].gap]
        if not stuck:
            return actions
        # The read saw everything committed up to ``seen`` (a full page:
        # maybe more). A gap above it opened after the read: read again.
        seen = events[-1].seq if events else read.after
        if events and (len(events) == FILL_PAGE or any(feed.last + 1 > seen for _, feed in stuck)):
            return actions + self.fill(session_id)
        if events is not None and not events and read.attempt < EMPTY_READS:
            return actions + self.fill(session_id, attempt=read.attempt + 1)
        for user, feed in stuck:
            self.skipped += 1
            actions.append(Skipped(user, session_id, feed.last + 1, min(feed.held) - 1,
                                   why or "deleted?"))
            actions += feed.skip()
            if feed.finished:
                actions += self.close(user, session_id)
        return actions

    # --- membership ---------------------------------------------------------------

    def follow(self, session_id: str, status: str, members: Iterable[str], old: Iterable[str],
               seq: int | None, since: Mapping[str, int] | None = None) -> list[Action]:
        """A committed change of the session (``status``: created, modified,
        deleted): the feeds of local users who joined start after ``seq``
        (or ``since[user]``, read from the store; None: not known); those
        who left still get what was sent up to ``seq``; a deleted
        session's feeds close. A feed started by a modification reads the
        store once: a message stored after the change by a node that had
        not heard of it may have been sent to the old members only."""
        members = set(members)
        actions: list[Action] = []
        if status == "deleted":
            self._gone[session_id] = None
            while len(self._gone) > GONE_KEPT:
                del self._gone[next(iter(self._gone))]
            for user in members:
                actions += self.close(user, session_id)
            return actions
        for user in set(old) - members:
            feed = self.users.get(user, {}).get(session_id)
            if feed is None:
                continue
            if seq is None:  # when the user left is not known: nothing more
                actions += self.close(user, session_id)
                continue
            feed.until = seq
            actions += self.close(user, session_id) if feed.finished else self.fill(
                session_id, force=True)
        started = False
        for user in members:
            feeds = self.users.get(user)
            if feeds is None:
                continue
            feed = feeds.get(session_id)
            if feed is not None and feed.until is not None:  # back before it closed
                actions += self.close(user, session_id)
                feed = None
            if feed is None:
                start = since.get(user, seq) if since is not None else seq
                feeds[session_id] = Feed(user, start if start is not None else Start.NEXT)
                started = started or start is not None
        if started and status == "modified":
            actions += self.fill(session_id, force=True)
        return actions

    def place(self, joined: Mapping[str, Mapping[str, int]],
              waiting: Iterable[str] = ()) -> list[Action]:
        """A ``Reload`` came back: ``joined``, session id -> member -> the
        ``seq`` they joined after, as stored. The feeds of sessions this
        node did not know a user was in start there; users in ``waiting`` have
        a baseline read of their own in flight. A user the store does not
        list (removed meanwhile, or the session deleted) gets nothing: the
        feed closes, its askers answered."""
        unplaced, self._unplaced = self._unplaced, set()
        waiting = set(waiting)
        actions: list[Action] = []
        for user, session_id in sorted(unplaced):
            feed = self.users.get(user, {}).get(session_id)
            if feed is None or feed.last is not Start.UNKNOWN or user in waiting:
                continue  # closed, placed meanwhile, or a login's baseline will
            since = joined.get(session_id, {}).get(user)
            if since is None:
                actions += self.close(user, session_id)
                continue
            actions += feed.start(since)
            if feed.held:
                actions += self.fill(session_id)
        return actions
