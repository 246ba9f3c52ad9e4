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
a member and owner; only members may send into or read it, and only its
owners and admins modify or delete it, though any member may leave
(``chatd.roles``, issue 23). A direct
session belongs to its two users, has an id derived from the sorted pair,
and exists (durably) from the first time either of them asks for it; only
then can messages be sent into it.

Caps: one user may be a member of at most ``max-sessions-per-user``
sessions (direct and group); a creation or modification that would put
anyone over it is refused, naming them, and nothing is stored.

Bounds on what one user can make the store keep (issue 19), none of
which the user can reset by leaving: a group has at most
``max-members-per-session`` members; a user may have created at most
``max-groups-per-user`` groups that are still stored, whether or not she
is still in them (counted in the store, in the creating transaction:
exact across restarts and nodes); and may have at most
``max-messages-per-user-per-session`` messages stored in one session
(counted from the store at a session's first message after start, then
here: exact on one node; in a cluster each node counts what it stored
after that). A direct session cannot be left or deleted, so
``max-sessions-per-user`` bounds those. Each refusal is a failed
``status-response`` naming the key.

**Several nodes** (a shared broker; docs/cluster.md). Every committed
change of a session is published on ``chatd:cluster``, so every node's
sessions stay the same (``remote_changed``), and each committed message
on the channel of each member (``chatd:user:USER``), which a node
subscribes to while that user has a device connected there. Pub/sub may
lose or reorder messages, so for each local user and session the node
keeps a ``Feed``: the last ``seq`` that user's devices here got. A
message at or below it is a duplicate and dropped; one past a gap is
held, and the gap filled by reading the store (a writer job, never in
the router) if pub/sub has not filled it within ``chatd.feeds.FILL_WAIT``
to twice that (the ``FillDue`` timer), so each device gets every message
of its sessions once, in ``seq`` order. A user's first device on a node reads where each of their
sessions stands (its baseline) before its login is answered; a new
subscription, and every broker reconnect, is followed by a read of what
may have been missed, and a reconnect reloads the sessions themselves.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from prometheus_client.core import CounterMetricFamily, Metric

from chatd import hub
from chatd import roles as access
from chatd.broker import Broker, LocalBroker
from chatd.broker.base import CLUSTER, user_channel
from chatd.broker.wire import SessionChanged, Stored
from chatd.events import (
    Command, CreateSession, DeleteSession, DirectSessionInfo, Event, ListSessions, Login, Logout,
    ModifySession, ReadHistory, SendMessage, SessionInfo, Status, StoredMessage,
)
from chatd.feeds import (
    FILL_PAGE, FILL_WAIT, Action, Answer, Deliver, Entry, Feeds, Read, Reload, Wait,
)
from chatd.router import DEFERRED, Router, Service
from chatd.store import Failure, Job, Store, Writer
from chatd.store.base import StoredSession
from chatd.store.marks import forget as forget_marks

if TYPE_CHECKING:
    from chatd.outbox import Client

log = logging.getLogger("chatd.sessions")

#: Answers when a write was not stored: the store failed for good (until
#: a restart), stayed busy past store-busy-timeout, or the queue is full.
STORE_FAILED = "storage unavailable: nothing was stored"
STORE_RETRY = "storage busy: nothing was stored, try again"
STORE_BUSY = "server busy: too many writes queued, try again"


def direct_session_id(a: str, b: str) -> str:
    """The same id for the same two users, whoever asks, forever."""
    pair = msgspec.json.encode(sorted((a, b)))
    return "direct-" + hashlib.sha256(pair).hexdigest()[:32]


def new_session_id() -> str:
    return "mutable-" + secrets.token_hex(12)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Refused(str):
    """A store job's answer when a bound counted in the store refuses it:
    the refusal text, for the asker."""


class Session:
    __slots__ = ("id", "kind", "members", "version", "waiting", "sent", "roles")

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
        #: Messages stored or being stored here, by sender (None until the
        #: store has counted them: ``max-messages-per-user-per-session``).
        self.sent: dict[str, int] | None = None
        #: Owners and admins (issue 23, chatd.roles); replaced, never mutated.
        self.roles: dict[str, str] = {}

    def info(self, status: str) -> SessionInfo:
        if self.kind != "mutable":
            return SessionInfo(session_id=self.id, kind=self.kind, status=status,
                               members=sorted(self.members))
        return SessionInfo(session_id=self.id, kind=self.kind, status=status,
                           members=sorted(self.members),
                           owners=access.listed(self.roles, access.OWNER),
                           admins=access.listed(self.roles, access.ADMIN))


