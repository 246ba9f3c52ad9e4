"""The SQLite backend: one file in WAL mode (or ``:memory:``).

The schema carries a version number (``PRAGMA user_version``); each entry
of ``MIGRATIONS`` moves it one step, inside the same write transaction
that reads the version, so an old file is brought up to date on start-up
and two processes starting at once cannot both migrate.

One store, one server: a server holds an exclusive ``flock`` on
``PATH.lock`` beside the file (with its PID in it) for as long as it runs,
so a second chatd on the same file refuses to start and names the first.
The kernel drops the lock when the process ends, ``kill -9`` included; a
stale ``.lock`` file is harmless. Tools that only read (``chatd token``)
open the file without the lock.

A batch takes the write lock before its first statement (``BEGIN
IMMEDIATE``), so it either gets it or fails before running anything;
SQLite waits up to ``BUSY_WAIT_MS`` for another process's lock, the writer
retries after that. ``SQLITE_BUSY`` and ``SQLITE_LOCKED`` are transient;
every other error is persistent (docs/storage.md).

Messages are the hot path, and each statement the writer's thread runs
releases and takes back the GIL, which it must win from the event loop. So
a batch of messages is one statement: a session's next ``seq`` is read
once (``MAX(seq) + 1`` in the write transaction, with a check that the
session exists), then counted, and kept from batch to batch while this
server holds the one-server lock (nobody else writes the file; a failed
batch or a deletion forgets it); the rows wait and are inserted together
in a multi-row ``INSERT``. A batch with nothing else in it is that one
``INSERT``, a transaction of its own (autocommit, ``synchronous=FULL``
like any COMMIT); otherwise the rows are inserted before the batch's next
statement of another kind and before COMMIT.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from chatd.store.base import MESSAGE_COLUMNS, Store, StoredSession, StoreError

log = logging.getLogger("chatd.store")

#: Schema migrations, in this backend's SQL dialect; the other backend's
#: list says the same in its own (tests/test_store_schema.py keeps the
#: two from drifting).
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
    # 3: when each member joined, and how many times the members changed
    # (the same schema as PostgreSQL's: chatd.store.base.StoredSession).
    """
    ALTER TABLE sessions ADD COLUMN members_version INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE members ADD COLUMN since_seq INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: who created each group, for max-groups-per-user (issue 19): a group
    # its creator has left still counts against them (NULL: made before).
    """
    ALTER TABLE sessions ADD COLUMN created_by TEXT;
    CREATE INDEX sessions_created_by ON sessions(created_by);
    """,
    # 5: GradAgenda beyond 2014 (issue 23; docs/protocols.md): each group
    # member's role (the creator owns; groups from before roles: every
    # member who is left owns, as every member could change them then),
    # delivery and read marks, who turned read marks off, and media.
    """
    ALTER TABLE members ADD COLUMN role TEXT NOT NULL DEFAULT 'member';
    UPDATE members SET role = 'owner' WHERE EXISTS (SELECT 1 FROM sessions
        WHERE sessions.id = members.session_id AND sessions.created_by = members.user_id);
    UPDATE members SET role = 'owner' WHERE session_id IN (SELECT id FROM sessions
        WHERE kind = 'mutable') AND session_id NOT IN (SELECT session_id FROM members
        WHERE role = 'owner');
    CREATE TABLE marks (
        session_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        delivered_seq INTEGER NOT NULL DEFAULT 0,
        read_seq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (session_id, user_id)
    );
    CREATE TABLE mark_settings (user_id TEXT PRIMARY KEY, read_marks_off INTEGER NOT NULL);
    CREATE TABLE media (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        content_type TEXT NOT NULL,
        size INTEGER NOT NULL,
        data BLOB NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE INDEX media_owner ON media(owner);
    CREATE TABLE media_uses (
        media_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (media_id, session_id, seq)
    );
    CREATE INDEX media_uses_session ON media_uses(session_id);
    """,
]

