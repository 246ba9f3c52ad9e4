"""What moderation keeps in the store: bans, mutes, retention, and the
GradAgenda message removals the server API asks for.

One schema for both backends, written in the SQL they share, and used
only through ``Store.execute`` inside ``Store.run_batch`` (a writer job),
so neither backend's class changes: each function here is a job step
taking the store. The tables are created on first use (``ensure_schema``,
``CREATE TABLE IF NOT EXISTS``; on PostgreSQL under a transaction-scoped
advisory lock, so nodes starting together do not race on the catalog).

Tables (docs/api.md):

- ``moderation_rules``: one row per ban or mute: ``id``, ``action``
  (``ban``/``mute``), ``target`` (``name``/``user``/``address``),
  ``value``, ``room`` (mutes; NULL: every room), ``reason``,
  ``created_ms``, ``expires_ms`` (NULL: until lifted), ``actor`` (the
  address the API call came from);
- ``moderation_retention``: per GradAgenda session, the most messages
  kept and their longest age (overriding the config's defaults).

**The newest message of a session is never removed, only blanked**
(``TOMBSTONE``): both backends allocate a session's next ``seq`` from the
highest stored one, and a ``seq`` handed out twice would make clients
(and the cluster's per-device feeds) drop the second message as a
duplicate.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from chatd.store.base import Store

#: What a removed message becomes when it is its session's newest.
TOMBSTONE = '{"type":"deleted","body":""}'
#: Key of the PostgreSQL advisory lock around schema creation ("mod" + issue 22).
_SCHEMA_LOCK = 0x6D6F6422

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS moderation_rules (
        id TEXT PRIMARY KEY,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        value TEXT NOT NULL,
        room TEXT,
        reason TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT,
        actor TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS moderation_retention (
        session_id TEXT PRIMARY KEY,
        max_count BIGINT,
        max_age_ms BIGINT
    )""",
]

_RULE_COLUMNS = "id, action, target, value, room, reason, created_ms, expires_ms, actor"


class RuleRow(NamedTuple):
    id: str
    action: str
    target: str
    value: str
    room: str | None
    reason: str
    created_ms: int
    expires_ms: int | None
    actor: str


def ensure_schema(store: Store) -> None:
    if store.mark == "%s":
        store.execute(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})", ())
    for statement in SCHEMA:
        store.execute(statement, ())


def load_rules(store: Store, now_ms: int) -> list[RuleRow]:
    """Every rule in force at ``now_ms``, oldest first; expired rows are deleted."""
    m = store.mark
    store.execute(f"DELETE FROM moderation_rules WHERE expires_ms IS NOT NULL "
                   f"AND expires_ms <= {m}", (now_ms,))
    rows = store.execute(f"SELECT {_RULE_COLUMNS} FROM moderation_rules "
                          "ORDER BY created_ms, id", ()).fetchall()
    return [RuleRow(*row) for row in rows]


def add_rule(store: Store, rule: RuleRow) -> None:
    marks = ", ".join([store.mark] * len(RuleRow._fields))
    store.execute(f"INSERT INTO moderation_rules ({_RULE_COLUMNS}) VALUES ({marks})",
                   tuple(rule))


def remove_rules(store: Store, ids: list[str]) -> None:
    for rule_id in ids:
        store.execute(f"DELETE FROM moderation_rules WHERE id = {store.mark}", (rule_id,))


def _newest(store: Store, session_id: str) -> int:
    row = store.execute(f"SELECT MAX(seq) FROM messages WHERE session_id = {store.mark}",
                         (session_id,)).fetchone()
    return row[0] or 0


def delete_message(store: Store, session_id: str, seq: int, sender: str) -> bool:
    """Remove message ``seq`` of the session (blank it if it is the newest,
    sent by ``sender``); False if there is no such message."""
    m = store.mark
    found = store.execute(f"SELECT message FROM messages WHERE session_id = {m} AND seq = {m}",
                           (session_id, seq)).fetchone()
    if found is None or found[0] == TOMBSTONE:
        return False
    if seq == _newest(store, session_id):
        store.execute(f"UPDATE messages SET message = {m}, sender_id = {m} "
                       f"WHERE session_id = {m} AND seq = {m}",
                       (TOMBSTONE, sender, session_id, seq))
    else:
        store.execute(f"DELETE FROM messages WHERE session_id = {m} AND seq = {m}",
                       (session_id, seq))
    return True


def erase_messages(store: Store, user_id: str, sender: str) -> int:
    """Remove every message ``user_id`` sent (blanking each session's newest
    one); how many."""
    m = store.mark
    rows = store.execute(f"SELECT session_id, seq FROM messages WHERE sender_id = {m}",
                          (user_id,)).fetchall()
    for session_id, seq in rows:
        delete_message(store, session_id, seq, sender)
    return len(rows)


def empty_session(store: Store, session_id: str, sender: str) -> int:
    """Remove every message of the session, whoever sent it, blanking the
    newest (its seq stays the highest stored); how many were removed."""
    m = store.mark
    newest = _newest(store, session_id)
    removed = _rowcount(store.execute(
        f"DELETE FROM messages WHERE session_id = {m} AND seq < {m}", (session_id, newest)))
    if newest and delete_message(store, session_id, newest, sender):
        removed += 1
    return removed


def set_retention(store: Store, session_id: str, max_count: int | None,
                  max_age_ms: int | None) -> None:
    m = store.mark
    store.execute(f"DELETE FROM moderation_retention WHERE session_id = {m}", (session_id,))
    if max_count is not None or max_age_ms is not None:
        store.execute(f"INSERT INTO moderation_retention (session_id, max_count, max_age_ms) "
                       f"VALUES ({m}, {m}, {m})", (session_id, max_count, max_age_ms))


def retention(store: Store) -> dict[str, tuple[int | None, int | None]]:
    """Per-session settings: session -> (max_count, max_age_ms)."""
    rows = store.execute("SELECT session_id, max_count, max_age_ms FROM moderation_retention",
                          ()).fetchall()
    return {session_id: (count, age) for session_id, count, age in rows}


def prune(store: Store, now_ms: int, max_count: int | None, max_age_ms: int | None) -> int:
    """Delete what retention no longer keeps, in every session: messages
    older than the age, and beyond the newest count (each session's own
    settings first, else these defaults). A session's newest message
    stays. How many rows were deleted."""
    m = store.mark
    overrides = retention(store)
    if max_count is None and max_age_ms is None:
        sessions = list(overrides)  # only those with settings of their own
    else:
        sessions = [row[0] for row in store.execute(
            "SELECT DISTINCT session_id FROM messages", ()).fetchall()]
    deleted = 0
    for session_id in sessions:
        count, age = overrides.get(session_id, (max_count, max_age_ms))
        newest = _newest(store, session_id)
        # Never the newest: its seq must stay the highest stored (see above).
        keep_from = newest
        if count is not None:
            keep_from = min(keep_from, newest - count + 1)
            deleted += _rowcount(store.execute(
                f"DELETE FROM messages WHERE session_id = {m} AND seq < {m}",
                (session_id, keep_from)))
        if age is not None:
            deleted += _rowcount(store.execute(
                f"DELETE FROM messages WHERE session_id = {m} AND seq < {m} "
                f"AND server_timestamp < {m}", (session_id, newest, now_ms - age)))
    return deleted


def _rowcount(cursor: Any) -> int:
    count = getattr(cursor, "rowcount", 0) if cursor is not None else 0
    return count if count and count > 0 else 0