def newest_seq(store: Store, session_id: str) -> int:
    """The session's last message ``seq`` (0 if none), inside a writer job."""
    rows = store.history(session_id, limit=1)
    return rows[0][0] if rows else 0


class StoreDone(Command, kw_only=True):
    """The writer's report of one batch: its ``results``, or why it failed."""

    jobs: list[Job]
    results: list[Any] | None
    failure: Failure | None


class FillDue(Command, kw_only=True):
    """``FILL_WAIT`` seconds after a feed's ``Wait``: gaps still open are read."""


class Sessions(Service):
    """The ``max_*`` arguments are the config keys of the same names."""

    def __init__(self, store: Store, max_pending: int = 10_000, *,
                 max_sessions_per_user: int = 1000, max_groups_per_user: int = 200,
                 max_members_per_session: int = 100,
                 max_messages_per_user_per_session: int = 100_000,
                 broker: Broker | None = None,
                 on_commit: Callable[[float], None] | None = None) -> None:
        self.store = store
        self.broker: Broker = broker if broker is not None else LocalBroker()
        self.writer = Writer(store, self._report, max_pending=max_pending, on_commit=on_commit)
        self.max_sessions_per_user = max_sessions_per_user
        self.max_groups_per_user = max_groups_per_user
        self.max_members_per_session = max_members_per_session
        self.max_messages_per_user_per_session = max_messages_per_user_per_session
        self.router: Router | None = None
        self.sessions: dict[str, Session] = {}
        #: user -> their sessions, in the order they joined (for listing).
        self.joined: dict[str, dict[str, Session]] = {}
        #: user -> their connected devices (connections), by client id.
        self.devices: dict[str, dict[int, Client]] = {}
        # --- cluster only (broker.shared) ---
        #: The local users' message feeds (``chatd.feeds``).
        self.feeds = Feeds()
        #: user -> logins waiting for the user's baseline read.
        self.logins: dict[str, list[Login]] = {}
        self._reloading = False
        #: Users whose channel delivers (acknowledged since their first login here).
        self._acked: set[str] = set()
        #: Delivery and read marks (issue 23: chatd.marks), set by that service.
        self.marks: Any = None
        #: Set when the feeds wait for ``due`` (``Wait``); the timer task's.
        self._fill_due = trio.Event()
        self._fill_armed = False

    @property
    def skipped(self) -> int:
        """Gaps that could not be filled from the store (logged, for /metrics)."""
        return self.feeds.skipped

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
        router.handle(FillDue, self.fill_due)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take the store (one server per SQLite file: raises ``StoreError``
        if another chatd has it), load the stored sessions, run the writer."""
        self.store.lock()
        for row in await trio.to_thread.run_sync(self.store.load_sessions):
            self._add(Session(row.id, row.kind, row.members, row.version))
        await trio.to_thread.run_sync(self._load_roles)
        log.info("loaded %d sessions from %s", len(self.sessions), self.store.name)
        async with trio.open_nursery() as nursery:
            if self.broker.shared:
                nursery.start_soon(self._fill_timer)
            await nursery.start(self.writer.run)
            task_status.started()

    async def _fill_timer(self) -> None:
        """Post ``FillDue`` ``FILL_WAIT`` seconds after each ``Wait``."""
        while True:
            await self._fill_due.wait()
            self._fill_due = trio.Event()
            await trio.sleep(FILL_WAIT)
            try:
                await self.router.send(FillDue())
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return

    def fill_due(self, _: FillDue) -> None:
        self._fill_armed = False
        self._act(self.feeds.due())

    def _load_roles(self) -> None:
        """Each group's owners and admins, from the store (issue 23)."""
        stored = self.store.run_batch([access.load_roles])[0]
        for session_id, roles in stored.items():
            session = self.sessions.get(session_id)
            if session is not None:
                session.roles = roles

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
            self._act(self.feeds.drop(user))

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
        if not self.broker.shared:  # new in the store too: nobody has sent anything yet
            session.sent = {}
        members = sorted(session.members)
        over = self._over_cap(members)
        if over:
            return over

        def created(seq: int) -> None:
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

        refused = self._write(create, created, failed, undo=lambda: self._remove(session))
        if refused:
            return refused
        session.waiting = [cmd]
        self._add(session)
        return DEFERRED

    def create(self, cmd: CreateSession) -> None:
        client, me = cmd.client, cmd.client.user_id
        session = Session(new_session_id(), "mutable", {*cmd.members, me})
        session.sent = {}  # a new id: nobody has sent anything yet
        session.roles = {me: access.OWNER}  # the creator owns it (chatd.roles)
        info = session.info("created")
        over = self._too_many_members(session.members) or self._over_cap(session.members)
        if over:
            return self._fail(client, cmd.cdid, over)
        groups = self.max_groups_per_user

        def create(store: Store) -> _Refused | None:
            # Counted in the transaction that stores it: exact whatever
            # restarted or whichever node created the others.
            if store.count_created(me) >= groups:
                return _Refused(
                    f"you have created {groups} groups that are still stored "
                    "(max-groups-per-user): delete one first (a group you left counts "
                    "until its members delete it)")
            store.create_session(session.id, "mutable", info.members, now_ms())
            store.set_creator(session.id, me)
            access.store_roles(store, session.id, session.roles)
            return None

        def created(refused: _Refused | None) -> None:
            if refused is not None:
                self._remove(session)
                return self._fail(client, cmd.cdid, str(refused))
            self._fanout(session.members, info, client, cmd.cdid)
            self._changed(session, "created", info.members, (), 0)

        refused = self._write(
            create,
            created,
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
        old_roles = session.roles
        roles = access.change(old_roles, old, new, client.user_id, cmd.admins)
        if isinstance(roles, str):
            return self._fail(client, cmd.cdid, roles)
        over = self._too_many_members(new) or self._over_cap(new - old)
        if over:
            return self._fail(client, cmd.cdid, over)
        members = sorted(new)
        info = SessionInfo(session_id=session.id, kind="mutable", status="modified", members=members,
                           owners=access.listed(roles, access.OWNER),
                           admins=access.listed(roles, access.ADMIN))
        def change(store: Store) -> tuple[int, int]:
            result = store.set_members(session.id, members) or (0, session.version)
            access.store_roles(store, session.id, roles)
            return result

        def changed(result: tuple[int, int]) -> None:
            seq, session.version = result
            self._fanout(old | new, info, client, cmd.cdid)
            self._changed(session, "modified", members, old, seq)

        def undo() -> None:
            self._set_members(session, old)
            session.roles = old_roles

        refused = self._write(change, changed,
                              lambda answer: self._fail(client, cmd.cdid, answer), undo=undo)
        if refused:
            return self._fail(client, cmd.cdid, refused)
        self._set_members(session, new)
        session.roles = roles

    def delete(self, cmd: DeleteSession) -> None:
        client = cmd.client
        session = self._usable(client, cmd.session_id, change="deleted")
        if isinstance(session, str):
            return self._fail(client, cmd.cdid, session)
        refusal = access.may_delete(session.roles, client.user_id)
        if refusal:
            return self._fail(client, cmd.cdid, refusal)
        info, members = session.info("deleted"), session.members
        def deleted(_: None) -> None:
            self._fanout(members, info, client, cmd.cdid)
            self._changed(session, "deleted", info.members, (), 0)

        def delete(store: Store) -> None:
            store.delete_session(session.id)
            forget_marks(store, session.id)  # issue 23

        refused = self._write(delete, deleted,
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
        marks = self.marks  # each session's marks after it (issue 23)
        refused = self._write(lambda store: marks.listing(listing, store) if marks else listing,
                              lambda found: Router.resolve(cmd, found),
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
        cap = self.max_messages_per_user_per_session
        refusal = (f"you have {cap} messages stored in this session "
                   "(max-messages-per-user-per-session)")
        counts = session.sent
        if counts is not None:  # counted here since the store counted them
            if counts.get(sender_id, 0) >= cap:
                return self._fail(client, cmd.cdid, refusal)
            counts[sender_id] = counts.get(sender_id, 0) + 1

        def append(store: Store) -> tuple[Any, dict | None] | _Refused:
            stored_counts = None
            if counts is None:  # the session's first messages since start: ask the store
                stored_counts = store.count_sent(session_id)
                if stored_counts.get(sender_id, 0) >= cap:
                    return _Refused(refusal)
            # (seq, members): settled by the store once committed (``Later``).
            if shared:
                return store.append_checked(session_id, sender_id, text, sent, stored,
                                            version), stored_counts
            return (store.append_message(session_id, sender_id, text, sent, stored),
                    None), stored_counts

        def uncount() -> None:
            if counts is not None:
                counts[sender_id] -= 1

        def done(result: tuple[tuple[int | None, list[str] | None], dict | None] | _Refused
                 ) -> None:
            if isinstance(result, _Refused):
                return self._fail(client, cmd.cdid, str(result))
            (seq, current), stored_counts = result
            if seq is None:  # deleted (by another node) before the message was stored
                return self._fail(client, cmd.cdid, "no such session")
            if counts is None:
                if session.sent is None:  # the store's count (before this one)
                    session.sent = stored_counts
                session.sent[sender_id] = session.sent.get(sender_id, 0) + 1
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
            frames: dict[tuple, hub.Frames] = {}
            for user in targets:
                # A member this node does not know of yet gets it when the
                # change arrives (its feed starts with a read of the store).
                if user in self.feeds and user != sender_id and (
                        user in members or self.feeds.follows(user, session_id)):
                    self._act(self.feeds.offer(user, Entry(event)), frames)
            if sender_id in self.feeds:
                self._act(self.feeds.offer(sender_id, Entry(event, client, cmd.cdid)), frames)
            else:
                _answer(client, event, cmd.cdid)

        refused = self._write(append, done, lambda answer: self._fail(client, cmd.cdid, answer),
                              undo=uncount)
        if refused:
            uncount()
            self._fail(client, cmd.cdid, refused)

    def history(self, cmd: ReadHistory) -> str | object:
        session = self._usable(cmd.client, cmd.session_id)
        if isinstance(session, str):
            return session
        session_id = session.id

        def read(rows: list[tuple]) -> None:
            Router.resolve(cmd, [
                StoredMessage(session_id=session_id, seq=seq, sender_id=sender,
                              message=msgspec.Raw(message.encode()), sender_timestamp=sent,
                              server_timestamp=stored)
                for seq, sender, message, sent, stored in rows])

        refused = self._write(
            lambda store: store.history(session_id, before=cmd.before, after=cmd.after,
                                        limit=cmd.limit),
            read, lambda answer: Router.resolve(cmd, answer))
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
            old_members=old, seq=seq, version=session.version, roles=session.roles))
        self._act(self.feeds.follow(session.id, status, members, old, seq))

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
            session = Session(item.session_id, item.kind, members, item.version)
            session.roles = dict(item.roles)
            self._add(session)
        else:
            if session.members != members:
                self._set_members(session, members)
            if item.version >= session.version:
                session.roles = dict(item.roles)
            session.version = max(session.version, item.version)
        if item.kind == "mutable":
            self._deliver(members | set(item.old_members), SessionInfo(
                session_id=item.session_id, kind=item.kind, status=item.status,
                members=sorted(members), owners=access.listed(item.roles, access.OWNER),
                admins=access.listed(item.roles, access.ADMIN)))
        self._act(self.feeds.follow(item.session_id, item.status, item.members,
                                    item.old_members, item.seq if since is None else None, since))

    def remote_items(self) -> dict[type, Any]:
        """Other nodes' GradAgenda traffic (docs/cluster.md): committed
        session changes, and committed messages on members' channels."""
        return {SessionChanged: lambda _, item: self.remote_changed(item),
                Stored: lambda remote, item: self.remote_stored(remote.user, item)}

    def remote_stored(self, user: str | None, item: Stored) -> None:
        """A message another node committed, for ``user``."""
        if user in self.feeds:
            self._act(self.feeds.offer(user, Entry(StoredMessage(
                session_id=item.session_id, seq=item.seq, sender_id=item.sender_id,
                message=item.message, sender_timestamp=item.sender_timestamp,
                server_timestamp=item.server_timestamp))))

    def subscribed(self, users: list[str]) -> None:
        """Users' channels deliver now: read what they may have missed before."""
        for user in users:
            if user in self.feeds:
                self._acked.add(user)
                if user not in self.logins:
                    self._act(self.feeds.catch_up(user))

    def broker_down(self) -> None:
        self._acked.clear()

    def broker_up(self) -> None:
        """The broker delivers, first or after an outage: sessions changed
        elsewhere meanwhile (or between loading them at start and
        subscribing) are reloaded from the store (``reload``)."""
        self.reload()

    def collect(self) -> Iterator[Metric]:
        """Prometheus families, on a cluster node (the server registers it)."""
        yield CounterMetricFamily("chatd_cluster_gradagenda_gaps_skipped",
                                  "GradAgenda gaps the store could not fill", value=self.skipped)
        yield CounterMetricFamily("chatd_cluster_gradagenda_gap_reads",
                                  "Store reads of GradAgenda messages a device here missed "
                                  "(gaps pub/sub did not fill in time, catch-ups)",
                                  value=self.feeds.reads)

    def describe(self) -> list[Any]:
        return []

    def _baseline(self, user: str, session_ids: list[str]) -> None:
        """Read where each of the sessions stands for ``user``'s first device
        here, then answer the logins waiting for it."""
        self.feeds.open(user, session_ids)

        def read(newest: dict[str, int] | None, failure: str | None = None) -> None:
            if failure is not None:
                log.warning("could not read where %s's sessions stand (%s): their devices here "
                            "get messages from the next one on", user, failure)
            self._act(self.feeds.baseline(user, session_ids, newest))
            for login in self.logins.pop(user, ()):
                self.devices.setdefault(user, {})[login.client.id] = login.client
                Router.resolve(login, None)
            if user in self._acked:
                self._act(self.feeds.catch_up(user))

        refused = self._write(lambda store: {s: newest_seq(store, s) for s in session_ids}, read,
                              lambda answer: read(None, answer))
        if refused:
            read(None, refused)

    def _read(self, read: Read) -> None:
        """Carry out a feed's ``Read``: a writer job, never in the router."""
        def got(rows: list[tuple]) -> None:
            self._act(self.feeds.filled(read, [
                StoredMessage(session_id=read.session_id, seq=seq, sender_id=sender,
                              message=msgspec.Raw(message.encode()), sender_timestamp=sent,
                              server_timestamp=stored)
                for seq, sender, message, sent, stored in rows]))

        def failed(answer: str) -> None:
            self._act(self.feeds.filled(read, None, answer))

        refused = self._write(lambda store: store.history(read.session_id, after=read.after,
                                                          limit=FILL_PAGE), got, failed)
        if refused:
            failed(refused)

    def reload(self) -> None:
        """Reload the sessions from the store and apply what changed while
        this node did not hear of it (announced to local devices), then
        catch every local feed up. Sessions changed here since the reload
        was asked for are left as they are."""
        if self._reloading:
            return
        self._reloading = True
        before = {session_id: session.members for session_id, session in self.sessions.items()}

        def loaded(found: tuple[list[StoredSession], dict] | None,
                   failure: str | None = None) -> None:
            self._reloading = False
            rows, roles = found if found is not None else (None, {})
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
                                                   version=row.version,
                                                   roles=roles.get(session_id, {})), row.members)
                elif session is not None and session.members is before[session_id] \
                        and session.members != members:
                    self._apply(SessionChanged(session_id=session_id, kind=row.kind,
                                               status="modified", members=sorted(members),
                                               old_members=sorted(session.members),
                                               version=row.version,
                                               roles=roles.get(session_id, {})), row.members)
                elif session is not None:
                    if row.version >= session.version:
                        session.roles = roles.get(session_id, {})
                    session.version = max(session.version, row.version)
            for session_id, members in before.items():
                session = self.sessions.get(session_id)
                if session_id not in stored and session is not None and session.members is members:
                    self._apply(SessionChanged(session_id=session_id, kind=session.kind,
                                               status="deleted", members=sorted(members)))
            self._place(stored)
            for user in list(self.feeds.users):
                missing = [s for s in self.joined.get(user, {}) if not self.feeds.follows(user, s)]
                if missing and user not in self.logins:
                    self._baseline(user, missing)
                self._act(self.feeds.catch_up(user))

        refused = self._write(lambda store: (store.load_sessions(), access.load_roles(store)),
                              loaded,
                              lambda answer: loaded(None, answer))
        if refused:
            loaded(None, refused)

    def _apply(self, change: SessionChanged, since: dict[str, int]) -> None:
        """A change found by ``reload``: applied as if another node said it;
        the feeds of users who joined start where the store says they
        joined (``since``), and read what they missed."""
        self.remote_changed(change, since)

    def _place(self, stored: dict[str, StoredSession]) -> None:
        """Start the feeds that held messages of a session this node did not
        know the user was in, where ``stored`` says the user joined."""
        self._act(self.feeds.place({session_id: row.members for session_id, row in stored.items()},
                                   self.logins))

    def _act(self, actions: list[Action], frames: dict[tuple, hub.Frames] | None = None,
             ) -> None:
        """Carry out what the feeds decided (``chatd.feeds``); ``frames``:
        each message's ``hub.Frames``, shared by the calls for one message."""
        if frames is None:
            frames = {}
        for action in actions:
            kind = type(action)
            if kind is Deliver:
                event, asker = action.entry.event, action.entry.asker
                key = (event.session_id, event.seq)
                framed = frames.get(key)
                if framed is None:
                    framed = frames[key] = hub.Frames(event)
                framed.deliver(self.devices.get(action.user, {}).values(), exclude=asker)
                if asker is not None:
                    _answer(asker, event, action.entry.cdid)
            elif kind is Answer:
                _answer(action.entry.asker, action.entry.event, action.entry.cdid)
            elif kind is Read:
                self._read(action)
            elif kind is Reload:
                self.reload()
            elif kind is Wait:
                if not self._fill_armed:
                    self._fill_armed = True
                    self._fill_due.set()
            else:
                log.warning("session %s: messages %d to %d for %s are not in the store (%s): "
                            "skipped", action.session_id, action.first, action.last, action.user,
                            action.why)

    def _deliver(self, users: Iterable[str], event: Event, exclude: Client | None = None,
                 ) -> None:
        """Every local device of ``users`` (but ``exclude``) gets ``event``."""
        hub.Frames(event).deliver(self._devices_of(users), exclude)

    def _devices_of(self, users: Iterable[str]) -> Iterator[Client]:
        devices = self.devices
        for user in users:
            yield from devices.get(user, {}).values()

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

    def _too_many_members(self, members: frozenset[str]) -> str | None:
        """Why a session of ``members`` is refused, if it is."""
        cap = self.max_members_per_session
        if len(members) <= cap:
            return None
        return (f"a session has at most {cap} members (max-members-per-session); "
                f"this one would have {len(members)}")

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
        hub.answer(client, Status(cdid=cdid, ok=False, message=message))

    def _fanout(self, users: Iterable[str], event: Event, asker: Client, cdid: Any) -> None:
        """Every device of every user gets ``event``; the asker's own
        connection gets a copy carrying its ``cdid``."""
        self._deliver(users, event, exclude=asker)
        _answer(asker, event, cdid)

    # --- for the services beside this one (issue 23: chatd.marks, chatd.media) ---

    def usable(self, client: Client, session_id: str) -> Session | str:
        """The session if ``client`` is a member, else why not (``_usable``)."""
        return self._usable(client, session_id)

    def write(self, run: Callable[[Store], Any], done: Callable[[Any], None],
              failed: Callable[[str], None]) -> str | None:
        """Queue a store job (``_write``); the refusal text if it cannot."""
        return self._write(run, done, failed)

    def deliver(self, users: Iterable[str], event: Event) -> None:
        """Every local device of ``users`` gets ``event`` (``_deliver``)."""
        self._deliver(users, event)

    def fail(self, client: Client, cdid: Any, message: str) -> None:
        """The asker's one answer: a failed status (``_fail``)."""
        self._fail(client, cdid, message)

    @staticmethod
    def succeed(client: Client, cdid: Any) -> None:
        """The asker's one answer: a succeeded status."""
        _answer(client, Status(cdid=cdid, ok=True), cdid)

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
        frames: dict[tuple, hub.Frames] = {}
        for user in members:
            self.broker.publish(user_channel(user), item)
            if user in self.feeds:
                self._act(self.feeds.offer(user, Entry(event)), frames)


def _answer(asker: Client, event: Event, cdid: Any) -> None:
    """The asker's one answer: ``event`` carrying its ``cdid``."""
    hub.answer(asker, msgspec.structs.replace(event, cdid=cdid))


def _call(callback: Callable[..., None], *args: Any) -> None:
    """Run one job's callback; a bug in one answer must not stop the others."""
    try:
        callback(*args)
    except Exception:
        log.exception("answering a store job failed")
