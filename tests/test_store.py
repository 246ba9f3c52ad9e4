"""The SQLite store: schema migrations, session queries and the group-committing writer."""

from __future__ import annotations

import sqlite3

import pytest
import trio

from chatd.store import MIGRATIONS, Job, Store, Writer


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "chatd.db"))
    yield s
    s.close()


def test_a_new_file_gets_the_latest_schema_in_wal_mode(store):
    assert store.schema_version == len(MIGRATIONS)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_an_old_file_is_migrated_and_keeps_its_data(tmp_path):
    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + "INSERT INTO settings VALUES ('jwt-secret', 'kept');"
                     "PRAGMA user_version=1;")
    db.close()
    store = Store(path)
    try:
        assert store.schema_version == len(MIGRATIONS)
        assert store.secret("jwt-secret") == ("kept", False)
        store.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
        assert store.load_sessions() == [("g", "mutable", ["a"], 0)]
    finally:
        store.close()


def test_a_file_from_a_newer_chatd_is_refused(tmp_path):
    path = str(tmp_path / "new.db")
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(path)


def add_messages(store: Store, session_id: str, count: int) -> None:
    store.run_batch([lambda s, n=n: s.append_message(session_id, n, "a", f'"{n}"', n, n)
                     for n in range(1, count + 1)])


def test_history_pages_oldest_first(store):
    store.run_batch([lambda s: s.create_session("g", "mutable", ["a", "b"], 1)])
    add_messages(store, "g", 10)

    def seqs(**kw):
        return [row[0] for row in store.history("g", **kw)]

    assert seqs(limit=3) == [8, 9, 10]
    assert seqs(before=4) == [1, 2, 3]
    assert seqs(after=7) == [8, 9, 10]
    assert seqs(after=2, limit=2) == [3, 4]
    assert seqs(after=2, before=5) == [3, 4]
    assert store.history("g", after=9) == [(10, "a", '"10"', 10, 10)]


def test_sessions_load_with_members_and_last_seq_and_deletion_cascades(store):
    store.run_batch([lambda s: s.create_session("one", "mutable", ["a", "b"], 1),
                     lambda s: s.create_session("two", "direct", ["a", "c"], 2)])
    add_messages(store, "one", 3)
    store.run_batch([lambda s: s.set_members("one", ["b", "d"])])
    loaded = {sid: (kind, sorted(members), last) for sid, kind, members, last in
              store.load_sessions()}
    assert loaded == {"one": ("mutable", ["b", "d"], 3), "two": ("direct", ["a", "c"], 0)}
    store.run_batch([lambda s: s.delete_session("one")])
    assert [row[0] for row in store.load_sessions()] == ["two"]
    assert store.history("one") == []
    assert store.db.execute("SELECT COUNT(*) FROM members WHERE session_id='one'").fetchone() == (0,)


class Reports:
    """Collects what the writer reports, and lets a test wait for it."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[Job], list | None]] = []
        self.changed = trio.Event()

    async def __call__(self, jobs, results) -> None:
        self.batches.append((jobs, results))
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(10):
            while sum(len(jobs) for jobs, _ in self.batches) < count:
                await self.changed.wait()


def job(run) -> Job:
    return Job(run, done=lambda result: None, failed=lambda: None)


async def test_a_burst_is_committed_in_one_transaction_and_answered_in_order(store, nursery):
    reports = Reports()
    writer = Writer(store, reports)
    store.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
    for n in range(1, 101):
        assert writer.submit(job(lambda s, n=n: s.append_message("g", n, "a", "{}", n, n) or n))
    await nursery.start(writer.run)
    await reports.wait_for(100)
    assert writer.commits == 1
    [(jobs, results)] = reports.batches
    assert results == list(range(1, 101))
    assert [row[0] for row in store.history("g", after=0)] == list(range(1, 101))


async def test_a_failed_commit_stores_nothing_and_stops_all_writes(store, nursery):
    reports = Reports()
    writer = Writer(store, reports)
    writer.submit(job(lambda s: s.create_session("g", "mutable", ["a"], 1)))
    writer.submit(job(lambda s: s.create_session("g", "mutable", ["a"], 1)))  # duplicate id
    await nursery.start(writer.run)
    await reports.wait_for(2)
    assert reports.batches[0][1] is None
    assert store.load_sessions() == []
    assert writer.failed and not writer.submit(job(lambda s: None))


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
