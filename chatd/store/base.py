"""The store interface: what ``chatd.sessions`` needs from a database.

Two backends implement it, one file each: ``SQLiteStore`` (a file or
``:memory:``, the embedded default) and ``PostgresStore`` (one database
shared by several nodes). ``chatd.store.open_store`` picks one by the
``store`` config value; the router and the sessions service never know
which is behind.

Every method is synchronous and may block on the disk or the network:
at run time they are called from a worker thread, one at a time, by the
group-commit ``Writer`` (``chatd.store.writer``). The session methods
(``create_session`` … ``history``, ``probe``) run only inside
``run_batch``, in its transaction.

Failures are of two kinds (docs/storage.md):

- *transient* (``is_transient`` is true): the database is locked or busy,
  a connection was lost before COMMIT was sent, a serialization failure or
  a deadlock; nothing of the batch was stored and running it again is
  safe. The writer retries for up to ``busy_timeout`` seconds.
- ``CommitUnknown``: the COMMIT may or may not have succeeded and the
  server could not tell in time; never run again, answered busy.
- anything else is *persistent* (disk full, read-only, corrupt, a bug):
  the writer stops writing until chatd is restarted (fail-stop).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

#: Columns of a stored message, in the order ``history`` returns them.
MESSAGE_COLUMNS = "seq, sender_id, message, sender_timestamp, server_timestamp"

#: A stored message as ``history`` returns it:
#: (seq, sender_id, message JSON text, sender_timestamp ms, server_timestamp ms).
HistoryRow = tuple[int, str, str, int, int]


class StoredSession(NamedTuple):
    """A session as stored. ``members``: user id -> ``since``, the session's
    last message ``seq`` when they joined (0 for those it was created
    with: every message is theirs); ``version``: how many times its
    members were changed (docs/cluster.md)."""

    id: str
    kind: str
    members: dict[str, int]
    version: int


class StoreError(RuntimeError):
    """The store cannot be opened or used; the message is one line for the
    operator that names the store and the reason, e.g.
    ``store /srv/chatd.db: directory /srv does not exist``."""


class Store(abc.ABC):
    """One database holding the settings, GradAgenda sessions, members and
    messages. ``name`` names it in logs and errors (no password);
    ``busy_timeout`` is how many seconds the writer retries a transient
    failure (config ``store-busy-timeout``)."""

    name: str
    busy_timeout: float

    # --- opening and tools ---------------------------------------------------

    @abc.abstractmethod
    def lock(self) -> None:
        """Make this process the only server on the store (idempotent).

        Raises ``StoreError`` naming the holder if another chatd has it. A
        no-op where several servers may share the store (PostgreSQL) or
        nobody else can reach it (``:memory:``)."""

    @abc.abstractmethod
    def setting(self, key: str) -> str | None:
        """A value of the ``settings`` table (e.g. a generated secret)."""

    @abc.abstractmethod
    def secret(self, key: str) -> tuple[str, bool]:
        """The stored secret ``key``, generated and stored on first use:
        (value, whether it was generated now). Several nodes asking at
        once all get the same value."""

    @abc.abstractmethod
    def load_sessions(self) -> list[StoredSession]:
        """Every session, oldest first."""

    # --- inside run_batch -----------------------------------------------------

    @abc.abstractmethod
    def create_session(self, session_id: str, kind: str, members: list[str],
                       created_ms: int) -> None:
        """Store a new session (``kind`` is ``direct`` or ``mutable``) and
        its members. Creating a session that exists already (two nodes
        creating the same direct session) changes nothing."""

    @abc.abstractmethod
    def set_members(self, session_id: str, members: list[str]) -> tuple[int, int] | None:
        """Replace the session's members: (the session's last message
        ``seq`` when the change commits, its new ``version``), or None if
        the session no longer exists. Members who stay keep their
        ``since``; new ones get that ``seq``. Serialised with
        ``append_message`` on the same session (several nodes): a message
        is either before the change or after it."""

    @abc.abstractmethod
    def delete_session(self, session_id: str) -> None:
        """Delete the session with its members and messages."""

    @abc.abstractmethod
    def append_message(self, session_id: str, sender_id: str, message: str,
                       sender_timestamp: int, server_timestamp: int) -> int | None:
        """Store a message (``message`` is its JSON text; times in ms) with
        the session's next ``seq``, allocated in this transaction: 1, 2, …
        per session without gaps or duplicates, however many nodes append
        at once. None if the session no longer exists. May be a ``Later``
        (the seq known at COMMIT): ``run_batch`` returns it settled."""

    def append_checked(self, session_id: str, sender_id: str, message: str,
                       sender_timestamp: int, server_timestamp: int,
                       version: int) -> tuple[int | None, list[str] | None]:
        """``append_message``, for a sender that knew the members as of
        ``version``: (seq, None), or (seq, the members when the message
        committed) if a membership change it had not heard of came first
        (another node's, its news still on the way). A store that one node
        alone uses is never ahead of that node: (seq, None). May be a
        ``Later`` of that tuple, as ``append_message``."""
        return self.append_message(session_id, sender_id, message, sender_timestamp,
                                   server_timestamp), None

    def history(self, session_id: str, *, before: int | None = None,
                after: int | None = None, limit: int = 100) -> list[HistoryRow]:
        """Up to ``limit`` messages, oldest first: the first ones after
        ``after`` if given, else the last ones (before ``before`` if given)."""
        query, args, newest_first = history_query(self.mark, session_id, before, after, limit)
        rows = self._execute(query, args).fetchall()
        if newest_first:
            rows.reverse()
        return rows

    # --- per-user bounds (issue 19: what one user can make the store keep) -------

    def set_creator(self, session_id: str, user_id: str) -> None:
        """Record who created the session (``max-groups-per-user``)."""
        self._execute(f"UPDATE sessions SET created_by={self.mark} WHERE id={self.mark}",
                      (user_id, session_id))

    def count_created(self, user_id: str) -> int:
        """Group sessions stored that ``user_id`` created, whether or not
        they are still a member (rows of this batch included)."""
        return self._execute(f"SELECT COUNT(*) FROM sessions WHERE created_by={self.mark} "
                             "AND kind='mutable'", (user_id,)).fetchone()[0]

    def count_sent(self, session_id: str) -> dict[str, int]:
        """Messages stored in the session, by sender (rows of this batch included)."""
        return dict(self._execute(f"SELECT sender_id, COUNT(*) FROM messages WHERE "
                                  f"session_id={self.mark} GROUP BY sender_id",
                                  (session_id,)).fetchall())

    def probe(self) -> None:
        """Write one row, to prove the store takes writes (readiness)."""
        self._execute("INSERT INTO settings (key, value) VALUES ('probed-at', {0}) "
                      "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
                      .format(self.mark), (str(time.time_ns() // 1_000_000),))

    #: The driver's parameter marker: ``?`` (sqlite3) or ``%s`` (psycopg).
    mark: str

    @abc.abstractmethod
    def _execute(self, query: str, args: Sequence[Any]) -> Any:
        """Run one statement in the batch's transaction; its cursor."""

    # --- transactions -----------------------------------------------------

    @abc.abstractmethod
    def run_batch(self, jobs: list[Callable[[Store], Any]], deadline: float | None = None
                  ) -> list[Any]:
        """Run ``jobs`` in one transaction and commit; their results once it
        has committed. ``deadline`` (``time.monotonic()``; default: the busy
        timeout from now): a backend that can hang on a network gives up
        by then, as a transient failure. On any exception nothing of the
        batch is stored — except ``CommitUnknown``, when that cannot be
        known."""

    @abc.abstractmethod
    def is_transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by ``run_batch``) left nothing stored and
        may pass if the batch is run again later."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection (and release the lock)."""

    # --- tables of other modules (issue 22: chatd.store.moderation) ---------------

    def execute(self, query: str, args: Sequence[Any] = ()) -> Any:
        """Run one statement of a module that keeps its own tables, inside
        ``run_batch`` (in the batch's transaction), with ``mark`` as the
        parameter marker; its cursor (``fetchone``, ``fetchall``, ``rowcount``)."""
        return self._execute(query, args)


