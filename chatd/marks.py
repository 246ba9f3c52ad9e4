"""GradAgenda delivery and read marks (issue 23; docs/protocols.md, "Marks").

A device reports, per session, up to which ``seq`` it has received
(``delivered``) and up to which the person has read (``read``). Marks
only move forward, never past the session's newest message, and reading
implies delivery (``chatd.store.marks.advance``, in the writer's
transaction: exact across nodes). The asker is answered once the mark is
stored.

Members learn the marks **coalesced**: a mark that moved is noted per
session and user (a later one replaces it) and every ``marks-flush-ms``
at most, one ``MarksInfo`` per session that has moved marks goes to every
local device of its members (the reporting user's other devices
included), through ``Sessions.deliver`` (encoded once per protocol),
and, in a cluster, one ``MarksMoved`` item on ``chatd:cluster`` so every
other node does the same for its devices. However many messages and
reports, a member's device gets at most one frame per session per flush.

A user who turns read marks off (``request-read-marks-setting``) is shown
to everyone without ``read-seq`` from then on (their devices still report
it, and it is kept, so turning it on again shows where they are).

Marks are read from the store, never from memory, when asked for
(``request-marks``) and in the session listing, so they are right after a
restart and on any node.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from chatd.broker.base import CLUSTER
from chatd.broker.wire import MarksMoved
from chatd.events import (
    Event, FlushMarks, ListMarks, Mark, MarkMessages, MarksInfo, ReadMarksSetting, SessionInfo,
)
from chatd.router import DEFERRED, Router, Service
from chatd.store import marks as stored
from chatd.store.marks import Shown

if TYPE_CHECKING:
    from chatd.sessions import Sessions

log = logging.getLogger("chatd.marks")

#: Bytes of marks in one ``providing-marks`` (the rest of a 4 KB frame is
#: left for its keys, the session id and a batch's cdid).
MARKS_BYTES = 2500


def chunks(session_id: str, marks: list[Shown]) -> list[MarksInfo]:
    """``marks`` as ``MarksInfo`` events of at most ``MARKS_BYTES`` of marks each."""
    events: list[MarksInfo] = []
    batch: list[Mark] = []
    size = 0
    for user, delivered, read in marks:
        cost = len(user) + 64  # its keys, two seqs and separators, generously
        if batch and size + cost > MARKS_BYTES:
            events.append(MarksInfo(session_id=session_id, marks=batch))
            batch, size = [], 0
        batch.append(Mark(user, delivered, read))
        size += cost
    if batch:
        events.append(MarksInfo(session_id=session_id, marks=batch))
    return events


class Marks(Service):
    """A router service beside ``Sessions`` (whose store writer, members,
    devices and delivery helpers it uses); ``flush_ms``: config
    ``marks-flush-ms``."""

    def __init__(self, sessions: Sessions, flush_ms: int = 250) -> None:
        self.sessions = sessions
        self.flush_ms = flush_ms
        #: session -> user -> the mark members have not been told yet.
        self.pending: dict[str, dict[str, Shown]] = {}
        self._due = trio.Event()
        self.router: Router | None = None
        sessions.marks = self

    def remote_items(self) -> dict[type, Any]:
        """Marks another node stored and flushed (``chatd.cluster``)."""
        return {MarksMoved: lambda _, item: self.remote(item)}

    def install(self, router: Router) -> None:
        self.router = router
        router.handle(MarkMessages, self.mark)
        router.handle(ReadMarksSetting, self.setting)
        router.handle(ListMarks, self.list_marks)
        router.handle(FlushMarks, self.flush)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ask the router to flush at most every ``flush_ms`` while marks move."""
        task_status.started()
        while True:
            await self._due.wait()
            await trio.sleep(self.flush_ms / 1000)
            self._due = trio.Event()
            try:
                await self.router.send(FlushMarks())
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return

    # --- handlers (router task) ----------------------------------------------------

    def mark(self, cmd: MarkMessages) -> None:
        sessions, client = self.sessions, cmd.client
        session = sessions.usable(client, cmd.session_id)
        if isinstance(session, str):
            return sessions.fail(client, cmd.cdid, session)
        session_id, user = session.id, client.user_id

        def done(result: tuple[Shown, Shown]) -> None:
            before, after = result
            sessions.succeed(client, cmd.cdid)
            if after != before:
                self.note(session_id, after)

        refused = sessions.write(
            lambda store: stored.advance(store, session_id, user, cmd.delivered, cmd.read),
            done, lambda answer: sessions.fail(client, cmd.cdid, answer))
        if refused:
            sessions.fail(client, cmd.cdid, refused)

    def setting(self, cmd: ReadMarksSetting) -> None:
        sessions, client = self.sessions, cmd.client
        user, enabled = client.user_id, cmd.enabled
        refused = sessions.write(lambda store: stored.set_read_marks(store, user, enabled),
                                  lambda _: sessions.succeed(client, cmd.cdid),
                                  lambda answer: sessions.fail(client, cmd.cdid, answer))
        if refused:
            sessions.fail(client, cmd.cdid, refused)

    def list_marks(self, cmd: ListMarks) -> str | object:
        session = self.sessions.usable(cmd.client, cmd.session_id)
        if isinstance(session, str):
            return session
        session_id = session.id

        def done(found: dict[str, list[Shown]]) -> None:
            Router.resolve(cmd, self._members_only(session_id, found.get(session_id, [])))

        refused = self.sessions.write(lambda store: stored.shown(store, [session_id]), done,
                                       lambda answer: Router.resolve(cmd, answer))
        return refused or DEFERRED

    def listing(self, infos: list[SessionInfo], store: Any) -> list[Event]:
        """The session listing (``Sessions.list_sessions``, inside its store
        job): each session followed by its marks."""
        found = stored.shown(store, [info.session_id for info in infos])
        events: list[Event] = []
        for info in infos:
            events.append(info)
            marks = found.get(info.session_id)
            if marks:
                members = set(info.members)
                events += chunks(info.session_id, [m for m in marks if m[0] in members])
        return events

    def flush(self, _: FlushMarks | None = None) -> None:
        pending, self.pending = self.pending, {}
        shared = self.sessions.broker.shared
        for session_id, moved in pending.items():
            marks = sorted(moved.values())
            if shared:
                self.sessions.broker.publish(CLUSTER, MarksMoved(
                    session_id=session_id, marks=[list(mark) for mark in marks]))
            self._tell(session_id, marks)

    def remote(self, item: MarksMoved) -> None:
        """Marks another node stored and flushed: told to this node's devices."""
        self._tell(item.session_id, [(user, delivered, read)
                                     for user, delivered, read in item.marks])

    # --- helpers ---------------------------------------------------------------------

    def note(self, session_id: str, mark: Shown) -> None:
        """A mark moved: members are told at the next flush."""
        self.pending.setdefault(session_id, {})[mark[0]] = mark
        self._due.set()

    def _tell(self, session_id: str, marks: list[Shown]) -> None:
        session = self.sessions.sessions.get(session_id)
        if session is None:
            return
        for event in self._members_only(session_id, marks):
            self.sessions.deliver(session.members, event)

    def _members_only(self, session_id: str, marks: list[Shown]) -> list[MarksInfo]:
        session = self.sessions.sessions.get(session_id)
        members = session.members if session is not None else frozenset()
        return chunks(session_id, [mark for mark in marks if mark[0] in members])

