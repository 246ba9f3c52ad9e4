"""Store failures: what cannot be opened, one server per file, and a store
that another process locks for a while (issue #9 item 11, issue #11)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import trio

from chatd.sessions import STORE_RETRY, Sessions
from chatd.store import StoreError, Writer, open_store, read_setting
from tests.abuse import still_serving
from tests.conftest import GUARD
from tests.store_helpers import Reports, job, wait_until
from tests.test_config import run_cli
from tests.test_gradagenda import answers, direct, failed, login, message

# --- opening: one line naming the store and the reason -------------------------------


def not_sqlite(tmp_path) -> str:
    path = tmp_path / "notes.txt"
    path.write_text("these are my notes, not a database\n" * 40)
    return str(path)


def under_a_file(tmp_path) -> str:
    (tmp_path / "plain").write_text("")
    return str(tmp_path / "plain" / "x.db")


@pytest.mark.parametrize("make, reason", [
    (lambda tmp: "/nonexistent/dir/x.db", "directory /nonexistent/dir does not exist"),
    (lambda tmp: str(tmp), "is a directory, not a SQLite file"),
    (not_sqlite, "not a SQLite database"),
    (under_a_file, "is not a directory"),
])
def test_a_store_that_cannot_be_opened_is_one_line_and_exit_1(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(StoreError) as caught:
        open_store(path)
    assert str(caught.value).startswith(f"store {path}: ") and reason in str(caught.value)
    result = run_cli("serve", "--host", "127.0.0.1:0", "--store", path, cwd=tmp_path)
    assert result.returncode == 1
    # Refused before anything starts, as check-config refuses it (test_preflight.py).
    assert result.stderr.startswith(f"chatd: store {path}: ") and reason in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def open_as_another_user(path: str) -> str:
    """The StoreError text that opening ``path`` gives a process without
    root's privileges (root reads and writes any file)."""
    if os.geteuid() != 0:
        try:
            open_store(path).close()
        except StoreError as exc:
            return str(exc)
        return "opened"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, try, report, leave
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            try:
                open_store(path).close()
                text = "opened"
            except StoreError as exc:
                text = str(exc)
            os.write(write, text.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return text


@pytest.fixture
def shared_dir():
    """A directory that another user can enter (pytest's tmp_path is private)."""
    path = tempfile.mkdtemp()
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def test_permission_denied_on_the_file_or_its_directory_is_one_line(shared_dir):
    store = os.path.join(shared_dir, "chatd.db")
    open_store(store).close()
    os.chmod(store, 0o600)
    if os.geteuid() == 0:
        os.chown(store, 0, 0)  # another user's file
    else:
        os.chmod(store, 0o000)
    assert open_as_another_user(store) == (
        f"store {store}: permission denied (chatd must read and write it)")
    locked_dir = os.path.join(shared_dir, "ro")
    os.mkdir(locked_dir, 0o555)
    new = os.path.join(locked_dir, "chatd.db")
    assert open_as_another_user(new) == (
        f"store {new}: permission denied on directory {locked_dir} (chatd must create files in it)")


# --- one store, one server ---------------------------------------------------------------


def test_a_second_opener_of_a_locked_file_is_told_who_holds_it(tmp_path):
    path = str(tmp_path / "chatd.db")
    first = open_store(path)
    try:
        with pytest.raises(StoreError) as caught:
            open_store(path)
        assert str(caught.value) == (f"store {path}: in use by another chatd (pid {os.getpid()}); "
                                     "one store serves one server")
        # A tool that only reads does not need the lock.
        first.secret("jwt-secret")
        assert read_setting(path, "jwt-secret") == first.setting("jwt-secret")
    finally:
        first.close()
    open_store(path).close()  # released on close


def test_memory_stores_are_never_locked():
    first, second = open_store(":memory:"), open_store(":memory:")
    first.close()
    second.close()


async def test_a_second_server_on_the_same_file_refuses_to_start_naming_the_first(process,
                                                                                   tmp_path):
    store = str(tmp_path / "shared.db")
    first = process("serve", "--host", "127.0.0.1:0", "--store", store)
    await trio.to_thread.run_sync(first.start)
    result = await trio.to_thread.run_sync(
        lambda: run_cli("serve", "--host", "127.0.0.1:0", "--store", store, cwd=tmp_path))
    assert result.returncode == 1
    assert (f"cannot start: store {store}: in use by another chatd (pid {first.proc.pid})"
            in result.stderr)
    assert "Traceback" not in result.stderr
    # chatd token still reads the running server's secret.
    token = await trio.to_thread.run_sync(
        lambda: run_cli("token", "alice", "--store", store, cwd=tmp_path))
    assert token.returncode == 0 and token.stdout.count(".") == 2
    assert await trio.to_thread.run_sync(first.stop) == 0


# --- a store locked by another process for a while -------------------------------------------

HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


class LockHolder:
    """Another process holding SQLite's write lock on a file until released."""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, path], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == "locked\n"

    @classmethod
    async def hold(cls, path: str) -> LockHolder:
        return await trio.to_thread.run_sync(cls, path)

    async def release(self) -> None:
        def release() -> None:
            self.proc.communicate("\n", timeout=GUARD)
            assert self.proc.returncode == 0

        await trio.to_thread.run_sync(release)


