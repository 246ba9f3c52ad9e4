"""The durable store: one SQLite file (WAL), created and migrated here.

The schema carries a version number (``PRAGMA user_version``); each entry
of ``MIGRATIONS`` moves it one step, so an old file is brought up to date
on start-up. Queries are synchronous; at run time only the ``Writer``
task uses the connection, from a worker thread, so the router never waits
for the disk. The writer group-commits: whatever was queued while the
previous transaction was being committed goes into the next one, so a
burst of messages pays one fsync per batch, not one per message.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger("chatd.store")

MIGRATIONS: list[str] = [
    # 1: server settings, e.g. the secrets generated for the embedded default.
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: GradAgenda sessions, their members and their messages.
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('direct', 'mutable')),
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE members (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        user_id TEXT NOT NULL,
        PRIMARY KEY (session_id, user_id)
    ) WITHOUT ROWID;
    CREATE TABLE messages (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        sender_id TEXT NOT NULL,
        message TEXT NOT NULL,
        sender_timestamp INTEGER NOT NULL,
        server_timestamp INTEGER NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;
    """,
]

#: Columns of a stored message, in the order ``history`` returns them.
MESSAGE_COLUMNS = "seq, sender_id, message, sender_timestamp, server_timestamp"


class Store:
    def __init__(self, path: str) -> None:
        self.path = path
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.migrate()

    def migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(f"{self.path}: schema version {version} is newer than this chatd")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                _run_script(self.db, script)
                self.db.execute(f"PRAGMA user_version={number}")
            log.info("store %s migrated to schema version %d", self.path, number)

    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def setting(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def secret(self, key: str) -> tuple[str, bool]:
        """The stored secret ``key``, generated on first use; (value, new)."""
        value = self.setting(key)
        if value is not None:
            return value, False
        value = secrets.token_urlsafe(24)
        self.db.execute("INSERT OR IGNORE INTO settings(key, value) VALUES (?, ?)", (key, value))
        return self.setting(key), True

    # --- GradAgenda sessions: run by the Writer, inside its transaction -----

    def create_session(self, session_id: str, kind: str, members: list[str],
                       created_ms: int) -> None:
        self.db.execute("INSERT INTO sessions(id, kind, created_ms) VALUES (?, ?, ?)",
                        (session_id, kind, created_ms))
        self._insert_members(session_id, members)

    def set_members(self, session_id: str, members: list[str]) -> None:
        self.db.execute("DELETE FROM members WHERE session_id=?", (session_id,))
        self._insert_members(session_id, members)

    def _insert_members(self, session_id: str, members: list[str]) -> None:
        self.db.executemany("INSERT INTO members(session_id, user_id) VALUES (?, ?)",
                            [(session_id, user) for user in members])

    def delete_session(self, session_id: str) -> None:
        self.db.execute("DELETE FROM sessions WHERE id=?", (session_id,))

    def append_message(self, session_id: str, seq: int, sender_id: str, message: str,
                       sender_timestamp: int, server_timestamp: int) -> None:
        self.db.execute(f"INSERT INTO messages(session_id, {MESSAGE_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (session_id, seq, sender_id, message, sender_timestamp, server_timestamp))

    def history(self, session_id: str, *, before: int | None = None, after: int | None = None,
                limit: int = 100) -> list[tuple]:
        """Up to ``limit`` messages, oldest first: the first ones after
        ``after`` if given, else the last ones (before ``before`` if given)."""
        where, args = "session_id=?", [session_id]
        if before is not None:
            where += " AND seq<?"
            args.append(before)
        if after is not None:
            where += " AND seq>?"
            args.append(after)
            return self.db.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE {where} "
                                   "ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
        rows = self.db.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE {where} "
                               "ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        rows.reverse()
        return rows

    def load_sessions(self) -> list[tuple[str, str, list[str], int]]:
        """Every session, oldest first: (id, kind, members, last seq)."""
        members: dict[str, list[str]] = {}
        for session_id, user in self.db.execute("SELECT session_id, user_id FROM members"):
            members.setdefault(session_id, []).append(user)
        rows = self.db.execute(
            "SELECT id, kind, (SELECT MAX(seq) FROM messages WHERE session_id=sessions.id) "
            "FROM sessions ORDER BY rowid").fetchall()
        return [(sid, kind, members.get(sid, []), last or 0) for sid, kind, last in rows]

    def run_batch(self, jobs: list[Callable[[Store], Any]]) -> list[Any]:
        """Run ``jobs`` in one transaction; their results once it has committed."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            results = [job(self) for job in jobs]
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        return results

    def close(self) -> None:
        self.db.close()


@dataclass(slots=True)
class Job:
    """One unit of store work: ``run`` in the writer's thread, inside the
    batch's transaction; then ``done(result)`` or ``failed()`` once the
    commit has succeeded or failed (the service decides where they run)."""

    run: Callable[[Store], Any]
    done: Callable[[Any], None]
    failed: Callable[[], None]


Report = Callable[[list[Job], list[Any] | None], Awaitable[None]]


class Writer:
    """Group commit: one task takes every queued job, commits them in one
    transaction in a worker thread, then reports them all at once.

    ``report(jobs, results)`` gets ``results=None`` when the batch failed.
    After a failure the writer refuses all further work (fail-stop): what
    was confirmed is on disk, and nothing else will be confirmed until a
    restart reloads the committed state.
    """

    def __init__(self, store: Store, report: Report, max_pending: int = 10_000) -> None:
        self.store = store
        self.report = report
        self.max_pending = max_pending
        self.failed = False
        self.closed = False
        #: Transactions committed and the jobs in them (logged at shutdown).
        self.commits = 0
        self.committed_jobs = 0
        self._queue: list[Job] = []
        self._wakeup = trio.Event()
        self._lock = trio.Lock()

    @property
    def accepting(self) -> bool:
        return not (self.failed or self.closed) and len(self._queue) < self.max_pending

    def submit(self, job: Job) -> bool:
        """Queue a job without waiting; False if the writer cannot take it."""
        if not self.accepting:
            return False
        self._queue.append(job)
        self._wakeup.set()
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wakeup.wait()
            await self.flush()

    async def flush(self) -> None:
        """Commit everything queued so far (and wait for a commit under way)."""
        async with self._lock:
            self._wakeup = trio.Event()
            jobs, self._queue = self._queue, []
            if not jobs:
                return
            results: list[Any] | None = None
            if not self.failed:
                try:
                    # Not abandoned on cancel: a started commit always finishes.
                    results = await trio.to_thread.run_sync(
                        self.store.run_batch, [job.run for job in jobs])
                    self.commits += 1
                    self.committed_jobs += len(jobs)
                except Exception:
                    log.exception("store %s: commit of %d jobs failed; refusing further writes "
                                  "until restart", self.store.path, len(jobs))
                    self.failed = True
            await self.report(jobs, results)

    async def aclose(self) -> None:
        """Refuse new work and commit everything already queued."""
        self.closed = True
        await self.flush()
        log.info("store writer: %d jobs in %d transactions", self.committed_jobs, self.commits)


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the open transaction first; run the
    # statements one by one so a migration and its version bump are atomic.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)
