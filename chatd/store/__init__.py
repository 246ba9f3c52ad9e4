"""The durable store: one interface, a backend per file, one writer.

- ``base.py``: ``Store``, the interface ``chatd.sessions`` uses, and
  ``StoreError``;
- ``sqlite.py``: ``SQLiteStore``, a file (or ``:memory:``), one server;
- ``postgres.py``: ``PostgresStore``, one database shared by many nodes;
- ``writer.py``: ``Writer``, group commit with bounded retries.

``open_store(url)`` picks the backend from the ``store`` config value.
docs/storage.md describes both for operators.
"""

from __future__ import annotations

import re

from chatd.store.base import CommitUnknown, Store, StoreError
from chatd.store.sqlite import SQLiteStore, check_sqlite_path, probe_sqlite_file
from chatd.store.writer import Failure, Job, Writer

__all__ = ["CommitUnknown", "Failure", "Job", "SQLiteStore", "Store", "StoreError", "Writer",
           "check_store", "open_store", "read_setting"]


def open_store(url: str, *, busy_timeout: float = 5.0, lock: bool = True) -> Store:
    """Open the store the ``store`` config value names, ready for a server.

    ``postgresql://USER@HOST:PORT/DB`` (or ``postgres://``) is PostgreSQL;
    anything else is a SQLite file path, or ``:memory:``. ``busy_timeout``
    (config ``store-busy-timeout``, seconds) bounds the retries of a
    transient failure. With ``lock`` the store is first made this
    process's alone (SQLite files; ``Store.lock``), then its schema is
    created or migrated.

    Raises ``StoreError``, whose message is the one line to print (it names
    the store, never a password, and the reason).
    """
    if _is_postgres(url):
        return _postgres_class(url)(url, busy_timeout=busy_timeout, lock=lock)
    return SQLiteStore(url, busy_timeout=busy_timeout, lock=lock)


def check_store(url: str) -> None:
    """What ``open_store(url)`` would refuse before it opens anything: for
    PostgreSQL, psycopg installed; for a SQLite file, a path where the file
    can be created or opened for reading and writing (the checks its
    constructor runs first), and an existing file that is a SQLite database
    with a schema this chatd knows (read from its header). Writes nothing.
    Raises ``StoreError``."""
    if _is_postgres(url):
        _postgres_class(url)
    elif url != ":memory:":
        check_sqlite_path(url, create=True)
        probe_sqlite_file(url)


def read_setting(url: str, key: str) -> str | None:
    """One ``settings`` value of an existing store, e.g. the ``jwt-secret``
    a running server generated, for tools such as ``chatd token``: no lock,
    no migration, nothing written. Raises ``StoreError`` if the store is
    missing or unusable."""
    if _is_postgres(url):
        store: Store = _postgres_class(url)(url, lock=False, migrate=False)
    else:
        store = SQLiteStore(url, lock=False, migrate=False)
    try:
        return store.setting(key)
    finally:
        store.close()


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def _postgres_class(url: str) -> type[Store]:
    try:
        from chatd.store.postgres import PostgresStore
    except ImportError:
        shown = re.sub(r":[^:@/]*@", "@", url)  # no password
        raise StoreError(f"store {shown}: PostgreSQL needs psycopg: "
                         "pip install 'chatd[cluster]'") from None
    return PostgresStore