async def test_the_writer_retries_while_locked_and_commits_once_the_lock_clears(tmp_path,
                                                                                nursery):
    store = open_store(str(tmp_path / "chatd.db"), busy_timeout=GUARD)
    writer = Writer(store, Reports())
    await nursery.start(writer.run)
    store.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
    holder = await LockHolder.hold(store.path)
    writer.submit(job(lambda s: s.append_message("g", "a", "{}", 1, 1)))
    await wait_until(lambda: writer.busy_since is not None)
    assert (await writer.ready()).startswith("store busy for ")
    writer.submit(job(lambda s: s.append_message("g", "a", "{}", 2, 2)))  # joins the retry
    await holder.release()
    await writer.report.wait_for(2)
    [(jobs, results, failure)] = writer.report.batches
    assert failure is None and results == [1, 2]
    assert await writer.ready() is None
    store.close()


async def test_past_the_busy_timeout_jobs_fail_busy_and_later_ones_commit(tmp_path, nursery):
    store = open_store(str(tmp_path / "chatd.db"), busy_timeout=0.3)
    reports = Reports()
    writer = Writer(store, reports)
    await nursery.start(writer.run)
    holder = await LockHolder.hold(store.path)
    writer.submit(job(lambda s: s.create_session("g", "mutable", ["a"], 1)))
    await reports.wait_for(1)
    [(_, results, failure)] = reports.batches
    assert results is None and failure.busy and "locked" in failure.cause
    assert not writer.failed and writer.resume() == []
    await holder.release()
    writer.submit(job(lambda s: s.create_session("g", "mutable", ["a"], 1)))
    await reports.wait_for(2)
    assert reports.batches[1][2] is None
    assert store.load_sessions() == [("g", "mutable", {"a": 0}, 0)]
    store.close()


async def test_writes_waiting_on_a_busy_store_count_against_the_queue_limit(tmp_path,
                                                                             nursery):
    store = open_store(str(tmp_path / "chatd.db"), busy_timeout=GUARD)
    writer = Writer(store, Reports(), max_pending=2)
    await nursery.start(writer.run)
    holder = await LockHolder.hold(store.path)
    assert writer.submit(job(lambda s: None)) and writer.submit(job(lambda s: None))
    await wait_until(lambda: writer.busy_since is not None)
    assert not writer.submit(job(lambda s: None))  # memory stays bounded while it waits
    await holder.release()
    await writer.report.wait_for(2)
    assert writer.submit(job(lambda s: None))
    store.close()


def sessions_of(server) -> Sessions:
    return next(s for s in server.services if isinstance(s, Sessions))


async def test_a_briefly_locked_store_answers_busy_then_writes_resume_by_themselves(
        chat, tmp_path):
    """Issue #9 item 11: a lock held longer than store-busy-timeout fails the
    writes meanwhile with 'busy'; once it clears, writes go on, no restart."""
    server = await chat.start(store_busy_timeout=0.3)
    # Until server.py opens the store with open_store(busy_timeout=...).
    server.store.busy_timeout = server.config.store_busy_timeout
    sessions = sessions_of(server)
    alice, bob = await login(chat, "alice"), await login(chat, "bob")
    pair = (await direct(alice, "bob"))["session-id"]
    holder = await LockHolder.hold(server.store.path)
    await alice.send(message(pair, "while locked", cdid="m1"))
    assert await failed(alice, "m1") == STORE_RETRY
    await alice.send({"type": "request-mutable-session-creation", "cdid": "c1",
                      "user-id": ["bob"]})
    assert await failed(alice, "c1") == STORE_RETRY
    assert (await sessions.ready()).startswith("store busy for ")
    await holder.release()
    await alice.send(message(pair, "after the lock", cdid="m2"))
    confirmed = await alice.recv()
    assert (confirmed["cdid"], confirmed["seq"]) == ("m2", 1)  # no gap left by m1
    # Bob got only the stored message, and was never told of the failed group.
    assert (await bob.recv())["message"]["body"] == "after the lock"
    await bob.send({"type": "request-mutable-session-listing", "cdid": "ls"})
    assert (await answers(bob, "ls"))[0] == []
    assert await sessions.ready() is None
    await still_serving(chat)