class Later:
    """A job's result that only the batch's COMMIT tells: a backend may
    return one from ``append_message`` or ``append_checked`` when it sends
    the append with COMMIT and learns its ``seq`` from the answer
    (PostgreSQL, docs/storage.md). ``run_batch`` returns every job's result
    with each ``Later`` in it (or in tuples it returns) replaced by its
    ``value``, so a job's caller sees plain values once committed; inside
    the job it is opaque."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Any = None


def settled(result: Any) -> Any:
    """``result`` with every ``Later`` in it, or in tuples it holds, replaced
    by its value (``run_batch``, after COMMIT)."""
    kind = type(result)
    if kind is Later:
        return result.value
    if kind is tuple:
        return tuple([item.value if type(item) is Later
                      else settled(item) if type(item) is tuple else item
                      for item in result])
    return result


class CommitUnknown(StoreError):
    """The connection was lost while COMMIT was under way and the server
    could not say in time whether it committed: the batch may or may not
    be stored, so it is never run again (the writer answers it busy and
    goes on writing)."""


def history_query(mark: str, session_id: str, before: int | None, after: int | None,
                  limit: int) -> tuple[str, list[Any], bool]:
    """The SQL for ``Store.history`` with ``mark`` as the parameter marker
    (``?`` or ``%s``): (query, arguments, whether the rows come newest first)."""
    where, args = f"session_id={mark}", [session_id]
    if before is not None:
        where += f" AND seq<{mark}"
        args.append(before)
    if after is not None:
        where += f" AND seq>{mark}"
        args.append(after)
    order = "seq" if after is not None else "seq DESC"
    query = f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE {where} ORDER BY {order} LIMIT {mark}"
    return query, [*args, limit], after is None