#: Milliseconds SQLite itself waits for another connection's lock before
#: a statement fails with SQLITE_BUSY (then the writer retries).
BUSY_WAIT_MS = 100
_TRANSIENT = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
#: What an error code means to the operator (sqlite.org/rescode.html).
_REASONS = {
    sqlite3.SQLITE_NOTADB: "not a SQLite database",
    sqlite3.SQLITE_CORRUPT: "the database file is corrupt",
    sqlite3.SQLITE_CANTOPEN: "cannot open the file",
    sqlite3.SQLITE_READONLY: "the database is read-only",
    sqlite3.SQLITE_PERM: "permission denied",
    sqlite3.SQLITE_FULL: "the disk is full",
    sqlite3.SQLITE_BUSY: "locked by another process",
    sqlite3.SQLITE_LOCKED: "locked by another process",
}

#: The session's next seq; no row if the session does not exist.
_NEXT_SEQ = ("SELECT (SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE session_id=?) "
             "FROM sessions WHERE id=?")
#: Most rows in one INSERT (6 parameters each: well under SQLite's 999,
#: and as many statements as the connection's cache of prepared ones keeps).
_ROWS_PER_INSERT = 64


@functools.cache
def _insert_messages(rows: int) -> str:
    """An INSERT of ``rows`` messages."""
    values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * rows)
    return f"INSERT INTO messages(session_id, {MESSAGE_COLUMNS}) VALUES {values}"


