"""The PostgreSQL backend: one database that several chatd nodes share.

psycopg 3 has no trio support (its issue #29), so this uses its
synchronous driver from worker threads, as the SQLite backend does: one
connection, used by one thread at a time (the writer's, or start-up),
opened again after it is lost.

- **Migrations** are versioned (table ``chatd_schema``) and run in one
  transaction under an advisory lock, so nodes starting at once migrate
  once; a database newer than this chatd is refused.
- **seq**: each session row keeps ``last_seq``; an append increments it
  and inserts the message in the same statement, inside the batch's
  transaction. The row lock that the UPDATE takes is held until COMMIT,
  so nodes appending to one session at once queue on it: ``seq`` is
  gap-free and never duplicated, and a rolled-back batch leaves no gap.
- **Transient** failures (docs/storage.md): the connection lost before
  COMMIT or impossible to open (server restarting, unreachable), SQLSTATE
  class 08 (connection), 40001 (serialization), 40P01 (deadlock), 55P03
  (``lock_timeout``, set to the busy timeout), 57P01/57P02/57P03 (admin
  shutdown, crash shutdown, starting up), 53300 (too many connections).
  Everything else is persistent — disk full, read-only, a constraint — as
  is a COMMIT whose outcome is unknown because the connection dropped
  while it was under way (``CommitUnknown``: never run twice).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from chatd.store.base import MESSAGE_COLUMNS, CommitUnknown, Store, StoredSession, StoreError

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
        created_ms BIGINT NOT NULL,
        last_seq BIGINT NOT NULL DEFAULT 0,
        position BIGINT GENERATED ALWAYS AS IDENTITY
    );
    CREATE TABLE members (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        user_id TEXT NOT NULL,
        PRIMARY KEY (session_id, user_id)
    );
    CREATE TABLE messages (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        seq BIGINT NOT NULL,
        sender_id TEXT NOT NULL,
        message TEXT NOT NULL,
        sender_timestamp BIGINT NOT NULL,
        server_timestamp BIGINT NOT NULL,
        PRIMARY KEY (session_id, seq)
    );
    """,
    # 3: when each member joined, and how many times the members changed:
    # a node tells from ``members_version`` whether the members it sent a
    # message to are still the members (chatd.store.base.StoredSession).
    """
    ALTER TABLE sessions ADD COLUMN members_version BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE members ADD COLUMN since_seq BIGINT NOT NULL DEFAULT 0;
    """,
    # 4: who created each group, for max-groups-per-user (issue 19): a group
    # its creator has left still counts against them (NULL: made before).
    """
    ALTER TABLE sessions ADD COLUMN created_by TEXT;
    CREATE INDEX sessions_created_by ON sessions(created_by);
    """,
]

#: SQLSTATEs after which running the batch again is safe and may pass
#: (postgresql.org/docs/current/errcodes-appendix.html).
_TRANSIENT_STATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "53300"}
#: Key of the advisory lock held while migrating.
_MIGRATION_LOCK = 0x63686174  # "chat"

# The UPDATE takes the session's row lock, which set_members takes too: a
# message and a membership change of one session are stored one after the
# other, and the version returned is the one the message was stored under.
_APPEND = (f"WITH s AS (UPDATE sessions SET last_seq = last_seq + 1 WHERE id = %s "
           f"RETURNING id, last_seq, members_version) "
           f"INSERT INTO messages (session_id, {MESSAGE_COLUMNS}) "
           f"SELECT id, last_seq, %s, %s, %s, %s FROM s "
           f"RETURNING seq, (SELECT members_version FROM s)")
_INSERT_MEMBERS = ("INSERT INTO members (session_id, user_id, since_seq) "
                   "SELECT id, u, %s FROM sessions, unnest(%s::text[]) AS u WHERE id = %s "
                   "ON CONFLICT DO NOTHING")


