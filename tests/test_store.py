"""The store interface on both backends (a real SQLite file, a real
PostgreSQL database), the SQLite schema, and the group-commit writer.

PostgreSQL's own guarantees (several nodes, restarts) are in
tests/test_store_postgres.py; failures (locks, busy, open errors) in
tests/test_store_failures.py.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest
import trio

from chatd.store import SQLiteStore, StoreError, Writer, open_store
from chatd.store.sqlite import MIGRATIONS
from tests.pg import pg_run_database, pg_url  # noqa: F401 (fixtures)
from tests.store_helpers import Reports, add_messages, job, wait_until


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A new store of each backend."""
    if request.param == "sqlite":
        url = str(tmp_path / "chatd.db")
    else:
        url = request.getfixturevalue("pg_url")
    s = open_store(url)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path):
    s = open_store(str(tmp_path / "chatd.db"))
    yield s
    s.close()


def test_a_new_file_gets_the_latest_schema_in_wal_mode(sqlite_store):
    store = sqlite_store
    assert isinstance(store, SQLiteStore)
    assert store.schema_version == len(MIGRATIONS)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_an_old_file_is_migrated_and_keeps_its_data(tmp_path):
    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + "INSERT INTO settings VALUES ('jwt-secret', 'kept');"
                     "PRAGMA user_version=1;")
    db.close()
    store = open_store(path)
    try:
        assert store.schema_version == len(MIGRATIONS)
        assert store.secret("jwt-secret") == ("kept", False)
        store.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
        assert store.load_sessions() == [("g", "mutable", {"a": 0}, 0)]
    finally:
        store.close()


def test_a_file_from_a_newer_chatd_is_refused_in_one_line(tmp_path):
    path = str(tmp_path / "new.db")
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(StoreError) as caught:
        open_store(path)
    assert str(caught.value) == (f"store {path}: schema version {len(MIGRATIONS) + 1} is newer "
                                 f"than this chatd's ({len(MIGRATIONS)}): upgrade chatd")


def test_history_pages_oldest_first(store):
    store.run_batch([lambda s: s.create_session("g", "mutable", ["a", "b"], 1)])
    add_messages(store, "g", 10)

    def seqs(**kw):
        return [row[0] for row in store.run_batch([lambda s: s.history("g", **kw)])[0]]

    assert seqs(limit=3) == [8, 9, 10]
    assert seqs(before=4) == [1, 2, 3]
    assert seqs(after=7) == [8, 9, 10]
    assert seqs(after=2, limit=2) == [3, 4]
    assert seqs(after=2, before=5) == [3, 4]
    assert store.run_batch([lambda s: s.history("g", after=9)]) == [[(10, "a", '"10"', 10, 10)]]


def test_seq_is_allocated_per_session_in_the_transaction_without_gaps(store):
    store.run_batch([lambda s: s.create_session("one", "mutable", ["a"], 1),
                     lambda s: s.create_session("two", "mutable", ["a"], 1)])
    interleaved = [lambda s, sid=sid: s.append_message(sid, "a", "{}", 0, 0)
                   for sid in ("one", "two", "one", "one", "two")]
    assert store.run_batch(interleaved) == [1, 1, 2, 3, 2]

    def boom(_):
        raise ValueError("a job fails after an append")

    with pytest.raises(ValueError):
        store.run_batch([lambda s: s.append_message("one", "a", "{}", 0, 0), boom])
    # The rolled-back append left no gap behind.
    assert store.run_batch([lambda s: s.append_message("one", "a", "{}", 0, 0)]) == [4]


def test_one_batch_sees_its_own_messages_in_order_whatever_comes_between(store):
    store.run_batch([lambda s: s.create_session("one", "mutable", ["a"], 1),
                     lambda s: s.create_session("two", "mutable", ["a"], 1)])

    def append(sid, n):
        return lambda s: s.append_message(sid, "a", f'"{n}"', n, n)

    jobs = [append("one", n) for n in range(1, 151)]          # more than one INSERT holds
    jobs.append(lambda s: [row[0] for row in s.history("one", after=148)])
    jobs += [append("two", 1), lambda s: s.delete_session("two"),
             lambda s: s.create_session("two", "mutable", ["a"], 2), append("two", 2),
             append("one", 151)]
    results = store.run_batch(jobs)
    assert results[:150] == list(range(1, 151))
    assert results[150] == [149, 150]                          # read mid-batch: all before it
    assert results[151:] == [1, None, None, 1, 151]            # made again: counts from 1
    history = store.run_batch([lambda s: s.history("one", limit=100),
                               lambda s: s.history("two")])
    assert [(seq, text) for seq, _, text, _, _ in history[0]] == \
        [(n, f'"{n}"') for n in range(52, 152)]
    assert [(seq, text) for seq, _, text, _, _ in history[1]] == [(1, '"2"')]


