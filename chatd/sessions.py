"""GradAgenda sessions: accounts on several devices, direct and group chats.

A router service (see ``chatd.router``): it knows which devices of which
user are connected, the sessions and their members, and who may do what.
Everything durable goes through the store's ``Writer``: the handler
updates the in-memory state at once (so later commands see it, in router
order), queues the store job, and only when the writer reports the commit
does it answer — the asker's copy carrying its ``cdid`` — and fan out to
every device of every member. A message is therefore never confirmed to
anyone before it is on disk. The writer reports back through the router's
own channel (``StoreDone``), so all state and fan-out stay in the router
task, which never waits for the disk.

Authorisation: a group ("mutable") session is created with its creator as
a member; only members may modify, delete, send into or read it. A direct
session belongs to its two users, has an id derived from the sorted pair,
and exists (durably) from the first time either of them asks for it; only
then can messages be sent into it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from chatd.events import (
    Command, CreateSession, DeleteSession, DirectSessionInfo, Event, ListSessions, Login, Logout,
    ModifySession, ReadHistory, SendMessage, SessionInfo, Status, StoredMessage,
)
from chatd.router import DEFERRED, Router
from chatd.store import Job, Store, Writer
from chatd.transport import text_frame

if TYPE_CHECKING:
    from chatd.client import Client

log = logging.getLogger("chatd.sessions")

STORE_FAILED = "storage unavailable: nothing was stored"
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
    __slots__ = ("id", "kind", "members", "last_seq", "waiting")

    def __init__(self, session_id: str, kind: str, members: Iterable[str], last_seq: int = 0) -> None:
        self.id = session_id
        self.kind = kind
        #: Replaced, never mutated: a queued message keeps the members it was sent to.
        self.members = frozenset(members)
        self.last_seq = last_seq
        #: Requests for a direct session whose creation is not committed yet.
        self.waiting: list[DirectSessionInfo] | None = None

    def info(self, status: str) -> SessionInfo:
        return SessionInfo(session_id=self.id, kind=self.kind, status=status,
                           members=sorted(self.members))


class StoreDone(Command, kw_only=True):
    """The writer's report of one batch; ``results`` is None if it failed."""

    jobs: list[Job]
    results: list[Any] | None


class Sessions:
    def __init__(self, store: Store, max_pending: int = 10_000) -> None:
        self.store = store
        self.writer = Writer(store, self._report, max_pending=max_pending)
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
        """Load the stored sessions, then run the writer."""
        for session_id, kind, members, last_seq in await trio.to_thread.run_sync(
                self.store.load_sessions):
            self._add(Session(session_id, kind, members, last_seq))
        log.info("loaded %d sessions from %s", len(self.sessions), self.store.path)
        await self.writer.run(task_status=task_status)

    async def aclose(self) -> None:
        await self.writer.aclose()

    async def ready(self) -> str | None:
        """Why the store cannot take writes now (for /readyz), or None."""
        if self.writer.failed:
            return "store failed: writes are refused until restart (see the log)"
        return None

    async def _report(self, jobs: list[Job], results: list[Any] | None) -> None:
        try:
            await self.router.send(StoreDone(jobs=jobs, results=results))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # shutting down: every client has gone already

    def store_done(self, cmd: StoreDone) -> None:
        for index, job in enumerate(cmd.jobs):
            try:
                if cmd.results is None:
                    job.failed()
                else:
                    job.done(cmd.results[index])
            except Exception:
                log.exception("answering a store job failed")

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

        def done(_: None) -> None:
            waiting, session.waiting = session.waiting or [], None
            for request in waiting:
                Router.resolve(request, session.info("unchanged"))

        def failed() -> None:
            # Not on disk: forget it, so nobody is told it exists.
            waiting, session.waiting = session.waiting or [], None
            self._remove(session)
            for request in waiting:
                Router.resolve(request, STORE_FAILED)

        refused = self._write(lambda store: store.create_session(session.id, "direct", members,
                                                                 now_ms()), done, failed)
        if refused:
            return refused
        session.waiting = [cmd]
        self._add(session)
        return DEFERRED

    def create(self, cmd: CreateSession) -> None:
        client, me = cmd.client, cmd.client.user_id
        session = Session(new_session_id(), "mutable", {*cmd.members, me})
        info = session.info("created")
        refused = self._write(
            lambda store: store.create_session(session.id, "mutable", info.members, now_ms()),
            lambda _: self._fanout(session.members, info, client, cmd.cdid),
            lambda: self._fail(client, cmd.cdid, STORE_FAILED))
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
        members = sorted(new)
        info = SessionInfo(session_id=session.id, kind="mutable", status="modified", members=members)
        refused = self._write(lambda store: store.set_members(session.id, members),
                              lambda _: self._fanout(old | new, info, client, cmd.cdid),
                              lambda: self._fail(client, cmd.cdid, STORE_FAILED))
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
                              lambda: self._fail(client, cmd.cdid, STORE_FAILED))
        if refused:
            return self._fail(client, cmd.cdid, refused)
        self._remove(session)

    def list_sessions(self, cmd: ListSessions) -> str | object:
        """The asker's group sessions as they are now, answered once every
        change before this request is stored (a no-op job as a barrier)."""
        mine = self.joined.get(cmd.client.user_id, {}).values()
        listing = [session.info("unchanged") for session in mine if session.kind == "mutable"]
        refused = self._write(lambda store: None, lambda _: Router.resolve(cmd, listing),
                              lambda: Router.resolve(cmd, STORE_FAILED))
        return refused or DEFERRED

    # --- messages --------------------------------------------------------------

    def send_message(self, cmd: SendMessage) -> None:
        client = cmd.client
        session = self._usable(client, cmd.session_id)
        if isinstance(session, str):
            return self._fail(client, cmd.cdid, session)
        if not self.writer.accepting:
            return self._fail(client, cmd.cdid, STORE_FAILED if self.writer.failed else STORE_BUSY)
        session.last_seq += 1
        event = StoredMessage(session_id=session.id, seq=session.last_seq,
                              sender_id=client.user_id, message=cmd.message,
                              sender_timestamp=cmd.sender_timestamp, server_timestamp=now_ms())
        members = session.members  # as sent: a later membership change does not apply
        text = bytes(cmd.message).decode()
        self.writer.submit(Job(
            lambda store: store.append_message(event.session_id, event.seq, event.sender_id, text,
                                               event.sender_timestamp, event.server_timestamp),
            lambda _: self._fanout(members, event, client, cmd.cdid),
            lambda: self._fail(client, cmd.cdid, STORE_FAILED)))

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
            done, lambda: Router.resolve(cmd, STORE_FAILED))
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

    def _write(self, run, done, failed) -> str | None:
        """Queue a store job; the refusal text if the writer cannot take it."""
        if self.writer.submit(Job(run, done, failed)):
            return None
        return STORE_FAILED if self.writer.failed else STORE_BUSY

    def _add(self, session: Session) -> None:
        self.sessions[session.id] = session
        for user in session.members:
            self.joined.setdefault(user, {})[session.id] = session

    def _remove(self, session: Session) -> None:
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
        if data is not None:
            client.deliver(text_frame(data))

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
        if data is not None:
            asker.deliver(text_frame(data))
