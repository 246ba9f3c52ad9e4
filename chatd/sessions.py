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

from chatd.events import (
    Command, CreateSession, DeleteSession, DirectSessionInfo, Event, ListSessions, Login, Logout,
    ModifySession, ReadHistory, SendMessage, SessionInfo, Status, StoredMessage,
)
from chatd.router import DEFERRED, Router
from chatd.store import Failure, Job, Store, Writer
from chatd.transport import text_frame

if TYPE_CHECKING:
    from chatd.client import Client

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


class Session:
    __slots__ = ("id", "kind", "members", "waiting")

    def __init__(self, session_id: str, kind: str, members: Iterable[str]) -> None:
        self.id = session_id
        self.kind = kind
        #: Replaced, never mutated: a queued message keeps the members it was sent to.
        self.members = frozenset(members)
        #: Requests for a direct session whose creation is not committed yet.
        self.waiting: list[DirectSessionInfo] | None = None

    def info(self, status: str) -> SessionInfo:
        return SessionInfo(session_id=self.id, kind=self.kind, status=status,
                           members=sorted(self.members))


class StoreDone(Command, kw_only=True):
    """The writer's report of one batch: its ``results``, or why it failed."""

    jobs: list[Job]
    results: list[Any] | None
    failure: Failure | None


class Sessions:
    """``max_sessions_per_user``: config ``max-sessions-per-user``."""

    def __init__(self, store: Store, max_pending: int = 10_000, *,
                 max_sessions_per_user: int = 1000) -> None:
        self.store = store
        self.writer = Writer(store, self._report, max_pending=max_pending)
        self.max_sessions_per_user = max_sessions_per_user
        self.router: Router | None = None
        self.sessions: dict[str, Session] = {}
        #: user -> their sessions, in the order they joined (for listing).
        self.joined: dict[str, dict[str, Session]] = {}
        #: user -> their connected devices (connections), by client id.
        self.devices: dict[str, dict[int, Client]] = {}

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
        for session_id, kind, members in await trio.to_thread.run_sync(self.store.load_sessions):
            self._add(Session(session_id, kind, members))
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

    def login(self, cmd: Login) -> None:
        client = cmd.client
        client.user_id = cmd.user_id
        client.device_id = cmd.device_id
        self.devices.setdefault(cmd.user_id, {})[client.id] = client

    def logout(self, cmd: Logout) -> None:
        client = cmd.client
        devices = self.devices.get(client.user_id)
        if devices is not None:
            devices.pop(client.id, None)
            if not devices:
                del self.devices[client.user_id]

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

        def done(_: None) -> None:
            waiting, session.waiting = session.waiting or [], None
            for request in waiting:
                Router.resolve(request, session.info("unchanged"))

        def failed(answer: str) -> None:
            waiting, session.waiting = session.waiting or [], None
            for request in waiting:
                Router.resolve(request, answer)

        # Not stored: forget it, so nobody is told it exists.
        refused = self._write(lambda store: store.create_session(session.id, "direct", members,
                                                                 now_ms()),
                              done, failed, undo=lambda: self._remove(session))
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
        refused = self._write(
            lambda store: store.create_session(session.id, "mutable", info.members, now_ms()),
            lambda _: self._fanout(session.members, info, client, cmd.cdid),
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
        refused = self._write(lambda store: store.set_members(session.id, members),
                              lambda _: self._fanout(old | new, info, client, cmd.cdid),
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
        refused = self._write(lambda store: store.delete_session(session.id),
                              lambda _: self._fanout(members, info, client, cmd.cdid),
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
        text = bytes(message).decode()

        def done(seq: int | None) -> None:
            if seq is None:  # deleted (by another node) before the message was stored
                return self._fail(client, cmd.cdid, "no such session")
            event = StoredMessage(session_id=session_id, seq=seq, sender_id=sender_id,
                                  message=message, sender_timestamp=sent, server_timestamp=stored)
            self._fanout(members, event, client, cmd.cdid)

        refused = self._write(
            lambda store: store.append_message(session_id, sender_id, text, sent, stored),
            done, lambda answer: self._fail(client, cmd.cdid, answer))
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


def _call(callback: Callable[..., None], *args: Any) -> None:
    """Run one job's callback; a bug in one answer must not stop the others."""
    try:
        callback(*args)
    except Exception:
        log.exception("answering a store job failed")
