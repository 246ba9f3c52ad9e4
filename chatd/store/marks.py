"""What GradAgenda delivery and read marks keep in the store (issue 23).

Tables (schema migration 5 of both backends):

- ``marks``: per session and user, ``delivered_seq`` and ``read_seq``
  (0: nothing yet). No foreign key to ``sessions``: on PostgreSQL a
  referencing insert would lock the session's row outside the advisory
  lock order (chatd.store.postgres), so ``forget`` runs in the deleting job;
- ``mark_settings``: users who turned read marks off (``read_marks_off`` 1).

Each function is a job step taking the store (``Store.execute`` inside
``Store.run_batch``), in the SQL both backends share.
"""

from __future__ import annotations

from chatd.store.base import Store

#: A mark as members see it: (user id, delivered seq, read seq or None when
#: the user turned read marks off).
Shown = tuple[str, int, int | None]

_UPSERT = ("INSERT INTO marks (session_id, user_id, delivered_seq, read_seq) "
           "VALUES ({m}, {m}, {m}, {m}) ON CONFLICT (session_id, user_id) DO UPDATE SET "
           "delivered_seq = CASE WHEN excluded.delivered_seq > marks.delivered_seq "
           "THEN excluded.delivered_seq ELSE marks.delivered_seq END, "
           "read_seq = CASE WHEN excluded.read_seq > marks.read_seq "
           "THEN excluded.read_seq ELSE marks.read_seq END")


def advance(store: Store, session_id: str, user: str, delivered: int | None,
            read: int | None) -> tuple[Shown, Shown]:
    """Move ``user``'s marks in the session forward (never back; never past
    the session's newest message; read implies delivered): the marks as
    members see them (before, after)."""
    m = store.mark
    newest = store.execute(f"SELECT MAX(seq) FROM messages WHERE session_id = {m}",
                           (session_id,)).fetchone()[0] or 0
    row = store.execute(f"SELECT delivered_seq, read_seq FROM marks WHERE session_id = {m} "
                        f"AND user_id = {m}", (session_id, user)).fetchone()
    old_delivered, old_read = row if row is not None else (0, 0)
    new_read = max(old_read, min(read or 0, newest))
    new_delivered = max(old_delivered, min(delivered or 0, newest), new_read)
    if (new_delivered, new_read) != (old_delivered, old_read):
        store.execute(_UPSERT.format(m=m), (session_id, user, new_delivered, new_read))
    off = read_marks_off(store, user)
    return ((user, old_delivered, None if off else old_read),
            (user, new_delivered, None if off else new_read))


def read_marks_off(store: Store, user: str) -> bool:
    row = store.execute(f"SELECT read_marks_off FROM mark_settings WHERE user_id = {store.mark}",
                        (user,)).fetchone()
    return bool(row and row[0])


def set_read_marks(store: Store, user: str, enabled: bool) -> None:
    m = store.mark
    store.execute(f"DELETE FROM mark_settings WHERE user_id = {m}", (user,))
    if not enabled:
        store.execute(f"INSERT INTO mark_settings (user_id, read_marks_off) VALUES ({m}, 1)",
                      (user,))


def shown(store: Store, session_ids: list[str]) -> dict[str, list[Shown]]:
    """The sessions' marks as members see them, by session, in user-id order."""
    found: dict[str, list[Shown]] = {}
    m = store.mark
    for session_id in session_ids:
        rows = store.execute(
            "SELECT marks.user_id, delivered_seq, read_seq, read_marks_off FROM marks "
            "LEFT JOIN mark_settings ON mark_settings.user_id = marks.user_id "
            f"WHERE session_id = {m} ORDER BY marks.user_id", (session_id,)).fetchall()
        if rows:
            found[session_id] = [(user, delivered, None if off else read)
                                 for user, delivered, read, off in rows]
    return found


def forget(store: Store, session_id: str) -> None:
    """Delete the session's marks (with the session)."""
    store.execute(f"DELETE FROM marks WHERE session_id = {store.mark}", (session_id,))