class SQLiteStore(Store):
    """A SQLite file (``path``) or ``:memory:``.

    ``lock``: take the one-server lock, then create or migrate the schema
    (a server). Without it nothing is locked (tests and tools that open a
    store beside a server). ``migrate=False`` opens an existing file as it is,
    for tools that only read a running server's store.

    Raises ``StoreError`` (one line) if the file cannot be used: missing
    directory, a directory, not SQLite, permission denied, locked by
    another chatd, schema newer than this chatd.
    """

    def __init__(self, path: str, *, busy_timeout: float = 5.0, lock: bool = True,
                 migrate: bool = True) -> None:
        self.path = self.name = path
        self.busy_timeout = busy_timeout
        self._lock_fd: int | None = None
        #: Held by a batch, and by close(): closing waits for the batch (the
        #: writer's thread may be running one), never pulls the file from under it.
        self._in_use = threading.Lock()
        #: Each session's next seq, once known (kept between batches only
        #: while this server is the store's only writer); and in a batch,
        #: the messages not inserted yet.
        self._next_seq: dict[str, int] = {}
        self._messages: list[tuple[str, int, str, str, int, int]] = []
        if path != ":memory:":
            check_sqlite_path(path, create=migrate)
        try:
            if lock:
                self.lock()
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                      timeout=BUSY_WAIT_MS / 1000)
        except sqlite3.Error as exc:
            self._unlock()
            raise self.error(exc) from None
        try:
            self._retry_busy(self._configure)
            if migrate:
                self._retry_busy(self.migrate)
        except BaseException:
            self.close()
            raise

    def _configure(self) -> None:
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise self.error(exc) from None

    def error(self, exc: BaseException) -> StoreError:
        """``exc`` as the one line an operator reads."""
        code = getattr(exc, "sqlite_errorcode", None)
        reason = _REASONS.get(code & 0xFF if code is not None else None)
        if reason is None or code == sqlite3.SQLITE_CANTOPEN:
            reason = f"{reason}: {exc}" if reason else str(exc)
        return StoreError(f"store {self.path}: {reason}")

    def _retry_busy(self, step: Callable[[], None]) -> None:
        """Run a start-up ``step``, retrying while the file is locked by
        another process, for up to ``busy_timeout`` seconds."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                return step()
            except StoreError as exc:
                cause = exc.__context__
                if not (self.is_transient(cause) and time.monotonic() < deadline):
                    raise
            time.sleep(0.05)  # another process holds the write lock

    def lock(self) -> None:
        if self._lock_fd is not None or self.path == ":memory:":
            return
        lock_path = self.path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"store {self.path}: cannot open its lock file {lock_path}: "
                             f"{exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(f"store {self.path}: in use by another chatd (pid {holder}); "
                             "one store serves one server") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def migrate(self) -> None:
        while True:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    version = self.db.execute("PRAGMA user_version").fetchone()[0]
                    if version > len(MIGRATIONS):
                        raise _newer(self.path, version)
                    if version < len(MIGRATIONS):
                        _run_script(self.db, MIGRATIONS[version])
                        self.db.execute(f"PRAGMA user_version={version + 1}")
                    self.db.execute("COMMIT")
                finally:
                    if self.db.in_transaction:
                        self.db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise self.error(exc) from exc
            if version == len(MIGRATIONS):
                return
            log.info("store %s migrated to schema version %d", self.path, version + 1)

    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def setting(self, key: str) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise self.error(exc) from exc
        return row[0] if row else None

    def secret(self, key: str) -> tuple[str, bool]:
        value = self.setting(key)
        if value is not None:
            return value, False

        def insert() -> None:
            try:
                self.db.execute("INSERT OR IGNORE INTO settings(key, value) VALUES (?, ?)",
                                (key, secrets.token_urlsafe(24)))
            except sqlite3.Error as exc:
                raise self.error(exc) from exc

        self._retry_busy(insert)
        return self.setting(key), True

    def load_sessions(self) -> list[StoredSession]:
        try:
            members: dict[str, dict[str, int]] = {}
            for session_id, user, since in self.db.execute(
                    "SELECT session_id, user_id, since_seq FROM members"):
                members.setdefault(session_id, {})[user] = since
            rows = self.db.execute(
                "SELECT id, kind, members_version FROM sessions ORDER BY rowid").fetchall()
        except sqlite3.Error as exc:
            raise self.error(exc) from exc
        return [StoredSession(sid, kind, members.get(sid, {}), version)
                for sid, kind, version in rows]

    # --- inside run_batch ------------------------------------------------------

    def create_session(self, session_id: str, kind: str, members: list[str],
                       created_ms: int) -> None:
        self._transaction()
        self.db.execute("INSERT INTO sessions(id, kind, created_ms) VALUES (?, ?, ?) "
                        "ON CONFLICT(id) DO NOTHING", (session_id, kind, created_ms))
        self._insert_members(session_id, members)

    def set_members(self, session_id: str, members: list[str]) -> tuple[int, int] | None:
        self._transaction()  # the write lock: no append can come between
        self.db.execute("UPDATE sessions SET members_version = members_version + 1 WHERE id=?",
                        (session_id,))
        row = self.db.execute("SELECT members_version FROM sessions WHERE id=?",
                              (session_id,)).fetchone()
        if row is None:
            return None  # deleted by a command before this one
        seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE session_id=?",
                              (session_id,)).fetchone()[0]
        old = {user for (user,) in self.db.execute(
            "SELECT user_id FROM members WHERE session_id=?", (session_id,))}
        self.db.executemany("DELETE FROM members WHERE session_id=? AND user_id=?",
                            [(session_id, user) for user in old.difference(members)])
        self._insert_members(session_id, [user for user in members if user not in old], seq)
        return seq, row[0]

    def _insert_members(self, session_id: str, members: list[str], since: int = 0) -> None:
        # Only while the session exists: a job may run after a deletion
        # that another command made.
        self.db.executemany("INSERT INTO members(session_id, user_id, since_seq) "
                            "SELECT id, ?, ? FROM sessions WHERE id=? ON CONFLICT DO NOTHING",
                            [(user, since, session_id) for user in members])

    def delete_session(self, session_id: str) -> None:
        self._transaction()
        self._next_seq.pop(session_id, None)  # made again, it starts from 1
        self.db.execute("DELETE FROM sessions WHERE id=?", (session_id,))

    def append_message(self, session_id: str, sender_id: str, message: str,
                       sender_timestamp: int, server_timestamp: int) -> int | None:
        # A known next seq is right: this server alone writes the file (or
        # this batch holds the write lock), and only delete_session, which
        # forgets it, removes a session.
        seq = self._next_seq.get(session_id)
        if seq is None:
            self._transaction()
            row = self.db.execute(_NEXT_SEQ, (session_id, session_id)).fetchone()
            if row is None:
                return None  # the session is gone
            seq = row[0]
        self._next_seq[session_id] = seq + 1
        self._messages.append((session_id, seq, sender_id, message, sender_timestamp,
                               server_timestamp))
        return seq

    def _transaction(self) -> None:
        """Before any statement but a batch's lone INSERT of its messages:
        take the write lock (BEGIN IMMEDIATE), insert the messages waiting."""
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
        self._insert_pending()

    def _insert_pending(self) -> None:
        """Insert the messages waiting, up to ``_ROWS_PER_INSERT`` per INSERT."""
        pending, self._messages = self._messages, []
        for start in range(0, len(pending), _ROWS_PER_INSERT):
            rows = pending[start:start + _ROWS_PER_INSERT]
            self.db.execute(_insert_messages(len(rows)), [value for row in rows for value in row])

    mark = "?"

    def _execute(self, query: str, args: Sequence[Any]) -> sqlite3.Cursor:
        self._transaction()
        return self.db.execute(query, args)

    def run_batch(self, jobs: list[Callable[[Store], Any]], deadline: float | None = None
                  ) -> list[Any]:
        with self._in_use:
            try:
                results = [job(self) for job in jobs]
                if self.db.in_transaction or not 0 < len(self._messages) <= _ROWS_PER_INSERT:
                    self._transaction()
                    self.db.execute("COMMIT")
                else:
                    self._insert_pending()  # messages alone: one INSERT, its own transaction
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                self._next_seq.clear()  # counted for rows that were not stored
                raise
            finally:
                self._messages.clear()
                if not self._only_writer:
                    self._next_seq.clear()
        return results

    @property
    def _only_writer(self) -> bool:
        """Whether nobody else can write the store: it holds the one-server
        lock, or lives in this connection's memory."""
        return self._lock_fd is not None or self.path == ":memory:"

    def is_transient(self, exc: BaseException | None) -> bool:
        code = getattr(exc, "sqlite_errorcode", None)
        return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in _TRANSIENT

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            with self._in_use:
                db.close()
        self._unlock()


