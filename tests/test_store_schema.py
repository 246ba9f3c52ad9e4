"""The two stores' schemas say the same thing.

Each backend writes its migrations in its own SQL dialect
(``chatd/store/sqlite.py`` and ``chatd/store/postgres.py``: INTEGER or
BIGINT, ``WITHOUT ROWID``, identity columns, a PL/pgSQL function), so the
DDL is written twice; this test keeps the two from drifting: once
migrated, both have the same tables with the same columns, except what
PostgreSQL keeps for several nodes writing at once (listed below)."""

from __future__ import annotations

import sqlite3

import psycopg

from chatd.store import open_store
from tests.pg import pg_run_database, pg_url  # noqa: F401

#: What only the PostgreSQL store has, and why (docs/storage.md).
POSTGRES_ONLY = {
    # The schema version (SQLite keeps it in PRAGMA user_version).
    "chatd_schema": {"version"},
    # Each session's last seq, allocated under its lock by any node, and
    # its place in the lock order.
    "sessions": {"last_seq", "position"},
    # Each node's last batch of appends, to settle a COMMIT cut off.
    "writers": {"id", "batch", "result", "updated"},
}


def sqlite_columns(path: str) -> dict[str, set[str]]:
    db = sqlite3.connect(path)
    try:
        tables = [name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {table: {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                for table in tables}
    finally:
        db.close()


def postgres_columns(url: str) -> dict[str, set[str]]:
    columns: dict[str, set[str]] = {}
    with psycopg.connect(url) as conn:
        for table, column in conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema()"):
            columns.setdefault(table, set()).add(column)
    return columns


def test_both_stores_have_the_same_tables_and_columns(tmp_path, pg_url):
    path = str(tmp_path / "chatd.db")
    for location in (path, pg_url):
        store = open_store(location)
        store.lock()  # creates or migrates the schema
        store.close()
    lite, pg = sqlite_columns(path), postgres_columns(pg_url)
    for table, only in POSTGRES_ONLY.items():
        assert only <= pg.get(table, set()), f"{table}: {sorted(only - pg.get(table, set()))}"
        pg[table] = pg[table] - only
        if not pg[table]:
            del pg[table]
    assert lite == pg
