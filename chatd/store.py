"""The durable store: one SQLite file (WAL), created and migrated here.

The schema carries a version number (``PRAGMA user_version``); each entry
of ``MIGRATIONS`` moves it one step, so an old file is brought up to date
on start-up. Connections and queries are synchronous; the server runs
them off the trio thread (see ``chatd.sessions`` for the writer task).
"""

from __future__ import annotations

import logging
import secrets
import sqlite3

log = logging.getLogger("chatd.store")

MIGRATIONS: list[str] = [
    # 1: server settings, e.g. the secrets generated for the embedded default.
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
]


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

    def close(self) -> None:
        self.db.close()


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the open transaction first; run the
    # statements one by one so a migration and its version bump are atomic.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)
