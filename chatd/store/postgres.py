"""The PostgreSQL backend: one database that several chatd nodes share.

psycopg 3 has no trio support (its issue #29), so this uses its
synchronous driver from worker threads, as the SQLite backend does: one
connection, used by one thread at a time (the writer's, or start-up),
opened again after it is lost.

- **Migrations** are versioned (table ``chatd_schema``) and run in one
  transaction under an advisory lock, so nodes starting at once migrate
  once; a database newer than this chatd is refused.
- **seq and locks**: each session row keeps ``last_seq``. Every write of
  a session first takes the session's advisory lock (``lock_key``), held
  until COMMIT, so nodes writing one session queue on it; the batch then
  allocates the seqs itself and sends its messages in one statement with
  COMMIT. ``seq`` is gap-free and never duplicated, a rolled-back batch
  leaves no gap, and a batch waits only for keys above every key it holds
  (else it tries, and on a miss runs again with its keys locked in order),
  so no interleaving of nodes and sessions can deadlock. A batch that
  only appends (the usual one) is held back and sent at its end as one
  statement, its own transaction (``chatd_append``, a function of
  migration 6, prepared): it locks the sessions in ascending key order,
  allocates the seqs, inserts the messages and commits, so it costs one
  round trip and holds no lock across one; its appends return ``Later``
  seqs, settled from its answer (``Store.run_batch``).
- **Bounded**: every batch has a deadline (the writer's busy timeout); a
  watchdog cuts the socket of one still running then, and connect,
  statement, lock and idle-in-transaction timeouts plus TCP keepalives and
  ``tcp_user_timeout`` bound the rest.
- **Transient** failures (docs/storage.md): the connection lost before
  COMMIT or impossible to open (server restarting, stopped, unreachable),
  SQLSTATE class 08 (connection), 40001 (serialization), 40P01 (deadlock),
  55P03 (``lock_timeout``), 57014 (``statement_timeout``), 25P03 (idle in
  transaction), 57P01/57P02/57P03 (admin shutdown, crash shutdown,
  starting up), 53300 (too many connections). Everything else is
  persistent — disk full, read-only, a constraint.
- **A COMMIT cut off** (the connection lost once it may have been sent):
  the transaction id taken before it is looked up (``txid_status``) on a
  new connection, for up to the busy timeout more — for a batch of
  appends sent as one statement, once its server process has ended, this
  store's row of ``writers`` (the number and seqs of its last such batch):
  committed, the batch's results stand; rolled back, it is transient (run
  again); unknown still, ``CommitUnknown`` (answered busy; what it became
  is logged once known). A batch is never run again after its COMMIT may
  have succeeded.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict

from chatd.store.base import (CommitUnknown, HistoryRow, Later, Store, StoredSession,
                              StoreError, history_query, settled)

log = logging.getLogger("chatd.store")


class _QuietPipelineLoss(logging.Filter):
    """psycopg warns when it cannot end a pipeline on a lost connection;
    the store handles (and logs) that loss itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("error ignored terminating <psycopg.Pipeline")


