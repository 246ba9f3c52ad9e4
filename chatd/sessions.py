"""GradAgenda sessions: accounts on several devices, direct and group chats.

A router service (see ``chatd.router``): it knows which devices of which
user are connected, the sessions and their members, and who may do what.
Everything durable goes through the store's ``Writer`` (any backend:
``chatd.store``): the handler updates the in-memory state at once (so
later commands see it, in router order), queues the store job, and only
when the writer reports the commit does it answer — the asker's copy
carrying its ``cdid`` — and fan out to every device of every member. A
message is therefore never confirmed to anyone before it is stored, and
its ``seq`` is the one the store allocated in that transaction; batches
are reported in commit order, so a session's messages go out in ``seq``
order. The writer reports back through the router's own channel
(``StoreDone``), so all state and fan-out stay in the router task, which
never waits for the database.

When a batch is not stored (the store stayed busy past
``store-busy-timeout``, or failed for good), every job queued since is
given back too: their in-memory changes are undone, newest first, and
each asker is answered "storage busy" or "storage unavailable"
(docs/storage.md). Memory then matches what is stored again.

Authorisation: a group ("mutable") session is created with its creator as
a member; only members may modify, delete, send into or read it. A direct
session belongs to its two users, has an id derived from the sorted pair,
and exists (durably) from the first time either of them asks for it; only
then can messages be sent into it.

Caps: one user may be a member of at most ``max-sessions-per-user``
sessions (direct and group); a creation or modification that would put
anyone over it is refused, naming them, and nothing is stored.

**Several nodes** (a shared broker; docs/cluster.md). Every committed
change of a session is published on ``chatd:cluster``, so every node's
sessions stay the same (``remote_changed``), and each committed message
on the channel of each member (``chatd:user:USER``), which a node
subscribes to while that user has a device connected there. Pub/sub may
lose or reorder messages, so for each local user and session the node
keeps a ``Feed``: the last ``seq`` that user's devices here got. A
message at or below it is a duplicate and dropped; one past a gap is
held, and the gap filled by reading the store (a writer job, never in
the router), so each device gets every message of its sessions once, in
``seq`` order. A user's first device on a node reads where each of their
sessions stands (its baseline) before its login is answered; a new
subscription, and every broker reconnect, is followed by a read of what
may have been missed, and a reconnect reloads the sessions themselves.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from chatd.broker import Broker, LocalBroker
from chatd.broker.base import CLUSTER, user_channel
from chatd.broker.wire import SessionChanged, Stored
from chatd.events import (
    Command, CreateSession, DeleteSession, DirectSessionInfo, Event, ListSessions, Login, Logout,
    ModifySession, ReadHistory, SendMessage, SessionInfo, Status, StoredMessage,
)
from chatd.router import DEFERRED, Router
from chatd.store import Failure, Job, Store, Writer
from chatd.store.base import StoredSession
from chatd.transport import text_frame

if TYPE_CHECKING:
    from chatd.client import Client

log = logging.getLogger("chatd.sessions")

#: Answers when a write was not stored: the store failed for good (until
#: a restart), stayed busy past store-busy-timeout, or the queue is full.
STORE_FAILED = "storage unavailable: nothing was stored"
STORE_RETRY = "storage busy: nothing was stored, try again"
STORE_BUSY = "server busy: too many writes queued, try again"
#: Messages read from the store at once to fill a gap (cluster).
FILL_PAGE = 100
#: Deleted sessions remembered, so that their late messages are dropped.
GONE_KEPT = 10_000


def direct_session_id(a: str, b: str) -> str:
    """The same id for the same two users, whoever asks, forever."""
    pair = msgspec.json.encode(sorted((a, b)))
    return "direct-" + hashlib.sha256(pair).hexdigest()[:32]


def new_session_id() -> str:
    return "mutable-" + secrets.token_hex(12)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Session:
    __slots__ = ("id", "kind", "members", "version", "waiting")

    def __init__(self, session_id: str, kind: str, members: Iterable[str],
                 version: int = 0) -> None:
        self.id = session_id
        self.kind = kind
        #: Replaced, never mutated: a queued message keeps the members it was sent to.
        self.members = frozenset(members)
        #: The store's count of membership changes, as far as this node has
        #: heard (several nodes: a message stored under a newer one is sent
        #: to the members the store has then).
        self.version = version
        #: Requests for a direct session whose creation is not committed yet.
        self.waiting: list[DirectSessionInfo] | None = None

    def info(self, status: str) -> SessionInfo:
        return SessionInfo(session_id=self.id, kind=self.kind, status=status,
                           members=sorted(self.members))


class Feed:
    """One local user's messages of one session (cluster): ``last``, the
    ``seq`` their devices here got last (None until the baseline is read,
    -1 when the first message to come sets it), the messages ``held``
    until those before them arrive: seq -> (event, asker, cdid), and
    ``until``: once the user was removed, the last ``seq`` still theirs
    (messages sent before the removal may still be on their way)."""

    __slots__ = ("last", "held", "until")

    def __init__(self, last: int | None) -> None:
        self.last = last
        self.held: dict[int, tuple[StoredMessage, Client | None, Any]] = {}
        self.until: int | None = None


def newest_seq(store: Store, session_id: str) -> int:
    """The session's last message ``seq`` (0 if none), inside a writer job."""
    rows = store.history(session_id, limit=1)
    return rows[0][0] if rows else 0


