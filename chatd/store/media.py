"""What GradAgenda media keep in the store (issue 23; chatd.media).

Tables (schema migration 5 of both backends): ``media`` (``id``,
``owner``, ``content_type`` as sniffed, ``size``, ``data``, ``created_ms``)
and ``media_uses`` (``media_id``, ``session_id``: the session it was
uploaded for; ``seq`` is 0, kept for a later per-message link). On
PostgreSQL every node reads the same rows, so every node serves every file.

Each function is a job step taking the store (``Store.execute`` inside
``Store.run_batch``), in the SQL both backends share.
"""

from __future__ import annotations

from chatd.store.base import Store

#: Milliseconds an upload may wait for a message that refers to it before
#: ``sweep`` deletes it.
UNSENT_GRACE_MS = 60 * 60 * 1000


class Refused(str):
    """Why an upload is refused: (its text; ``status`` the HTTP status)."""

    status = 403


class OverQuota(Refused):
    status = 413


def add(store: Store, media_id: str, owner: str, session_id: str, content_type: str,
        data: bytes, now_ms: int, quota: int) -> Refused | None:
    """Store an upload of ``owner`` for the session, unless they are not a
    member of it or it would put them over ``quota`` bytes in all."""
    m = store.mark
    if store.execute(f"SELECT 1 FROM members WHERE session_id = {m} AND user_id = {m}",
                     (session_id, owner)).fetchone() is None:
        return Refused("not a member of this session")
    used = store.execute(f"SELECT COALESCE(SUM(size), 0) FROM media WHERE owner = {m}",
                         (owner,)).fetchone()[0]
    if used + len(data) > quota:
        return OverQuota(f"your media would take {used + len(data)} bytes, over your quota of "
                         f"{quota} (media-quota-bytes): delete messages with media first")
    store.execute(f"INSERT INTO media (id, owner, content_type, size, data, created_ms) "
                  f"VALUES ({m}, {m}, {m}, {m}, {m}, {m})",
                  (media_id, owner, content_type, len(data), data, now_ms))
    store.execute(f"INSERT INTO media_uses (media_id, session_id, seq) VALUES ({m}, {m}, 0)",
                  (media_id, session_id))
    return None


def fetch(store: Store, media_id: str, user: str) -> tuple[str, bytes] | bool:
    """(content type, bytes) if ``user`` is a member of a session the media
    was sent to; False if it exists but they are not; True if there is no
    such media."""
    m = store.mark
    row = store.execute(f"SELECT content_type, data FROM media WHERE id = {m}",
                        (media_id,)).fetchone()
    if row is None:
        return True
    allowed = store.execute(
        f"SELECT 1 FROM media_uses JOIN members ON members.session_id = media_uses.session_id "
        f"WHERE media_uses.media_id = {m} AND members.user_id = {m}", (media_id, user)).fetchone()
    if allowed is None:
        return False
    return row[0], bytes(row[1])


def sweep(store: Store, now_ms: int, grace_ms: int = UNSENT_GRACE_MS) -> int:
    """Delete media no stored message refers to any more (deleted with their
    messages: session deletion, retention, erasure), and uploads older than
    ``grace_ms`` that were never sent. How many."""
    pct = "%%" if store.mark == "%s" else "%"  # psycopg reads a lone % as a parameter
    orphans = store.execute(
        f"SELECT id FROM media WHERE created_ms < {store.mark} AND NOT EXISTS ("
        "SELECT 1 FROM media_uses JOIN messages ON messages.session_id = media_uses.session_id "
        "WHERE media_uses.media_id = media.id "
        f"AND messages.message LIKE '{pct}\"media-id\":\"' || media.id || '\"{pct}')",
        (now_ms - grace_ms,)).fetchall()
    for (media_id,) in orphans:
        store.execute(f"DELETE FROM media_uses WHERE media_id = {store.mark}", (media_id,))
        store.execute(f"DELETE FROM media WHERE id = {store.mark}", (media_id,))
    return len(orphans)