def display_name(url: str) -> str:
    """``url`` without its password: ``postgresql://USER@HOST:PORT/DB``."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return url.split("://", 1)[0] + "://(not a valid URL)"
    user = info.get("user", "")
    host = info.get("host", "")
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{'@' if user else ''}{host}{port}/{info.get('dbname', '')}"


class PostgresStore(Store):
    """A PostgreSQL database named by a ``postgresql://`` (or
    ``postgres://``) URL. ``migrate=False`` uses the schema as it is (tools).

    Raises ``StoreError`` (one line, password left out) if the server is
    unreachable, refuses the login, the database does not exist, or its
    schema is newer than this chatd."""

    def __init__(self, url: str, *, busy_timeout: float = 5.0, lock: bool = True,
                 migrate: bool = True) -> None:
        self.url = url
        self.name = display_name(url)
        self.busy_timeout = busy_timeout
        try:
            conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"store {self.name}: {_one_line(exc)}") from None
        self._conn: psycopg.Connection | None = None
        self._cur: psycopg.Cursor | None = None
        try:
            self._conn = self._connect()
        except psycopg.Error as exc:
            raise StoreError(f"store {self.name}: cannot connect: {_one_line(exc)}") from None
        if migrate:
            try:
                self.migrate()
            except BaseException:
                self.close()
                raise

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.url, autocommit=False, application_name="chatd",
                               connect_timeout=max(2, math.ceil(self.busy_timeout)),
                               # Notice a peer that vanished without a word.
                               keepalives=1, keepalives_idle=10, keepalives_interval=5,
                               keepalives_count=3)
        # A row lock held elsewhere (another node, an operator) fails the
        # batch as transient instead of stalling the writer for good.
        conn.execute(f"SET lock_timeout = {max(1, int(self.busy_timeout * 1000))}")
        conn.commit()
        return conn

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = None
            self._conn = self._connect()
        return self._conn

    def lock(self) -> None:
        """Nothing to do: every node of a cluster shares the database."""

    def migrate(self) -> None:
        try:
            conn = self._connection()
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS chatd_schema (version INTEGER NOT NULL)")
                row = conn.execute("SELECT version FROM chatd_schema").fetchone()
                version = row[0] if row else 0
                if version > len(MIGRATIONS):
                    raise StoreError(f"store {self.name}: schema version {version} is newer than "
                                     f"this chatd's ({len(MIGRATIONS)}): upgrade chatd")
                for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                    conn.execute(script)
                    log.info("store %s migrated to schema version %d", self.name, number)
                if row is None:
                    conn.execute("INSERT INTO chatd_schema VALUES (%s)", (len(MIGRATIONS),))
                elif version < len(MIGRATIONS):
                    conn.execute("UPDATE chatd_schema SET version = %s", (len(MIGRATIONS),))
        except psycopg.Error as exc:
            raise StoreError(f"store {self.name}: cannot migrate: {_one_line(exc)}") from None

    @property
    def schema_version(self) -> int:
        return self._read("SELECT version FROM chatd_schema", ())[0][0]

    def _read(self, query: str, args: tuple) -> list[tuple]:
        """Run one query in its own transaction (start-up and tools)."""
        try:
            conn = self._connection()
            with conn.transaction():
                return conn.execute(query, args).fetchall()
        except psycopg.Error as exc:
            raise StoreError(f"store {self.name}: {_one_line(exc)}") from None

    def setting(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM settings WHERE key = %s", (key,))
        return rows[0][0] if rows else None

    def secret(self, key: str) -> tuple[str, bool]:
        inserted = self._read("INSERT INTO settings (key, value) VALUES (%s, %s) "
                              "ON CONFLICT (key) DO NOTHING RETURNING value",
                              (key, secrets.token_urlsafe(24)))
        if inserted:
            return inserted[0][0], True
        return self.setting(key), False

    def load_sessions(self) -> list[StoredSession]:
        rows = self._read("SELECT id, kind, members_version, "
                          "ARRAY(SELECT user_id FROM members WHERE session_id = sessions.id "
                          "ORDER BY user_id), "
                          "ARRAY(SELECT since_seq FROM members WHERE session_id = sessions.id "
                          "ORDER BY user_id) FROM sessions ORDER BY position", ())
        return [StoredSession(sid, kind, dict(zip(users, since)), version)
                for sid, kind, version, users, since in rows]

    # --- inside run_batch ------------------------------------------------------

    def create_session(self, session_id: str, kind: str, members: list[str],
                       created_ms: int) -> None:
        self._cur.execute("INSERT INTO sessions (id, kind, created_ms) VALUES (%s, %s, %s) "
                          "ON CONFLICT (id) DO NOTHING", (session_id, kind, created_ms))
        self._cur.execute(_INSERT_MEMBERS, (0, members, session_id))

    def set_members(self, session_id: str, members: list[str]) -> tuple[int, int] | None:
        row = self._cur.execute("UPDATE sessions SET members_version = members_version + 1 "
                                "WHERE id = %s RETURNING last_seq, members_version",
                                (session_id,)).fetchone()
        if row is None:
            return None  # deleted (by this node or another) before this change
        self._cur.execute("DELETE FROM members WHERE session_id = %s "
                          "AND NOT (user_id = ANY(%s::text[]))", (session_id, members))
        self._cur.execute(_INSERT_MEMBERS, (row[0], members, session_id))
        return row[0], row[1]

    def delete_session(self, session_id: str) -> None:
        self._cur.execute("DELETE FROM sessions WHERE id = %s", (session_id,))

    def append_message(self, session_id: str, sender_id: str, message: str,
                       sender_timestamp: int, server_timestamp: int) -> int | None:
        row = self._cur.execute(_APPEND, (session_id, sender_id, message, sender_timestamp,
                                          server_timestamp)).fetchone()
        return row[0] if row else None

    def append_checked(self, session_id: str, sender_id: str, message: str,
                       sender_timestamp: int, server_timestamp: int,
                       version: int) -> tuple[int | None, list[str] | None]:
        row = self._cur.execute(_APPEND, (session_id, sender_id, message, sender_timestamp,
                                          server_timestamp)).fetchone()
        if row is None:
            return None, None
        if row[1] == version:
            return row[0], None
        # A change the sender had not heard of committed first; this new
        # statement's snapshot sees it (READ COMMITTED).
        members = self._cur.execute("SELECT user_id FROM members WHERE session_id = %s",
                                    (session_id,)).fetchall()
        return row[0], [user for (user,) in members]

    mark = "%s"

    def _execute(self, query: str, args: Sequence[Any]) -> psycopg.Cursor:
        return self._cur.execute(query, args)

    def run_batch(self, jobs: list[Callable[[Store], Any]]) -> list[Any]:
        conn = self._connection()
        try:
            with conn.cursor() as self._cur:
                results = [job(self) for job in jobs]
        except BaseException:
            self._rollback()
            raise
        finally:
            self._cur = None
        try:
            conn.commit()
        except psycopg.Error as exc:
            if not conn.closed:
                raise  # the server answered: the transaction was rolled back
            self._conn = None
            raise CommitUnknown(f"store {self.name}: the connection was lost during COMMIT "
                                f"({_one_line(exc)}): the last batch may or may not be "
                                "stored") from exc
        return results

    def _rollback(self) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            self._conn = None
            return
        try:
            conn.rollback()
        except psycopg.Error:
            conn.close()
            self._conn = None

    def is_transient(self, exc: BaseException | None) -> bool:
        if isinstance(exc, CommitUnknown) or not isinstance(exc, psycopg.Error):
            return False
        state = exc.sqlstate
        if state is None:
            # No answer from the server: it could not be reached, or the
            # connection was lost (before COMMIT: the batch rolled back).
            return isinstance(exc, psycopg.OperationalError)
        return state.startswith("08") or state in _TRANSIENT_STATES

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()).removeprefix("connection failed: ")
    return text or type(exc).__name__