class StoreDone(Command, kw_only=True):
    """The writer's report of one batch: its ``results``, or why it failed."""

    jobs: list[Job]
    results: list[Any] | None
    failure: Failure | None


class Sessions:
    """``max_sessions_per_user``: config ``max-sessions-per-user``."""

    def __init__(self, store: Store, max_pending: int = 10_000, *,
                 max_sessions_per_user: int = 1000, broker: Broker | None = None) -> None:
        self.store = store
        self.broker: Broker = broker if broker is not None else LocalBroker()
        self.writer = Writer(store, self._report, max_pending=max_pending)
        self.max_sessions_per_user = max_sessions_per_user
        self.router: Router | None = None
        self.sessions: dict[str, Session] = {}
        #: user -> their sessions, in the order they joined (for listing).
        self.joined: dict[str, dict[str, Session]] = {}
        #: user -> their connected devices (connections), by client id.
        self.devices: dict[str, dict[int, Client]] = {}
        # --- cluster only (broker.shared) ---
        #: local user -> session -> Feed.
        self.feeds: dict[str, dict[str, Feed]] = {}
        #: user -> logins waiting for the user's baseline read.
        self.logins: dict[str, list[Login]] = {}
        #: sessions with a gap-filling read in flight.
        self._filling: set[str] = set()
        self._reloading = False
        #: (user, session) feeds holding messages of a session this node did
        #: not know the user was in, until a reload says when they joined.
        self._unplaced: set[tuple[str, str]] = set()
        #: Sessions deleted lately (oldest first), whose late messages are dropped.
        self._gone: dict[str, None] = {}
        #: Users whose channel delivers (acknowledged since their first login here).
        self._acked: set[str] = set()
        #: Gaps that could not be filled from the store (logged, for /metrics).
        self.skipped = 0

    # --- service life ----------------------------------------------------------

    def install(self, router: Router) -> None:
        self.router = router
        router.handle(Login, self.login)
        router.handle(Logout, self.logout)
        router.handle(DirectSessionInfo, self.direct_info)
        router.handle(CreateSession, self.create)
        router.handle(ModifySession, self.modify)
        router.handle(DeleteSession, self.delete)
        router.handle(ListSessions, self.list_sessions)
        router.handle(SendMessage, self.send_message)
        router.handle(ReadHistory, self.history)
        router.handle(StoreDone, self.store_done)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take the store (one server per SQLite file: raises ``StoreError``
        if another chatd has it), load the stored sessions, run the writer."""
        self.store.lock()
        for row in await trio.to_thread.run_sync(self.store.load_sessions):
            self._add(Session(row.id, row.kind, row.members, row.version))
        log.info("loaded %d sessions from %s", len(self.sessions), self.store.name)
        await self.writer.run(task_status=task_status)

    async def ready(self) -> str | None:
        """None if the store takes writes now, else why not (for /readyz)."""
        return await self.writer.ready()

    async def aclose(self) -> None:
        await self.writer.aclose()

    async def _report(self, jobs: list[Job], results: list[Any] | None,
                      failure: Failure | None) -> None:
        try:
            await self.router.send(StoreDone(jobs=jobs, results=results, failure=failure))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # shutting down: every client has gone already

    def store_done(self, cmd: StoreDone) -> None:
        if cmd.failure is None:
            for job, result in zip(cmd.jobs, cmd.results, strict=True):
                _call(job.done, result)
            return
        # Jobs queued since were accepted against state that assumed this
        # batch would be stored: they go too, and memory goes back to what
        # is stored.
        jobs = cmd.jobs + self.writer.resume()
        for job in reversed(jobs):
            if job.undo is not None:
                _call(job.undo)
        for job in jobs:
            _call(job.failed, cmd.failure)

    # --- devices ---------------------------------------------------------------

    def login(self, cmd: Login) -> object | None:
        """Answered at once on one node. In a cluster, a user's first device
        here waits for the baseline of the user's sessions (``_baseline``)."""
        client = cmd.client
        client.user_id = cmd.user_id
        client.device_id = cmd.device_id
        user = cmd.user_id
        if self.broker.shared:
            if user in self.logins:
                self.logins[user].append(cmd)
                return DEFERRED
            if user not in self.feeds:
                self.logins[user] = [cmd]
                self.broker.subscribe([user_channel(user)])
                self._baseline(user, list(self.joined.get(user, {})))
                return DEFERRED
        self.devices.setdefault(user, {})[client.id] = client
        return None

    def logout(self, cmd: Logout) -> None:
        client = cmd.client
        user = client.user_id
        waiting = self.logins.get(user)
        if waiting is not None:
            waiting[:] = [login for login in waiting if login.client is not client]
        devices = self.devices.get(user)
        if devices is not None:
            devices.pop(client.id, None)
            if not devices:
                del self.devices[user]
        if user in self.feeds and user not in self.devices and not waiting:
            self.logins.pop(user, None)
            self._acked.discard(user)
            self.broker.unsubscribe([user_channel(user)])
            for feed in self.feeds.pop(user).values():
                _answer_held(feed)

    # --- sessions --------------------------------------------------------------

    def direct_info(self, cmd: DirectSessionInfo) -> SessionInfo | str | object:
        me = cmd.client.user_id
        if me is None:
            return "authenticate first"
        if cmd.peer == me:
            return "a direct session needs another user"
        session = self.sessions.get(direct_session_id(me, cmd.peer))
        if session is not None:
            if session.waiting is not None:
                session.waiting.append(cmd)
                return DEFERRED
            return session.info("unchanged")
        session = Session(direct_session_id(me, cmd.peer), "direct", (me, cmd.peer))
        members = sorted(session.members)
        over = self._over_cap(members)
        if over:
            return over

        def done(seq: int) -> None:
            waiting, session.waiting = session.waiting or [], None
            self._changed(session, "created", members, (), seq)
            for request in waiting:
                Router.resolve(request, session.info("unchanged"))

        def failed(answer: str) -> None:
            waiting, session.waiting = session.waiting or [], None
            for request in waiting:
                Router.resolve(request, answer)

        # Not stored: forget it, so nobody is told it exists.
        def create(store: Store) -> int:
            store.create_session(session.id, "direct", members, now_ms())
            return newest_seq(store, session.id) if self.broker.shared else 0

        refused = self._write(create, done, failed, undo=lambda: self._remove(session))
        if refused:
            return refused
        session.waiting = [cmd]
        self._add(session)
        return DEFERRED

    def create(self, cmd: CreateSession) -> None:
        client, me = cmd.client, cmd.client.user_id
        session = Session(new_session_id(), "mutable", {*cmd.members, me})
        info = session.info("created")
        over = self._over_cap(session.members)
        if over:
            return self._fail(client, cmd.cdid, over)
        def done(_: None) -> None:
            self._fanout(session.members, info, client, cmd.cdid)
            self._changed(session, "created", info.members, (), 0)

        refused = self._write(
            lambda store: store.create_session(session.id, "mutable", info.members, now_ms()),
            done,
            lambda answer: self._fail(client, cmd.cdid, answer),
            undo=lambda: self._remove(session))
        if refused:
            return self._fail(client, cmd.cdid, refused)
        self._add(session)

    def modify(self, cmd: ModifySession) -> None:
        client = cmd.client
        session = self._usable(client, cmd.session_id, change="modified")
        if isinstance(session, str):
            return self._fail(client, cmd.cdid, session)
        if not cmd.members:
            return self._fail(client, cmd.cdid, "a session needs participants; delete it instead")
        old, new = session.members, frozenset(cmd.members)
        over = self._over_cap(new - old)
        if over:
            return self._fail(client, cmd.cdid, over)
        members = sorted(new)
        info = SessionInfo(session_id=session.id, kind="mutable", status="modified", members=members)
        def change(store: Store) -> tuple[int, int]:
            return store.set_members(session.id, members) or (0, session.version)

        def done(result: tuple[int, int]) -> None:
            seq, session.version = result
            self._fanout(old | new, info, client, cmd.cdid)
            self._changed(session, "modified", members, old, seq)

        refused = self._write(change, done,
                              lambda answer: self._fail(client, cmd.cdid, answer),
                              undo=lambda: self._set_members(session, old))
        if refused:
            return self._fail(client, cmd.cdid, refused)
        self._set_members(session, new)

    def delete(self, cmd: DeleteSession) -> None:
        client = cmd.client
        session = self._usable(client, cmd.session_id, change="deleted")
        if isinstance(session, str):
            return self._fail(client, cmd.cdid, session)
        info, members = session.info("deleted"), session.members
        def done(_: None) -> None:
            self._fanout(members, info, client, cmd.cdid)
            self._changed(session, "deleted", info.members, (), 0)

        refused = self._write(lambda store: store.delete_session(session.id), done,
                              lambda answer: self._fail(client, cmd.cdid, answer),
                              undo=lambda: self._add(session))
        if refused:
            return self._fail(client, cmd.cdid, refused)
        self._remove(session)

    def list_sessions(self, cmd: ListSessions) -> str | object:
        """The asker's group sessions as they are now, answered once every
        change before this request is stored (a no-op job as a barrier)."""
        mine = self.joined.get(cmd.client.user_id, {}).values()
        listing = [session.info("unchanged") for session in mine if session.kind == "mutable"]
        refused = self._write(lambda store: None, lambda _: Router.resolve(cmd, listing),
                              lambda answer: Router.resolve(cmd, answer))
        return refused or DEFERRED

    # --- messages --------------------------------------------------------------

    def send_message(self, cmd: SendMessage) -> None:
        client = cmd.client
        session = self._usable(client, cmd.session_id)
        if isinstance(session, str):
            return self._fail(client, cmd.cdid, session)
        session_id, sender_id, sent = session.id, client.user_id, cmd.sender_timestamp
        stored, message = now_ms(), cmd.message
        members = session.members  # as sent: a later membership change does not apply
        version = session.version
        text = bytes(message).decode()
        shared = self.broker.shared

        def append(store: Store) -> tuple[int | None, list[str] | None]:
            if shared:
                return store.append_checked(session_id, sender_id, text, sent, stored, version)
            return store.append_message(session_id, sender_id, text, sent, stored), None

        def done(result: tuple[int | None, list[str] | None]) -> None:
            seq, current = result
            if seq is None:  # deleted (by another node) before the message was stored
                return self._fail(client, cmd.cdid, "no such session")
            event = StoredMessage(session_id=session_id, seq=seq, sender_id=sender_id,
                                  message=message, sender_timestamp=sent, server_timestamp=stored)
            if not self.broker.shared:
                return self._fanout(members, event, client, cmd.cdid)
            item = Stored(session_id=session_id, seq=seq, sender_id=sender_id, message=message,
                          sender_timestamp=sent, server_timestamp=stored)
            # Stored after a change this node had not heard of: to the
            # members the store had then (docs/cluster.md).
            targets = members if current is None else frozenset(current)
            for user in targets:
                self.broker.publish(user_channel(user), item)
            frames: dict[type, bytes | None] = {}
            for user in targets:
                feeds = self.feeds.get(user)
                # A member this node does not know of yet gets it when the
                # change arrives (its feed starts with a read of the store).
                if feeds is not None and user != sender_id and (
                        user in members or session_id in feeds):
                    self._offer(user, event, frames=frames)
            if sender_id in self.feeds:
                self._offer(sender_id, event, client, cmd.cdid, frames)
            else:
                _answer(client, event, cmd.cdid)

        refused = self._write(append, done, lambda answer: self._fail(client, cmd.cdid, answer))
        if refused:
            self._fail(client, cmd.cdid, refused)

    def history(self, cmd: ReadHistory) -> str | object:
        session = self._usable(cmd.client, cmd.session_id)
        if isinstance(session, str):
            return session
        session_id = session.id

        def done(rows: list[tuple]) -> None:
            Router.resolve(cmd, [
                StoredMessage(session_id=session_id, seq=seq, sender_id=sender,
                              message=msgspec.Raw(message.encode()), sender_timestamp=sent,
                              server_timestamp=stored)
                for seq, sender, message, sent, stored in rows])

        refused = self._write(
            lambda store: store.history(session_id, before=cmd.before, after=cmd.after,
                                        limit=cmd.limit),
            done, lambda answer: Router.resolve(cmd, answer))
        return refused or DEFERRED

    # --- several nodes (broker.shared) ---------------------------------------------

    def _changed(self, session: Session, status: str, members: Iterable[str],
                 old: Iterable[str], seq: int) -> None:
        """A change of ``session`` committed here: tell every node, and start
        or stop the feeds of this node's users. ``seq``: the session's last
        message when the change committed."""
        if not self.broker.shared:
            return
        members, old = sorted(members), sorted(old)
        self.broker.publish(CLUSTER, SessionChanged(
            session_id=session.id, kind=session.kind, status=status, members=members,
            old_members=old, seq=seq, version=session.version))
        self._follow(session.id, status, members, old, seq)

    def _follow(self, session_id: str, status: str, members: Iterable[str],
                old: Iterable[str], seq: int, since: dict[str, int] | None = None) -> None:
        """Start the feeds of users who joined at ``seq`` (or at ``since[user]``,
        from the store); those who left get what was sent up to ``seq`` (a
        deleted session: nothing more). A feed started by a modification
        reads the store once: a message stored after the change by a node
        that had not heard of it may have been sent to the old members."""
        members = set(members)
        if status == "deleted":
            self._gone[session_id] = None
            while len(self._gone) > GONE_KEPT:
                del self._gone[next(iter(self._gone))]
            for user in members:
                self._close(user, session_id)
            return
        for user in set(old) - members:
            feed = self.feeds.get(user, {}).get(session_id)
            if feed is not None:
                feed.until = seq
                if seq < 0 or (feed.last is not None and feed.last >= seq):
                    self._close(user, session_id)
                else:
                    self._fill(session_id, force=True)
        started = False
        for user in members:
            feeds = self.feeds.get(user)
            if feeds is None:
                continue
            feed = feeds.get(session_id)
            if feed is not None and feed.until is not None:  # back before it closed
                self._close(user, session_id)
                feed = None
            if feed is None:
                start = since.get(user, seq) if since is not None else seq
                feeds[session_id] = Feed(start)
                started = started or start >= 0
        if started and status == "modified":
            self._fill(session_id, force=True)

    def _close(self, user: str, session_id: str) -> None:
        feed = self.feeds.get(user, {}).pop(session_id, None)
        if feed is not None:
            _answer_held(feed)

    def remote_changed(self, item: SessionChanged, since: dict[str, int] | None = None) -> None:
        """A change another node committed: the same here, and every local
        device of every user concerned is told (a direct session's creation
        is not announced, as on one node). ``since``: when each member
        joined, when the change was read from the store (``reload``)."""
        session = self.sessions.get(item.session_id)
        members = frozenset(item.members)
        if item.status == "deleted":
            if session is not None:
                self._remove(session)
        elif session is None:
            self._add(Session(item.session_id, item.kind, members, item.version))
        else:
            if session.members != members:
                self._set_members(session, members)
            session.version = max(session.version, item.version)
        if item.kind == "mutable":
            self._deliver(members | set(item.old_members), SessionInfo(
                session_id=item.session_id, kind=item.kind, status=item.status,
                members=sorted(members)))
        self._follow(item.session_id, item.status, item.members, item.old_members, item.seq,
                     since)

    def remote_stored(self, user: str, item: Stored) -> None:
        """A message another node committed, for ``user``."""
        if user in self.feeds:
            self._offer(user, StoredMessage(
                session_id=item.session_id, seq=item.seq, sender_id=item.sender_id,
                message=item.message, sender_timestamp=item.sender_timestamp,
                server_timestamp=item.server_timestamp))

    def subscribed(self, channels: list[str]) -> None:
        """Users' channels deliver now: read what they may have missed before."""
        for channel in channels:
            user = channel.removeprefix(user_channel(""))
            if channel != user and user in self.feeds:
                self._acked.add(user)
                if user not in self.logins:
                    self._catch_up(self.feeds[user])

    def broker_down(self) -> None:
        self._acked.clear()

    def resumed(self) -> None:
        """The broker is back after an outage: sessions changed elsewhere
        meanwhile are reloaded from the store (``reload``)."""
        self.reload()

    def _catch_up(self, feeds: Iterable[str]) -> None:
        for session_id in list(feeds):
            self._fill(session_id, force=True)

    def _offer(self, user: str, event: StoredMessage, asker: Client | None = None,
               cdid: Any = None, frames: dict | None = None, fill: bool = True) -> None:
        """Deliver ``event`` to ``user``'s devices here in ``seq`` order, once:
        a duplicate is dropped (its asker still answered), a message after a
        gap is held and the gap filled from the store."""
        feeds = self.feeds.get(user)
        if feeds is None:
            if asker is not None:
                _answer(asker, event, cdid)
            return
        session_id, seq = event.session_id, event.seq
        feed = feeds.get(session_id)
        if feed is None:
            if session_id in self._gone:  # sent just before it was deleted
                if asker is not None:
                    _answer(asker, event, cdid)
                return
            # A session this node did not know the user was in (its change is
            # late, or was lost): hold what comes until a reload of the
            # sessions says when the user joined.
            feed = feeds[session_id] = Feed(None)
            self._unplaced.add((user, session_id))
            self.reload()
        if feed.last == -1:
            feed.last = seq - 1
        if (feed.last is not None and seq <= feed.last) or (
                feed.until is not None and seq > feed.until):
            if asker is not None:
                _answer(asker, event, cdid)
            return
        held = feed.held.get(seq)
        if held is not None:
            if asker is not None:
                if held[1] is None:
                    feed.held[seq] = (event, asker, cdid)
                else:
                    _answer(asker, event, cdid)
            return
        feed.held[seq] = (event, asker, cdid)
        if feed.last is None:
            return
        self._drain(user, feed, frames)
        if feed.until is not None and feed.last >= feed.until:
            self._close(user, session_id)
        elif feed.held and fill:
            self._fill(session_id)

    def _drain(self, user: str, feed: Feed, frames: dict | None = None) -> None:
        """Deliver the held messages that follow ``feed.last``."""
        if frames is None:
            frames = {}
        while (held := feed.held.pop(feed.last + 1, None)) is not None:
            event, asker, cdid = held
            for client in self.devices.get(user, {}).values():
                if client is asker:
                    continue
                key = (event.seq, client.protocol)
                if key not in frames:
                    data = client.protocol.encode(event)
                    frames[key] = text_frame(data) if data is not None else None
                if frames[key] is not None:
                    client.deliver(frames[key])
            if asker is not None:
                _answer(asker, event, cdid)
            feed.last = event.seq

    def _start(self, user: str, feed: Feed, seq: int) -> None:
        """The baseline of a pending feed is known: ``seq`` (-1: unknown)."""
        if seq == -1 and feed.held:
            seq = min(feed.held) - 1
        feed.last = seq
        if seq == -1:
            return
        for old in [s for s in feed.held if s <= seq]:
            event, asker, cdid = feed.held.pop(old)
            if asker is not None:
                _answer(asker, event, cdid)
        self._drain(user, feed)

    def _baseline(self, user: str, session_ids: list[str]) -> None:
        """Read where each of the sessions stands for ``user``'s first device
        here, then answer the logins waiting for it."""
        feeds = self.feeds.setdefault(user, {})
        for session_id in session_ids:
            feeds.setdefault(session_id, Feed(None))

        def done(newest: dict[str, int] | None, failure: str | None = None) -> None:
            feeds = self.feeds.get(user)
            if failure is not None:
                log.warning("could not read where %s's sessions stand (%s): their devices here "
                            "get messages from the next one on", user, failure)
            if feeds is not None:
                for session_id in session_ids:
                    feed = feeds.get(session_id)
                    if feed is not None and feed.last is None:
                        self._start(user, feed, newest.get(session_id, -1) if newest else -1)
                for session_id, feed in feeds.items():
                    if feed.held:
                        self._fill(session_id)
            for login in self.logins.pop(user, ()):
                self.devices.setdefault(user, {})[login.client.id] = login.client
                Router.resolve(login, None)
            if user in self._acked and feeds is not None:
                self._catch_up(feeds)

        refused = self._write(lambda store: {s: newest_seq(store, s) for s in session_ids}, done,
                              lambda answer: done(None, answer))
        if refused:
            done(None, refused)

    def _fill(self, session_id: str, force: bool = False, attempt: int = 0) -> None:
        """Read from the store what this node's users of the session miss:
        after the lowest ``last`` among feeds that hold messages past a gap
        (or among all, with ``force``). A gap the store cannot fill (the
        store failed, or the session was deleted: ``attempt`` counts reads
        that found nothing) is skipped and logged."""
        if session_id in self._filling:
            return
        lasts = [feed.last for feed in self._feeds_of(session_id)
                 if feed.last is not None and feed.last >= 0 and (force or feed.held)]
        if not lasts:
            return
        after = min(lasts)
        self._filling.add(session_id)

        def done(rows: list[tuple] | None, failure: str | None = None) -> None:
            self._filling.discard(session_id)
            events = [StoredMessage(session_id=session_id, seq=seq, sender_id=sender,
                                    message=msgspec.Raw(message.encode()), sender_timestamp=sent,
                                    server_timestamp=stored)
                      for seq, sender, message, sent, stored in rows or ()]
            for user, feeds in self.feeds.items():
                feed = feeds.get(session_id)
                if feed is None:
                    continue
                for event in events:
                    self._offer(user, event, fill=False)
            stuck = [(user, feeds[session_id]) for user, feeds in self.feeds.items()
                     if session_id in feeds and feeds[session_id].held
                     and feeds[session_id].last is not None]
            if not stuck:
                return
            # The read saw everything committed up to ``seen`` (a full page:
            # maybe more). A gap above it opened after the read: read again.
            seen = rows[-1][0] if rows else after
            if rows and (len(rows) == FILL_PAGE or any(feed.last + 1 > seen for _, feed in stuck)):
                self._fill(session_id)
                return
            if rows is not None and not rows and attempt < 2:
                self._fill(session_id, attempt=attempt + 1)
                return
            for user, feed in stuck:
                self.skipped += 1
                log.warning("session %s: messages %d to %d for %s are not in the store (%s): "
                            "skipped", session_id, feed.last + 1, min(feed.held) - 1, user,
                            failure or "deleted?")
                feed.last = min(feed.held) - 1
                self._drain(user, feed)
                if feed.until is not None and feed.last >= feed.until:
                    self._close(user, session_id)

        refused = self._write(lambda store: store.history(session_id, after=after,
                                                          limit=FILL_PAGE),
                              done, lambda answer: done(None, answer))
        if refused:
            done(None, refused)

    def _feeds_of(self, session_id: str) -> list[Feed]:
        """Every local feed of the session (members', and those closing)."""
        return [feeds[session_id] for feeds in self.feeds.values() if session_id in feeds]

    def reload(self) -> None:
        """Reload the sessions from the store and apply what changed while
        this node did not hear of it (announced to local devices), then
        catch every local feed up. Sessions changed here since the reload
        was asked for are left as they are."""
        if self._reloading:
            return
        self._reloading = True
        before = {session_id: session.members for session_id, session in self.sessions.items()}

        def done(rows: list[StoredSession] | None, failure: str | None = None) -> None:
            self._reloading = False
            if rows is None:
                log.warning("could not reload the sessions after a broker outage: %s", failure)
                self._place({})
                return
            stored = {row.id: row for row in rows}
            for session_id, row in stored.items():
                session = self.sessions.get(session_id)
                members = frozenset(row.members)
                if session_id not in before:
                    if session is None:
                        self._apply(SessionChanged(session_id=session_id, kind=row.kind,
                                                   status="created", members=sorted(members),
                                                   version=row.version), row.members)
                elif session is not None and session.members is before[session_id] \
                        and session.members != members:
                    self._apply(SessionChanged(session_id=session_id, kind=row.kind,
                                               status="modified", members=sorted(members),
                                               old_members=sorted(session.members),
                                               version=row.version), row.members)
                elif session is not None:
                    session.version = max(session.version, row.version)
            for session_id, members in before.items():
                session = self.sessions.get(session_id)
                if session_id not in stored and session is not None and session.members is members:
                    self._apply(SessionChanged(session_id=session_id, kind=session.kind,
                                               status="deleted", members=sorted(members)))
            self._place(stored)
            for user, feeds in list(self.feeds.items()):
                missing = [s for s in self.joined.get(user, {}) if s not in feeds]
                if missing and user not in self.logins:
                    self._baseline(user, missing)
                self._catch_up(feeds)

        refused = self._write(lambda store: store.load_sessions(), done,
                              lambda answer: done(None, answer))
        if refused:
            done(None, refused)

    def _apply(self, change: SessionChanged, since: dict[str, int]) -> None:
        """A change found by ``reload``: applied as if another node said it;
        the feeds of users who joined start where the store says they
        joined (``since``), and read what they missed."""
        change.seq = -1
        self.remote_changed(change, since)

    def _place(self, stored: dict[str, StoredSession]) -> None:
        """Start the feeds that held messages of a session this node did not
        know the user was in, where ``stored`` says the user joined (from
        the first message held if it does not say)."""
        unplaced, self._unplaced = self._unplaced, set()
        for user, session_id in unplaced:
            feed = self.feeds.get(user, {}).get(session_id)
            if feed is None or feed.last is not None or user in self.logins:
                continue  # closed, placed meanwhile, or a login's baseline will
            row = stored.get(session_id)
            self._start(user, feed, row.members.get(user, -1) if row is not None else -1)
            if feed.held:
                self._fill(session_id)

    def _deliver(self, users: Iterable[str], event: Event) -> None:
        """Every local device of ``users`` gets ``event``, framed once per protocol."""
        frames: dict[type, bytes | None] = {}
        for user in users:
            for client in self.devices.get(user, {}).values():
                protocol = client.protocol
                if protocol not in frames:
                    data = protocol.encode(event)
                    frames[protocol] = text_frame(data) if data is not None else None
                if frames[protocol] is not None:
                    client.deliver(frames[protocol])

    # --- helpers ---------------------------------------------------------------

    def _usable(self, client: Client, session_id: str, change: str = "") -> Session | str:
        """The session if ``client`` may use it (and make ``change``), else why not."""
        session = self.sessions.get(session_id)
        if self.writer.failed:
            return STORE_FAILED
        if session is None:
            return "no such session"
        if client.user_id not in session.members:
            return "not a member of this session"
        if change and session.kind == "direct":
            return f"a direct session cannot be {change}"
        return session

    def _write(self, run: Callable[[Store], Any], done: Callable[[Any], None],
               failed: Callable[[str], None], undo: Callable[[], None] | None = None) -> str | None:
        """Queue a store job (``failed`` gets the answer for the asker); the
        refusal text if the writer cannot take it."""
        def failed_with(failure: Failure) -> None:
            failed(STORE_RETRY if failure.busy else STORE_FAILED)

        if self.writer.submit(Job(run, done, failed_with, undo)):
            return None
        return STORE_FAILED if self.writer.failed else STORE_BUSY

    def _over_cap(self, users: Iterable[str]) -> str | None:
        """Why adding ``users`` to one more session is refused, if it is:
        some are in ``max_sessions_per_user`` sessions already."""
        cap = self.max_sessions_per_user
        over = sorted(user for user in users if len(self.joined.get(user, ())) >= cap)
        if not over:
            return None
        return (f"{', '.join(over)} {'is' if len(over) == 1 else 'are'} already in {cap} "
                "sessions (max-sessions-per-user)")

    def _add(self, session: Session) -> None:
        self.sessions[session.id] = session
        for user in session.members:
            self.joined.setdefault(user, {})[session.id] = session

    def _remove(self, session: Session) -> None:
        if self.sessions.get(session.id) is not session:
            return
        del self.sessions[session.id]
        for user in session.members:
            self._leave(user, session.id)

    def _set_members(self, session: Session, members: frozenset[str]) -> None:
        for user in session.members - members:
            self._leave(user, session.id)
        for user in members - session.members:
            self.joined.setdefault(user, {})[session.id] = session
        session.members = members

    def _leave(self, user: str, session_id: str) -> None:
        sessions = self.joined.get(user)
        if sessions is not None:
            sessions.pop(session_id, None)
            if not sessions:
                del self.joined[user]

    @staticmethod
    def _fail(client: Client, cdid: Any, message: str) -> None:
        data = client.protocol.encode(Status(cdid=cdid, ok=False, message=message))
        client.answered(text_frame(data) if data is not None else None)

    def _fanout(self, users: Iterable[str], event: Event, asker: Client, cdid: Any) -> None:
        """Every device of every user gets ``event``, framed once per protocol;
        the asker's own connection gets a copy carrying its ``cdid``."""
        frames: dict[type, bytes | None] = {}
        for user in users:
            for client in self.devices.get(user, {}).values():
                if client is asker:
                    continue
                protocol = client.protocol
                if protocol not in frames:
                    data = protocol.encode(event)
                    frames[protocol] = text_frame(data) if data is not None else None
                frame = frames[protocol]
                if frame is not None:
                    client.deliver(frame)
        data = asker.protocol.encode(msgspec.structs.replace(event, cdid=cdid))
        asker.answered(text_frame(data) if data is not None else None)


    # --- moderation (issue 22; chatd.moderation) -------------------------------

    def deliver_stored(self, event: StoredMessage) -> None:
        """Deliver a committed message that no client sent (a server notice)
        as ``send_message`` delivers one: every local device of every member,
        and in a cluster each member's channel and this node's feeds (which
        keep ``seq`` order and drop duplicates)."""
        session = self.sessions.get(event.session_id)
        members = session.members if session is not None else frozenset()
        if not self.broker.shared:
            self._deliver(members, event)
            return
        item = Stored(session_id=event.session_id, seq=event.seq, sender_id=event.sender_id,
                      message=event.message, sender_timestamp=event.sender_timestamp,
                      server_timestamp=event.server_timestamp)
        frames: dict[type, bytes | None] = {}
        for user in members:
            self.broker.publish(user_channel(user), item)
            if user in self.feeds:
                self._offer(user, event, frames=frames)


def _answer(asker: Client, event: Event, cdid: Any) -> None:
    """The asker's one answer: ``event`` carrying its ``cdid``."""
    data = asker.protocol.encode(msgspec.structs.replace(event, cdid=cdid))
    asker.answered(text_frame(data) if data is not None else None)


def _answer_held(feed: Feed) -> None:
    """A feed is dropped: the askers of messages it held still get their answer."""
    for event, asker, cdid in feed.held.values():
        if asker is not None:
            _answer(asker, event, cdid)
    feed.held.clear()


def _call(callback: Callable[..., None], *args: Any) -> None:
    """Run one job's callback; a bug in one answer must not stop the others."""
    try:
        callback(*args)
    except Exception:
        log.exception("answering a store job failed")