def test_a_batch_of_messages_refused_by_a_lock_is_retried_without_a_gap(sqlite_store):
    store = sqlite_store
    store.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
    add_messages(store, "g", 2)
    other = sqlite3.connect(store.path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    with pytest.raises(sqlite3.OperationalError) as refused:
        store.run_batch([lambda s: s.append_message("g", "a", '"x"', 3, 3)])
    assert store.is_transient(refused.value)
    other.execute("ROLLBACK")
    other.close()
    assert store.run_batch([lambda s: s.append_message("g", "a", '"y"', 4, 4)]) == [3]
    assert [row[:3] for row in store.run_batch([lambda s: s.history("g")])[0]] == \
        [(1, "a", '"1"'), (2, "a", '"2"'), (3, "a", '"y"')]


def test_stores_that_do_not_hold_the_lock_count_seq_afresh_each_batch(tmp_path):
    # Two connections without the one-server lock (as tools open the file):
    # neither may trust a seq it counted in an earlier batch.
    path = str(tmp_path / "shared.db")
    one, two = (SQLiteStore(path, lock=False) for _ in range(2))
    try:
        one.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
        seqs = [store.run_batch([lambda s: s.append_message("g", "a", "{}", 0, 0)])[0]
                for store in (one, two, one, two)]
        assert seqs == [1, 2, 3, 4]
    finally:
        one.close()
        two.close()


def test_an_append_to_a_deleted_session_stores_nothing_and_the_batch_commits(store):
    store.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
    results = store.run_batch([lambda s: s.delete_session("g"),
                               lambda s: s.append_message("g", "a", "{}", 0, 0),
                               lambda s: s.set_members("g", ["a", "b"]),
                               lambda s: s.create_session("h", "mutable", ["b"], 2)])
    assert results == [None, None, None, None]
    assert store.load_sessions() == [("h", "mutable", {"b": 0}, 0)]


def test_creating_a_direct_session_twice_changes_nothing(store):
    for _ in range(2):
        store.run_batch([lambda s: s.create_session("direct-x", "direct", ["a", "b"], 1)])
    assert store.load_sessions() == [("direct-x", "direct", {"a": 0, "b": 0}, 0)]


def test_sessions_load_with_members_and_deletion_cascades(store):
    store.run_batch([lambda s: s.create_session("one", "mutable", ["a", "b"], 1),
                     lambda s: s.create_session("two", "direct", ["a", "c"], 2)])
    add_messages(store, "one", 3)
    # Members who stay keep when they joined; new ones join after message 3.
    assert store.run_batch([lambda s: s.set_members("one", ["b", "d"])]) == [(3, 1)]
    loaded = {row.id: (row.kind, row.members, row.version) for row in store.load_sessions()}
    assert loaded == {"one": ("mutable", {"b": 0, "d": 3}, 1),
                      "two": ("direct", {"a": 0, "c": 0}, 0)}
    add_messages(store, "one", 1)
    assert store.run_batch([lambda s: s.set_members("one", ["a", "d"])]) == [(4, 2)]
    assert store.load_sessions()[0].members == {"a": 4, "d": 3}
    store.run_batch([lambda s: s.delete_session("one")])
    assert [row[0] for row in store.load_sessions()] == ["two"]
    assert store.run_batch([lambda s: s.history("one")]) == [[]]
    # Its members went with it: the same id made again starts empty.
    store.run_batch([lambda s: s.create_session("one", "mutable", [], 3)])
    assert ("one", "mutable", {}, 0) in store.load_sessions()


def test_a_generated_secret_is_kept(store, tmp_path):
    value, new = store.secret("jwt-secret")
    assert new and len(value) >= 32
    assert store.secret("jwt-secret") == (value, False)


async def test_a_burst_is_committed_in_one_transaction_and_answered_in_order(store, nursery):
    reports = Reports()
    writer = Writer(store, reports)
    store.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
    for n in range(1, 101):
        assert writer.submit(job(lambda s, n=n: s.append_message("g", "a", "{}", n, n)))
    await nursery.start(writer.run)
    await reports.wait_for(100)
    assert writer.commits == 1
    [(jobs, results, failure)] = reports.batches
    assert failure is None and results == list(range(1, 101))


async def test_a_persistent_failure_stores_nothing_and_stops_all_writes(store, nursery, caplog):
    reports = Reports()
    writer = Writer(store, reports)
    writer.submit(job(lambda s: s.create_session("g", "mutable", ["a"], 1)))
    writer.submit(job(lambda s: s.create_session("h", "bogus-kind", ["a"], 1)))  # CHECK fails
    await nursery.start(writer.run)
    await reports.wait_for(2)
    [(jobs, results, failure)] = reports.batches
    assert results is None and not failure.busy and "check constraint" in failure.cause.lower()
    assert store.load_sessions() == []
    assert writer.failed and not writer.submit(job(lambda s: None))
    assert (await writer.ready()).startswith("store failed: ")
    assert [r.name for r in caplog.records if r.levelname == "ERROR"] == ["chatd.store"]


async def test_closing_commits_everything_queued(store):
    reports = Reports()
    writer = Writer(store, reports)
    writer.submit(job(lambda s: s.create_session("g", "mutable", ["a"], 1)))
    await writer.aclose()
    assert [row[0] for row in store.load_sessions()] == ["g"]
    assert not writer.submit(job(lambda s: None))


async def test_a_full_queue_refuses_instead_of_growing(store):
    writer = Writer(store, Reports(), max_pending=2)
    assert writer.submit(job(lambda s: None)) and writer.submit(job(lambda s: None))
    assert not writer.accepting and not writer.submit(job(lambda s: None))
    assert "queue full" in await writer.ready()


async def test_a_healthy_store_is_ready_after_a_probe_write(store, nursery):
    reports = Reports()
    writer = Writer(store, reports)
    await nursery.start(writer.run)
    assert await writer.ready() is None
    assert store.setting("probed-at") is not None


def store_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("chatd-store-")]


@pytest.mark.parametrize("end", ["cancelled", "closed"])
async def test_the_writer_has_one_thread_for_its_life_and_none_after(store, end):
    reports = Reports()
    writer = Writer(store, reports)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for n in range(3):  # three batches, one after the other
            writer.submit(job(lambda s: None))
            await reports.wait_for(n + 1)
        assert len(reports.batches) == 3 and len(store_threads()) == 1
        if end == "closed":
            await writer.aclose()
        nursery.cancel_scope.cancel()
    await wait_until(lambda: not store_threads())