def _newer(path: str, version: int) -> StoreError:
    return StoreError(f"store {path}: schema version {version} is newer "
                      f"than this chatd's ({len(MIGRATIONS)}): upgrade chatd")


#: The first 16 bytes of every SQLite 3 database file, and where its header
#: keeps ``PRAGMA user_version`` (https://sqlite.org/fileformat.html, 1.3).
_MAGIC = b"SQLite format 3\x00"
_USER_VERSION = slice(60, 64)


def probe_sqlite_file(path: str) -> None:
    """Refuse, without opening it with SQLite (nothing is written, no lock
    taken), an existing file that a server could not use: one that is not
    a SQLite database, or whose schema is newer than this chatd's, read
    from the file's header. An empty or missing file is fine (created)."""
    try:
        with open(path, "rb") as file:
            header = file.read(100)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"store {path}: {exc.strerror or exc}") from None
    if not header:
        return
    if len(header) < 100 or not header.startswith(_MAGIC):
        raise StoreError(f"store {path}: {_REASONS[sqlite3.SQLITE_NOTADB]}")
    version = int.from_bytes(header[_USER_VERSION], "big", signed=True)
    if version > len(MIGRATIONS):
        raise _newer(path, version)


def check_sqlite_path(path: str, *, create: bool) -> None:
    """Refuse at once, in words, what SQLite would call 'unable to open'."""
    if os.path.isdir(path):
        raise StoreError(f"store {path}: is a directory, not a SQLite file")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise StoreError(f"store {path}: directory {directory} {what}")
    if not os.path.exists(path):
        if not create:
            raise StoreError(f"store {path}: no such file")
    elif not os.access(path, os.R_OK | (os.W_OK if create else 0)):
        raise StoreError(f"store {path}: permission denied (chatd must "
                         f"{'read and write' if create else 'read'} it)")
    if create and not os.access(directory, os.W_OK | os.X_OK):
        # SQLite creates the file, and its -wal and -shm files, beside it.
        raise StoreError(f"store {path}: permission denied on directory {directory} "
                         "(chatd must create files in it)")


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the open transaction first; run the
    # statements one by one so a migration and its version bump are atomic.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)