logging.getLogger("psycopg").addFilter(_QuietPipelineLoss())

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
        delivered_seq BIGINT NOT NULL DEFAULT 0,
        read_seq BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (session_id, user_id)
    );
    CREATE TABLE mark_settings (user_id TEXT PRIMARY KEY, read_marks_off BIGINT NOT NULL);
    CREATE TABLE media (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        content_type TEXT NOT NULL,
        size BIGINT NOT NULL,
        data BYTEA NOT NULL,
        created_ms BIGINT NOT NULL
    );
    CREATE INDEX media_owner ON media(owner);
    CREATE TABLE media_uses (
        media_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (media_id, session_id, seq)
    );
    CREATE INDEX media_uses_session ON media_uses(session_id);
    """,
    # 6: appends in one statement (issue 18). The foreign key from messages
    # to sessions goes: every append holds its session's lock and reads the
    # session row in the same transaction, so the session exists, and
    # ``delete_session`` deletes the messages itself; its check cost each
    # message a lookup. ``writers`` holds, per open store, the number and
    # seqs of its last batch of appends, so that a batch whose answer was
    # lost can be told committed or not, and its seqs known
    # (``PostgresStore._resolve_later``). ``chatd_append``: see ``_APPEND``;
    # its arguments are read as jsonb, parsed once (``->>`` on json parses
    # the element again for each field: 5 against 3.5 µs per message).
    """
    ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_session_id_fkey;
    CREATE TABLE writers (
        id TEXT PRIMARY KEY,
        batch BIGINT NOT NULL,
        result TEXT NOT NULL,
        updated TIMESTAMPTZ NOT NULL
    );
    CREATE FUNCTION chatd_append(batch_sessions json, batch_rows json, writer text,
                                 batch bigint) RETURNS text LANGUAGE plpgsql AS $f$
    DECLARE
        answer text;
    BEGIN
        PERFORM count(pg_advisory_xact_lock(k)) FROM
            (SELECT (c->>1)::bigint AS k FROM jsonb_array_elements(batch_sessions::jsonb)
             WITH ORDINALITY AS t(c, i) ORDER BY i) AS o;
        WITH u AS (
            UPDATE sessions AS s SET last_seq = s.last_seq + (c->>2)::bigint
            FROM jsonb_array_elements(batch_sessions::jsonb) AS c WHERE s.id = c->>0
            RETURNING s.id, s.last_seq - (c->>2)::bigint AS base,
                      s.members_version AS version, (c->>3)::bigint AS known),
        m AS (
            INSERT INTO messages (session_id, seq, sender_id, message, sender_timestamp,
                                  server_timestamp)
            SELECT u.id, u.base + (r->>1)::bigint, r->>2, r->>3, (r->>4)::bigint,
                   (r->>5)::bigint
            FROM jsonb_array_elements(batch_rows::jsonb) AS r JOIN u ON u.id = r->>0)
        SELECT coalesce(json_agg(json_build_array(u.id, u.base, u.version,
            CASE WHEN u.version <> u.known THEN ARRAY(SELECT user_id FROM members
                 WHERE session_id = u.id ORDER BY user_id) END)), '[]')::text
        INTO answer FROM u;
        UPDATE writers SET batch = chatd_append.batch, result = answer, updated = now()
        WHERE id = writer;
        IF NOT FOUND THEN
            INSERT INTO writers VALUES (writer, chatd_append.batch, answer, now());
        END IF;
        RETURN answer;
    END $f$;
    """,
]

#: SQLSTATEs after which running the batch again is safe and may pass
#: (postgresql.org/docs/current/errcodes-appendix.html).
_TRANSIENT_STATES = {"40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03", "53300",
                     "25P03"}
#: Key of the advisory lock held while migrating.
_MIGRATION_LOCK = 0x63686174  # "chat"

# Every write of a session first takes the session's transaction-level
# advisory lock (key: ``lock_key(id)``), so writes of one session queue on
# it, including the creation of a session that does not exist yet, and row
# locks never wait. A batch waits for a key only if it is above every key
# it holds; a key below is tried, and if another node has it the batch
# starts again with every key it needs locked in ascending order: no cycle
# of waits can form, so no deadlock (docs/storage.md).
#
# Locked and read in one statement: the row lock (FOR NO KEY UPDATE) makes
# READ COMMITTED return the newest committed row, whatever the snapshot,
# and the join yields a row only once the advisory lock is held.
_LOCK_READ = ("SELECT s.last_seq, s.members_version, txid_current() "
              "FROM (SELECT pg_advisory_xact_lock(%s)) AS l, sessions AS s "
              "WHERE s.id = %s FOR NO KEY UPDATE OF s")
_READ = ("SELECT last_seq, members_version, txid_current() FROM sessions WHERE id = %s "
         "FOR NO KEY UPDATE")
_LOCK = "SELECT pg_advisory_xact_lock(%s), txid_current()"
# Several sessions locked in ascending key order and read, in one
# statement: the aggregate takes every lock before the join yields a row.
_LOCK_READ_MANY = ("SELECT s.id, s.last_seq, s.members_version, txid_current() "
                   "FROM (SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT k FROM "
                   "unnest(%s::bigint[]) WITH ORDINALITY AS t(k, i) ORDER BY i) AS o) AS l, "
                   "sessions AS s WHERE s.id = ANY(%s) FOR NO KEY UPDATE OF s")
#: At most this many sessions are locked together (``_prefetch``).
_PREFETCH_MAX = 64
# A batch of appends only, before anything else of it reached the server:
# the whole batch is one statement, its own transaction (autocommit), in
# which the function of migration 6 locks the sessions (ascending keys),
# allocates the seqs, inserts the messages and records the batch as this
# writer's last (``writers``): one round trip, and no lock held across a
# round trip. Arguments: [[session, key, count, version known or null],
# ...] in ascending key order, [[session, index in it from 1, sender,
# message, sent, stored], ...], the writer's id and the batch's number.
_APPEND = "SELECT chatd_append(%s::json, %s::json, %s, %s)"
_TRY_LOCK = "SELECT pg_try_advisory_xact_lock(%s)"
_LOCK_ALL = ("SELECT count(pg_advisory_xact_lock(k)) FROM "
             "(SELECT k FROM unnest(%s::bigint[]) WITH ORDINALITY AS t(k, i) ORDER BY i) AS o")
# A batch's messages and the sessions' new last seq, in one statement
# with two JSON arguments ([[session, seq, sender, message, sent, stored],
# ...] and [[session, last seq], ...]): sent with COMMIT in one simple
# query, so a batch's writes and its COMMIT cost one round trip.
_FLUSH = ("WITH m AS (INSERT INTO messages (session_id, seq, sender_id, message, "
          "sender_timestamp, server_timestamp) "
          "SELECT r->>0, (r->>1)::bigint, r->>2, r->>3, (r->>4)::bigint, (r->>5)::bigint "
          "FROM json_array_elements(%s::json) AS r) "
          "UPDATE sessions AS s SET last_seq = (v->>1)::bigint "
          "FROM json_array_elements(%s::json) AS v WHERE s.id = v->>0")
_INSERT_MEMBERS = ("INSERT INTO members (session_id, user_id, since_seq) "
                   "SELECT id, u, %s FROM sessions, unnest(%s::text[]) AS u WHERE id = %s "
                   "ON CONFLICT DO NOTHING")
_JSON = msgspec.json.Encoder()
#: Seconds between two tries to learn what became of a cut-off COMMIT.
_RESOLVE_PAUSE = 0.1


def lock_key(name: str) -> int:
    """The advisory lock key of a session id (or another lock name): a
    signed 64-bit hash, the same on every node."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big",
                          signed=True)


#: The key ``probe`` writes under (its row is shared by every node).
_PROBE_KEY = lock_key("\0chatd probe")


class _Reorder(Exception):
    """A key below one already held is taken elsewhere: run the batch again
    with ``keys`` locked first, in ascending order."""

    def __init__(self, keys: set[int]) -> None:
        self.keys = keys


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
        self._socket: socket.socket | None = None
        self._cur: psycopg.Cursor | None = None
        self._watchdog = _Watchdog()
        #: Transaction ids of cut-off COMMITs not yet known committed or not.
        self._unresolved: list[tuple[int, int]] = []
        #: The same for batches of appends sent as one statement (``_APPEND``):
        #: (their number, server pid). While one is unresolved, appends are
        #: not sent that way: ``writers`` tells only of the last.
        self._unresolved_later: list[tuple[int, int]] = []
        #: This store's row in ``writers``, and its batches of appends so far.
        self._writer = secrets.token_hex(12)
        self._batches = 0
        self._begin_batch()
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

    def _connect(self, deadline: float | None = None) -> psycopg.Connection:
        """A new connection, within ``deadline`` (``time.monotonic()``) if
        given, else within the busy timeout (libpq waits 2 s at least)."""
        budget = self.busy_timeout if deadline is None else deadline - time.monotonic()
        wait_ms = max(1, int(self.busy_timeout * 1000))
        conn = psycopg.connect(self.url, autocommit=True, application_name="chatd",
                               connect_timeout=max(2, math.ceil(budget)),
                               # Notice a peer that vanished without a word, and
                               # give up on data the peer never acknowledges.
                               keepalives=1, keepalives_idle=5, keepalives_interval=2,
                               keepalives_count=3, tcp_user_timeout=wait_ms)
        try:
            # A lock held elsewhere (another node, an operator) or a
            # statement that runs away fails the batch as transient; a
            # node that stalls inside a transaction loses it instead of
            # holding its sessions' locks (docs/storage.md).
            conn.execute(f"SET lock_timeout = {max(1, wait_ms // 4)}; "
                         f"SET statement_timeout = {wait_ms}; "
                         f"SET idle_in_transaction_session_timeout = {wait_ms}")
            # The watchdog's handle on the socket, valid as long as this
            # object, whatever libpq does with its own descriptor.
            self._socket = socket.socket(fileno=os.dup(conn.pgconn.socket))
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self, deadline: float | None = None) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._drop()
            self._conn = self._connect(deadline)
        return self._conn

    def _drop(self) -> None:
        """Forget the connection (closed, or to be closed)."""
        conn, self._conn = self._conn, None
        sock, self._socket = self._socket, None
        if conn is not None:
            conn.close()
        if sock is not None:
            sock.close()

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
                # The rows of stores closed long ago (each open store has one).
                conn.execute("DELETE FROM writers WHERE updated < now() - interval '7 days'")
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
    #
    # A batch that only appends (the usual case) is held back until its
    # end and sent as one statement, its own transaction (``_APPEND``):
    # the appends return ``Later`` seqs, settled from its answer. Any other
    # statement first turns the appends held back into ordinary ones
    # (``_materialize``). Within such a batch the store keeps what it read
    # of each session it touched (``_known``: last seq and members version,
    # under the lock), allocates each message's seq itself and sends the
    # batch's messages in one statement at the end (``_flush``), with
    # COMMIT: a batch costs one round trip per session it touches, plus
    # one, however many messages it holds (docs/storage.md).

    def _begin_batch(self) -> None:
        self._held: set[int] = set()
        self._top: int | None = None
        self._known: dict[str, list[int] | None] = {}
        self._rows: list[tuple] = []
        self._dirty: set[str] = set()
        self._xid: int | None = None
        self._wrote = False
        self._begun = False
        #: Appends held back: (Later, session, sender, message, sent,
        #: stored, members version the sender knew or None).
        self._later: list[tuple] = []
        #: Whether a job got a ``Later`` (its results are to be settled).
        self._settle = False
        #: The number of the batch of appends sent, and its server pid.
        self._sent_batch: int | None = None
        self._pid = 0

    def _hold(self, key: int) -> None:
        self._held.add(key)
        if self._top is None or key > self._top:
            self._top = key

    def _in_order(self, key: int) -> bool:
        """Whether waiting for ``key`` is safe: it is above every key held."""
        return self._top is None or key > self._top

    def _take(self, key: int) -> None:
        """Hold the advisory lock ``key`` until the batch ends."""
        if self._later:
            self._materialize()
        if key in self._held:
            return
        if self._in_order(key):
            self._xid = self._sql(_LOCK, (key,)).fetchone()[1]
        elif not self._sql(_TRY_LOCK, (key,)).fetchone()[0]:
            raise _Reorder(self._held | {key})
        self._hold(key)

    def _session(self, session_id: str) -> list[int] | None:
        """[last seq, members version] of a session, locked for this batch;
        None if it does not exist."""
        if self._later:
            self._materialize()
        try:
            return self._known[session_id]
        except KeyError:
            pass
        key = lock_key(session_id)
        if key in self._held:
            row = self._sql(_READ, (session_id,)).fetchone()
        elif self._in_order(key):
            row = self._sql(_LOCK_READ, (key, session_id)).fetchone()
            if row is not None:  # else the lock may not have been taken
                self._hold(key)
        else:
            self._take(key)
            row = self._sql(_READ, (session_id,)).fetchone()
        if row is not None:
            self._xid = row[2]
        state = self._known[session_id] = None if row is None else [row[0], row[1]]
        return state

    def _sql(self, query: str, args: Sequence[Any] = ()) -> psycopg.Cursor:
        """Run one statement in the batch's transaction. The connection is
        in autocommit mode, so the first one is sent with BEGIN in one
        simple query (``ClientCursor``: arguments bound by psycopg): no
        round trip of its own for BEGIN."""
        if self._later:
            self._materialize()
        if self._begun:
            return self._cur.execute(query, args)
        self._begun = True
        cur = self._first
        cur.execute("BEGIN; " + query, args)
        cur.nextset()
        return cur

    def _start(self) -> None:
        """Begin the batch's transaction if it has not begun."""
        if not self._begun:
            self._begun = True
            self._cur.execute("BEGIN")

    def _prefetch(self, session_ids: list[str]) -> None:
        """Lock and read ``session_ids`` (ascending key order, at most
        ``_PREFETCH_MAX``) in one round trip, when no key is held (so
        waiting is safe); the others are locked as they are needed."""
        ids = session_ids[:_PREFETCH_MAX]
        keys = [lock_key(i) for i in ids]
        rows = self._sql(_LOCK_READ_MANY, (keys, ids)).fetchall()
        if not rows:
            return  # the locks may not have been taken: each is taken when needed
        for key in keys:
            self._hold(key)
        for session_id, last_seq, version, xid in rows:
            self._known[session_id] = [last_seq, version]
            self._xid = xid

    def _materialize(self) -> None:
        """A statement is due with appends held back (nothing sent yet, no
        key held): lock and read their sessions in ascending key order, in
        one round trip, and append them as ordinary appends, in order."""
        later, self._later = self._later, []
        self._prefetch(sorted({item[1] for item in later}, key=lock_key))
        for cell, session_id, sender_id, message, sent, stored, version in later:
            seq, members = self._append_now(session_id, sender_id, message, sent, stored,
                                            version)
            cell.value = seq if version is None else (seq, members)

    def _commit_later(self) -> None:
        """Send the appends held back, as the batch's only statement (its
        own transaction: committed once answered), and settle them."""
        sessions: dict[str, list] = {}  # id -> [count, version known, -1: several]
        rows = []
        for _, session_id, sender_id, message, sent, stored, version in self._later:
            entry = sessions.get(session_id)
            if entry is None:
                entry = sessions[session_id] = [0, version]
            elif entry[1] != version:
                entry[1] = -1  # members sent back whatever the version
            entry[0] += 1
            rows.append((session_id, entry[0], sender_id, message, sent, stored))
        order = sorted(sessions, key=lock_key)
        self._batches += 1
        self._sent_batch = self._batches
        self._pid = self._conn.info.backend_pid
        self._wrote = True
        # Prepared: parsed and planned once per connection, the arguments
        # sent as they are (no quoting).
        answer = self._cur.execute(_APPEND, prepare=True, params=(
            _JSON.encode([(i, lock_key(i), *sessions[i]) for i in order]).decode(),
            _JSON.encode(rows).decode(), self._writer, self._batches)).fetchone()[0]
        self._settle_later(answer)

    def _settle_later(self, answer: str) -> None:
        """Give the appends held back their seqs from ``chatd_append``'s
        answer: [[session, last seq before, members version, members or
        null], ...] (a session missing: deleted)."""
        base = {row[0]: row for row in msgspec.json.decode(answer)}
        counts: dict[str, int] = {}
        for cell, session_id, _, _, _, _, version in self._later:
            found = base.get(session_id)
            if found is None:
                cell.value = None if version is None else (None, None)
                continue
            index = counts[session_id] = counts.get(session_id, 0) + 1
            seq = found[1] + index
            if version is None:
                cell.value = seq
            else:
                cell.value = (seq, None if found[2] == version else found[3])
        self._later = []

    def _flush(self, commit: bool = False) -> None:
        """Write the messages and seqs held back, before a read, or with
        ``commit`` before and with COMMIT, in one simple query."""
        if self._later:
            if commit and not self._begun:
                return self._commit_later()
            self._materialize()
        if not self._dirty:
            if commit and self._begun:
                self._cur.execute("COMMIT")
            return
        self._start()
        rows = _JSON.encode(self._rows).decode()
        seqs = _JSON.encode([(i, self._known[i][0]) for i in self._dirty]).decode()
        self._rows = []
        self._dirty.clear()
        self._first.execute(_FLUSH + ("; COMMIT" if commit else ""), (rows, seqs))

    def create_session(self, session_id: str, kind: str, members: list[str],
                       created_ms: int) -> None:
        self._take(lock_key(session_id))
        self._wrote = True
        self._sql("INSERT INTO sessions (id, kind, created_ms) VALUES (%s, %s, %s) "
                  "ON CONFLICT (id) DO NOTHING", (session_id, kind, created_ms))
        self._sql(_INSERT_MEMBERS, (0, members, session_id))
        self._known.pop(session_id, None)  # read again (locked) when next used

    def set_members(self, session_id: str, members: list[str]) -> tuple[int, int] | None:
        state = self._session(session_id)
        if state is None:
            return None  # deleted (by this node or another) before this change
        self._wrote = True
        state[1] += 1
        self._sql("UPDATE sessions SET last_seq = %s, members_version = %s "
                  "WHERE id = %s", (state[0], state[1], session_id))
        self._sql("DELETE FROM members WHERE session_id = %s "
                  "AND NOT (user_id = ANY(%s::text[]))", (session_id, members))
        self._sql(_INSERT_MEMBERS, (state[0], members, session_id))
        return state[0], state[1]

    def delete_session(self, session_id: str) -> None:
        if self._session(session_id) is None:
            return
        self._wrote = True
        self._rows = [row for row in self._rows if row[0] != session_id]
        self._dirty.discard(session_id)
        # No foreign key (migration 6): the session's messages go first,
        # under its lock, so that none outlives it.
        self._sql("DELETE FROM messages WHERE session_id = %s", (session_id,))
        self._sql("DELETE FROM sessions WHERE id = %s", (session_id,))
        self._known[session_id] = None

    def _append(self, session_id: str, sender_id: str, message: str, sender_timestamp: int,
                server_timestamp: int) -> list[int] | None:
        state = self._session(session_id)
        if state is None:
            return None
        self._wrote = True
        state[0] += 1
        self._dirty.add(session_id)
        self._rows.append((session_id, state[0], sender_id, message, sender_timestamp,
                           server_timestamp))
        return state

    def _append_now(self, session_id: str, sender_id: str, message: str, sent: int,
                    stored: int, version: int | None) -> tuple[int | None, list[str] | None]:
        """An ordinary append: (seq or None, members if ``version`` is not
        theirs)."""
        state = self._append(session_id, sender_id, message, sent, stored)
        if state is None:
            return None, None
        if version is None or state[1] == version:
            return state[0], None
        # A change the sender had not heard of committed first (read under
        # the session's lock, so the members are those of that version).
        members = self._sql("SELECT user_id FROM members WHERE session_id = %s "
                            "ORDER BY user_id", (session_id,)).fetchall()
        return state[0], [user for (user,) in members]

    def _hold_back(self) -> bool:
        """Whether an append can wait for the batch's end: nothing of the
        batch has been sent, and no batch of appends is unresolved."""
        return not self._begun and not self._unresolved_later

    def append_message(self, session_id: str, sender_id: str, message: str,
                       sender_timestamp: int, server_timestamp: int) -> int | None | Later:
        result = self._append_or_hold(session_id, sender_id, message, sender_timestamp,
                                      server_timestamp, None)
        return result if isinstance(result, Later) else result[0]

    def append_checked(self, session_id: str, sender_id: str, message: str,
                       sender_timestamp: int, server_timestamp: int, version: int
                       ) -> tuple[int | None, list[str] | None] | Later:
        return self._append_or_hold(session_id, sender_id, message, sender_timestamp,
                                    server_timestamp, version)

    def _append_or_hold(self, session_id: str, sender_id: str, message: str,
                        sender_timestamp: int, server_timestamp: int, version: int | None,
                        ) -> tuple[int | None, list[str] | None] | Later:
        """Held back for the batch's one statement (a ``Later`` filled after
        COMMIT), else appended now."""
        if self._hold_back():
            cell = Later()
            self._settle = True
            self._later.append((cell, session_id, sender_id, message, sender_timestamp,
                                server_timestamp, version))
            return cell
        return self._append_now(session_id, sender_id, message, sender_timestamp,
                                server_timestamp, version)

    def _reads_apart(self, session_id: str) -> bool:
        """Whether a read of ``session_id`` can run on its own, outside the
        batch's transaction: nothing of the batch has been sent, and no
        append held back is to that session (the read's answer is then
        the same before or after them). Reads take no lock, so a feed's
        read in a batch of appends leaves them one statement (issue 18)."""
        return not self._begun and all(item[1] != session_id for item in self._later)

    def history(self, session_id: str, *, before: int | None = None,
                after: int | None = None, limit: int = 100) -> list[HistoryRow]:
        if not self._reads_apart(session_id):
            return super().history(session_id, before=before, after=after, limit=limit)
        query, args, newest_first = history_query(self.mark, session_id, before, after, limit)
        rows = self._cur.execute(query, args).fetchall()  # autocommit: its own transaction
        if newest_first:
            rows.reverse()
        return rows

    def count_sent(self, session_id: str) -> dict[str, int]:
        if not self._reads_apart(session_id):
            return super().count_sent(session_id)
        return dict(self._cur.execute("SELECT sender_id, COUNT(*) FROM messages WHERE "
                                      "session_id = %s GROUP BY sender_id",
                                      (session_id,)).fetchall())

    def probe(self) -> None:
        self._take(_PROBE_KEY)
        self._wrote = True
        super().probe()

    mark = "%s"

    def _execute(self, query: str, args: Sequence[Any]) -> psycopg.Cursor:
        self._flush()
        return self._sql(query, args)

    # --- transactions ----------------------------------------------------------

    def run_batch(self, jobs: list[Callable[[Store], Any]], deadline: float | None = None
                  ) -> list[Any]:
        """Run ``jobs`` in one transaction. ``deadline`` (``time.monotonic()``,
        default: the busy timeout from now) bounds it: whatever still hangs
        then (a stopped server, a silent network) is cut off, as a lost
        connection. A COMMIT cut off is resolved (``_resolve``,
        ``_resolve_later``). The results hold no ``Later``."""
        if deadline is None:
            deadline = time.monotonic() + self.busy_timeout
        conn = self._connection(deadline)
        self._watchdog.arm(self._socket, deadline)
        try:
            results = self._run(conn, jobs, deadline)
            return [settled(result) for result in results] if self._settle else results
        finally:
            self._watchdog.disarm()
            self._cur = None
            self._begin_batch()

    def _run(self, conn: psycopg.Connection, jobs: list[Callable[[Store], Any]],
             deadline: float) -> list[Any]:
        keys: set[int] = set()
        while True:
            committing = False
            try:
                with conn.cursor() as self._cur, psycopg.ClientCursor(conn) as self._first:
                    if self._unresolved or self._unresolved_later:
                        self._report_unresolved()
                    if keys:  # run again: every key it needs first, in order
                        self._sql(_LOCK_ALL, (sorted(keys),))
                        for key in keys:
                            self._hold(key)
                    results = [job(self) for job in jobs]
                    if self._wrote and self._xid is None and self._begun:
                        self._xid = self._sql("SELECT txid_current()").fetchone()[0]
                    committing = True
                    self._flush(commit=True)
                return results
            except _Reorder as reorder:
                keys |= reorder.keys
                self._rollback()
                self._begin_batch()
                conn = self._connection(deadline)
                self._watchdog.arm(self._socket, deadline)
                continue
            except psycopg.Error as exc:
                lost = conn.closed
                self._rollback()
                if not (committing and lost and self._wrote):
                    raise  # nothing was stored (or nothing written: read again)
                error = exc
            except BaseException:
                self._rollback()
                raise
            # The connection was lost once COMMIT may have been sent.
            if self._sent_batch is not None:
                committed = self._resolve_later(self._sent_batch, self._pid,
                                                deadline + self.busy_timeout)
            else:
                committed = self._resolve(self._xid, deadline + self.busy_timeout)
            if committed:
                return results
            raise _AbortedCommit(f"store {self.name}: the connection was lost during COMMIT "
                                 f"({_one_line(error)}) and the server rolled the batch "
                                 "back") from error

    def _writers_row(self, conn: psycopg.Connection) -> tuple[int, str] | None:
        return conn.execute("SELECT batch, result FROM writers WHERE id = %s",
                            (self._writer,)).fetchone()

    def _resolve_later(self, batch: int, pid: int, until: float) -> bool:
        """Whether a batch of appends sent as one statement committed (its
        answer lost): once its server process (``pid``) has ended, it has
        committed or rolled back for good, and ``writers`` says which (and
        the seqs it gave)."""
        self._drop()
        cause = "the server did not answer"
        while True:
            try:
                conn = self._connection(until)
                self._watchdog.arm(self._socket, until)
                try:
                    alive = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                         (pid,)).fetchone()[0]
                    row = None if alive else self._writers_row(conn)
                finally:
                    self._watchdog.disarm()
                if not alive:
                    committed = row is not None and row[0] == batch
                    log.info("store %s: the COMMIT cut off %s", self.name,
                             "committed" if committed else "was rolled back")
                    if committed:
                        self._settle_later(row[1])
                    return committed
                cause = f"its server process {pid} is still running"
            except psycopg.Error as exc:
                self._drop()
                cause = _one_line(exc)
            if time.monotonic() + _RESOLVE_PAUSE >= until:
                self._unresolved_later.append((batch, pid))
                raise CommitUnknown(f"store {self.name}: the connection was lost during "
                                    f"COMMIT and the server could not tell in time whether "
                                    f"it committed ({cause}): the last batch may or may not "
                                    "be stored")
            time.sleep(_RESOLVE_PAUSE)

    def _resolve(self, xid: int, until: float) -> bool:
        """Whether the transaction ``xid`` committed, asked on a new
        connection until ``until`` (``time.monotonic()``); raises
        ``CommitUnknown`` if the server cannot tell by then."""
        self._drop()
        cause = "the server did not answer"
        while True:
            try:
                conn = self._connection(until)
                self._watchdog.arm(self._socket, until)
                try:
                    status = conn.execute("SELECT txid_status(%s)", (xid,)).fetchone()[0]
                    conn.rollback()
                finally:
                    self._watchdog.disarm()
                if status in ("committed", "aborted"):
                    log.info("store %s: the COMMIT cut off (transaction %d) %s", self.name,
                             xid, "committed" if status == "committed" else "was rolled back")
                    return status == "committed"
                cause = f"transaction {xid} is {status or 'too old to tell'}"
            except psycopg.Error as exc:
                self._drop()
                cause = _one_line(exc)
            if time.monotonic() + _RESOLVE_PAUSE >= until:
                self._unresolved.append((xid, time.monotonic()))
                raise CommitUnknown(f"store {self.name}: the connection was lost during "
                                    f"COMMIT and the server could not tell in time whether "
                                    f"it committed ({cause}): the last batch may or may not "
                                    "be stored")
            time.sleep(_RESOLVE_PAUSE)

    def _report_unresolved(self) -> None:
        """Log what became of the COMMITs answered as unknown, now that the
        server answers (in the batch's transaction: no round trip saved)."""
        for item in list(self._unresolved_later):
            batch, pid = item
            if self._sql("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                         (pid,)).fetchone()[0]:
                continue  # still running: ask again next time
            self._unresolved_later.remove(item)
            # No batch of appends was sent since (``_hold_back``).
            row = self._sql("SELECT batch FROM writers WHERE id = %s",
                            (self._writer,)).fetchone()
            if row is not None and row[0] == batch:
                log.warning("store %s: a COMMIT answered 'storage busy' did commit: its "
                            "writes are stored", self.name)
            else:
                log.info("store %s: a COMMIT answered 'storage busy' was rolled back as "
                         "answered", self.name)
        if not self._unresolved:
            return
        xids = [xid for xid, _ in self._unresolved]
        rows = self._sql("SELECT x, txid_status(x) FROM unnest(%s::bigint[]) AS x",
                         (xids,)).fetchall()
        still = set()
        for xid, status in rows:
            if status == "committed":
                log.warning("store %s: the COMMIT of transaction %d, answered 'storage busy', "
                            "did commit: its writes are stored", self.name, xid)
            elif status == "aborted" or status is None:
                log.info("store %s: the COMMIT of transaction %d, answered 'storage busy', "
                         "was rolled back as answered", self.name, xid)
            else:
                still.add(xid)
        self._unresolved = [item for item in self._unresolved if item[0] in still]

    def _rollback(self) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            self._drop()
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self._drop()

    def is_transient(self, exc: BaseException | None) -> bool:
        if isinstance(exc, _AbortedCommit):
            return True
        if isinstance(exc, CommitUnknown) or not isinstance(exc, psycopg.Error):
            return False
        state = exc.sqlstate
        if state is None:
            # No answer from the server: it could not be reached, or the
            # connection was lost (before COMMIT: the batch rolled back).
            return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
        return state.startswith("08") or state in _TRANSIENT_STATES

    def close(self) -> None:
        self._drop()
        self._watchdog.close()


class _AbortedCommit(StoreError):
    """The connection was lost during COMMIT and the server has since said
    the transaction rolled back: nothing was stored (transient)."""


class _Watchdog:
    """Cuts off (``shutdown``) the socket of a batch still running at its
    deadline, so that a call blocked on a server that stopped answering (a
    paused process, a black-holed path, a half-open connection) fails as a
    lost connection. One daemon thread per store, woken once per deadline
    at most, not once per batch."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._socket: socket.socket | None = None
        self._deadline: float | None = None
        #: When the thread wakes next (None: only when notified).
        self._wakes: float | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket | None, deadline: float) -> None:
        with self._cond:
            self._socket, self._deadline = sock, deadline
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="chatd-pg-watchdog",
                                                daemon=True)
                self._thread.start()
            elif self._wakes is None or self._wakes > deadline:
                self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._socket = self._deadline = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                if self._deadline is not None and now >= self._deadline:
                    sock, self._socket, self._deadline = self._socket, None, None
                    if sock is not None:
                        log.debug("store watchdog: cutting off a batch past its deadline")
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    continue
                self._wakes = self._deadline
                self._cond.wait(None if self._deadline is None else self._deadline - now)
                self._wakes = None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()).removeprefix("connection failed: ")
    return text or type(exc).__name__
