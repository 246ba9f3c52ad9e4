"""The PostgreSQL store against real servers: migrations, several nodes on
one session, lost connections, a restarted server, an interrupted COMMIT.

The interface tests shared with SQLite are in tests/test_store.py.
"""

from __future__ import annotations

import logging
import re
import socket
import threading

import psycopg
import pytest
import trio

from chatd.sessions import STORE_RETRY, Sessions
from chatd.store import StoreError, Writer, open_store, read_setting
from chatd.store.postgres import MIGRATIONS, PostgresStore
from tests.abuse import still_serving
from tests.conftest import GUARD, free_port
from tests.pg import pg_private, pg_private_server, pg_run_database, pg_url  # noqa: F401
from tests.pg import with_database
from tests.store_helpers import Reports, job, wait_until
from tests.test_gradagenda import direct, failed, history, login, message


def test_a_new_database_gets_the_latest_schema_and_a_newer_one_is_refused(pg_url):
    store = open_store(pg_url)
    assert isinstance(store, PostgresStore) and store.schema_version == len(MIGRATIONS)
    store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE chatd_schema SET version = %s", (len(MIGRATIONS) + 1,))
    with pytest.raises(StoreError) as caught:
        open_store(pg_url)
    assert str(caught.value) == (
        f"store {store.name}: schema version {len(MIGRATIONS) + 1} is newer than this "
        f"chatd's ({len(MIGRATIONS)}): upgrade chatd")


def test_nodes_starting_at_once_migrate_once(pg_url):
    opened: list = []

    def node() -> None:
        opened.append(open_store(pg_url))

    threads = [threading.Thread(target=node) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GUARD)
    assert len(opened) == 4 and all(s.schema_version == len(MIGRATIONS) for s in opened)
    # Every node shares one generated secret.
    assert len({s.secret("jwt-secret")[0] for s in opened}) == 1
    for s in opened:
        s.close()


def test_seq_has_no_gaps_or_duplicates_while_several_nodes_append_to_one_session(pg_url):
    nodes = [open_store(pg_url) for _ in range(4)]
    nodes[0].run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
    allocated: list[list[int]] = [[] for _ in nodes]

    def append(index: int) -> None:
        for _ in range(20):
            allocated[index] += nodes[index].run_batch(
                [lambda s: s.append_message("g", f"node{index}", "{}", 0, 0)] * 5)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GUARD)
    every = sorted(seq for seqs in allocated for seq in seqs)
    assert every == list(range(1, 401))
    for seqs in allocated:  # each node's own appends are in its commit order
        assert seqs == sorted(seqs)
    rows = nodes[1].run_batch([lambda s: s.history("g", after=0, limit=1000)])[0]
    assert [row[0] for row in rows] == every
    for node in nodes:
        node.close()


def test_batches_locking_sessions_in_opposite_orders_on_two_nodes_never_deadlock(pg_url):
    """Issue 18: each node's batch writes several sessions in whatever
    order its jobs came; two nodes with opposite orders, many times at
    once, all commit, and PostgreSQL counts no deadlock."""
    nodes = [open_store(pg_url) for _ in range(2)]
    names = [f"s{n}" for n in range(6)]
    nodes[0].run_batch([lambda s, n=n: s.create_session(n, "mutable", ["a"], 1) for n in names])
    errors: list[BaseException] = []

    def write(index: int) -> None:
        order = names if index == 0 else names[::-1]
        try:
            for round_ in range(40):
                # Members changed too: every kind of write takes the lock.
                nodes[index].run_batch(
                    [lambda s, n=n: s.append_message(n, f"node{index}", "{}", 0, 0)
                     for n in order[round_ % 3:]]
                    + [lambda s: s.set_members(order[0], ["a", f"node{index}"])])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * GUARD)
    assert errors == []
    with psycopg.connect(pg_url) as conn:
        for name in names:
            seqs = [row[0] for row in conn.execute(
                "SELECT seq FROM messages WHERE session_id = %s ORDER BY seq", (name,))]
            assert seqs == list(range(1, len(seqs) + 1))
        assert conn.execute("SELECT deadlocks FROM pg_stat_database "
                            "WHERE datname = current_database()").fetchone()[0] == 0
    for node in nodes:
        node.close()


def test_a_node_that_last_wrote_a_session_learns_of_other_nodes_writes(pg_url):
    """A node counts on from what it last stored only after checking, in
    its COMMIT, that nobody wrote the session since: another node's
    message or membership change since is seen, and seq stays gap-free."""
    one, two = open_store(pg_url), open_store(pg_url)
    one.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
    assert one.run_batch([lambda s: s.append_checked("g", "a", "{}", 0, 0, 0)]) == [(1, None)]
    assert two.run_batch([lambda s: s.append_checked("g", "b", "{}", 0, 0, 0)]) == [(2, None)]
    assert one.run_batch([lambda s: s.append_checked("g", "a", "{}", 0, 0, 0)]) == [(3, None)]
    assert two.run_batch([lambda s: s.set_members("g", ["a", "c"])]) == [(3, 1)]
    [(seq, members)] = one.run_batch([lambda s: s.append_checked("g", "a", "{}", 0, 0, 0)])
    assert (seq, sorted(members)) == (4, ["a", "c"])
    assert one.run_batch([lambda s: s.append_checked("g", "a", "{}", 0, 0, 1)]) == [(5, None)]
    two.run_batch([lambda s: s.delete_session("g")])
    assert one.run_batch([lambda s: s.append_checked("g", "a", "{}", 0, 0, 1)]) == [
        (None, None)]
    one.close()
    two.close()


def test_a_batch_of_appends_gets_each_session_s_seqs_in_job_order(pg_url):
    """A batch of appends alone is sent as one statement at its end: each
    append still gets its session's next seq in the order of the jobs,
    None for a session that is gone, and the members when the sender's
    version is not the session's; a read in the batch sees the appends
    before it (issue 18)."""
    one, two = open_store(pg_url), open_store(pg_url)
    one.run_batch([lambda s, n=n: s.create_session(n, "mutable", ["a"], 1)
                   for n in ("s1", "s2", "s3")])
    two.run_batch([lambda s: s.set_members("s3", ["a", "b"])])
    assert one.run_batch([
        lambda s: s.append_checked("s2", "a", '"1"', 0, 0, 0),
        lambda s: s.append_checked("s1", "a", '"2"', 0, 0, 0),
        lambda s: s.append_message("gone", "a", '"3"', 0, 0),
        lambda s: s.append_checked("s2", "a", '"4"', 0, 0, 0),
        lambda s: (s.append_checked("s3", "a", '"5"', 0, 0, 0), "kept"),
        lambda s: s.append_checked("s3", "a", '"6"', 0, 0, 1),
    ]) == [(1, None), (1, None), None, (2, None), ((1, ["a", "b"]), "kept"), (2, None)]
    [seq, rows, after] = one.run_batch([
        lambda s: s.append_message("s1", "a", '"7"', 0, 0),
        lambda s: s.history("s1", after=0),
        lambda s: s.append_message("s1", "a", '"8"', 0, 0)])
    assert (seq, [(r[0], r[2]) for r in rows], after) == (2, [(1, '"2"'), (2, '"7"')], 3)
    # A read of another session (a feed filling a gap) runs apart and
    # reads what is committed; the appends around it still commit.
    two.run_batch([lambda s: s.append_message("s2", "b", '"9"', 0, 0)])
    [first, rows, counts, last] = one.run_batch([
        lambda s: s.append_message("s1", "a", '"10"', 0, 0),
        lambda s: s.history("s2", after=1),
        lambda s: s.count_sent("s2"),
        lambda s: s.append_message("s1", "a", '"11"', 0, 0)])
    assert (first, [(r[0], r[1], r[2]) for r in rows], counts, last) == (
        4, [(2, "a", '"4"'), (3, "b", '"9"')], {"a": 2, "b": 1}, 5)
    one.close()
    two.close()


def test_a_deleted_session_takes_its_messages_with_it(pg_url):
    """No foreign key ties messages to sessions (migration 6): deleting a
    session deletes its messages itself, so a session created again
    under the same id starts empty at seq 1."""
    store = open_store(pg_url)
    store.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
    store.run_batch([lambda s: s.append_message("g", "a", '"old"', 0, 0)] * 3)
    store.run_batch([lambda s: s.delete_session("g")])
    store.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 2)])
    assert store.run_batch([lambda s: s.append_message("g", "a", '"new"', 0, 0)]) == [1]
    assert [(r[0], r[2]) for r in store.run_batch([lambda s: s.history("g")])[0]] == [
        (1, '"new"')]
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    store.close()


def test_a_database_of_schema_4_keeps_its_messages_when_migrated(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE chatd_schema (version INTEGER NOT NULL)")
        for script in MIGRATIONS[:4]:
            conn.execute(script)
        conn.execute("INSERT INTO chatd_schema VALUES (4)")
        conn.execute("INSERT INTO sessions (id, kind, created_ms, last_seq) "
                     "VALUES ('g', 'mutable', 1, 2)")
        conn.execute("INSERT INTO members (session_id, user_id) VALUES ('g', 'a')")
        conn.execute("INSERT INTO messages VALUES ('g', 1, 'a', '\"x\"', 1, 1), "
                     "('g', 2, 'a', '\"y\"', 2, 2)")
    store = open_store(pg_url)
    assert store.schema_version == len(MIGRATIONS) == 6
    assert store.run_batch([lambda s: s.append_message("g", "a", '"z"', 3, 3)]) == [3]
    assert [r[2] for r in store.run_batch([lambda s: s.history("g")])[0]] == [
        '"x"', '"y"', '"z"']
    store.close()


@pytest.mark.parametrize("make, reason", [
    (lambda url: f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/test",
     "cannot connect: connection to server at \"127.0.0.1\", port"),
    (lambda url: with_database(url, "no_such_database_here"),
     'database "no_such_database_here" does not exist'),
    (lambda url: url.replace("postgres@", "nobody_at_all:hunter2@", 1),
     'role "nobody_at_all" does not exist'),
])
def test_an_unusable_database_is_one_line_without_the_password(pg_url, make, reason):
    url = make(pg_url)
    with pytest.raises(StoreError) as caught:
        open_store(url)
    text = str(caught.value)
    assert text.startswith("store postgresql://") and reason in text
    assert "hunter2" not in text and "\n" not in text


def test_postgres_urls_with_either_scheme_and_tools_read_without_migrating(pg_url):
    store = open_store(pg_url.replace("postgresql://", "postgres://", 1))
    value, _ = store.secret("jwt-secret")
    store.close()
    assert read_setting(pg_url, "jwt-secret") == value


async def test_a_killed_connection_is_reopened_and_the_write_goes_through(pg_url, nursery):
    store = open_store(pg_url, busy_timeout=GUARD)
    reports = Reports()
    writer = Writer(store, reports)
    await nursery.start(writer.run)
    store.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
    with psycopg.connect(pg_url, autocommit=True) as admin:
        killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND application_name = "
                               "'chatd'").fetchall()
    assert killed == [(True,)]
    writer.submit(job(lambda s: s.append_message("g", "a", "{}", 1, 1)))
    await reports.wait_for(1)
    assert reports.batches[0][1:] == ([1], None)
    store.close()


class CommitCutter:
    """A TCP relay to PostgreSQL on 127.0.0.1 that, once ``armed``, cuts
    the first connection that sends COMMIT (or ``chatd_append``, which
    commits): with ``drop="answer"`` the
    COMMIT reaches the server and its answer is lost; with
    ``drop="commit"`` the COMMIT itself is lost. Either way the client
    cannot know the outcome. Later connections are relayed untouched."""

    def __init__(self, port: int, drop: str = "answer") -> None:
        self.upstream = port
        self.drop = drop
        self.refuse_after_cut = False
        self._held: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        #: While set, new connections are closed at once (server unreachable).
        self.refuse = threading.Event()
        #: While set, nothing is relayed either way and new connections
        #: are accepted but never answered: a black-holed path.
        self.frozen = threading.Event()
        self.cuts = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refuse.is_set():
                client.close()
                continue
            if self.frozen.is_set():
                self._held.append(client)  # open, silent
                continue
            server = socket.create_connection(("127.0.0.1", self.upstream))
            cut = threading.Event()  # this connection's
            seen: dict = {}
            threading.Thread(target=self._pump, args=(client, server, True, cut, seen),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False, cut, seen),
                             daemon=True).start()

    def _claim(self, data: bytes, seen: dict) -> bool:
        """Whether ``data`` is the COMMIT to cut (once): a COMMIT, or the
        execution of a batch of appends sent as one statement, its own
        transaction (``chatd_append``, prepared: parsed once per
        connection, then executed by Bind and Execute messages without its
        text). ``seen``: this connection's state."""
        parsed = re.search(rb"P.{4}([^\x00]+)\x00SELECT chatd_append\(", data, re.DOTALL)
        if parsed:
            seen["append"] = parsed[1]
        # A Bind message (unnamed portal) of chatd_append's prepared statement.
        executes = "append" in seen and re.search(
            rb"B.{4}\x00" + re.escape(seen["append"]) + rb"\x00", data, re.DOTALL) is not None
        with self._lock:
            if self.armed.is_set() and (b"COMMIT" in data or executes):
                self.armed.clear()
                self.cuts += 1
                return True
            return False

    def _pump(self, source: socket.socket, sink: socket.socket, to_server: bool,
              cut: threading.Event, seen: dict) -> None:
        try:
            while data := source.recv(65536):
                while self.frozen.is_set():  # a black hole: hold the data
                    self.frozen_wait.wait()
                if cut.is_set():
                    break
                if to_server and self._claim(data, seen):
                    cut.set()
                    if self.refuse_after_cut:
                        self.refuse.set()
                    if self.drop == "commit":
                        break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if to_server:  # the last of the pair to use them (the other has ended)
            source.close()
            sink.close()

    def freeze(self) -> None:
        self.thawed = threading.Event()
        self.frozen.set()

    def thaw(self) -> None:
        self.frozen.clear()
        self.thawed.set()
        for sock in self._held:
            sock.close()
        self._held.clear()

    @property
    def frozen_wait(self) -> threading.Event:
        return self.thawed

    def close(self) -> None:
        self.listener.close()


def appending(path: str, message: str, sent: int):
    """A job appending ``message`` to session g: alone, so that the batch
    is one statement (``chatd_append``, resolved through ``writers``), or
    after a read, so that it is a transaction (resolved by its id)."""
    if path == "one statement":
        return lambda s: s.append_message("g", "a", message, sent, sent)
    return lambda s: (s.history("g"), s.append_message("g", "a", message, sent, sent))[1]


@pytest.mark.parametrize("path", ["one statement", "transaction"])
@pytest.mark.parametrize("drop, stored", [("answer", "committed"), ("commit", "rolled back")])
async def test_a_commit_cut_off_is_resolved_and_answered_as_it_ended(pg_url, nursery, caplog,
                                                                     drop, stored, path):
    """Whether the COMMIT reached the server or not, the writer learns what
    became of it: each message is confirmed once (with its seq) and stored
    once, and the writer goes on writing (issue 18)."""
    port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
    cutter = CommitCutter(port, drop)
    store = open_store(pg_url.replace(f":{port}/", f":{cutter.port}/"), busy_timeout=GUARD)
    store.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
    reports = Reports()
    writer = Writer(store, reports)
    await nursery.start(writer.run)
    cutter.armed.set()
    caplog.set_level(logging.INFO, "chatd.store")
    writer.submit(job(appending(path, '"once"', 1)))
    await reports.wait_for(1)
    assert cutter.cuts == 1
    [(_, results, failure)] = reports.batches
    assert (results, failure) == ([1], None) and not writer.failed
    assert any(f"COMMIT cut off" in r.message and stored in r.message for r in caplog.records)
    writer.submit(job(appending(path, '"next"', 2)))
    await reports.wait_for(2)
    assert reports.batches[1][1:] == ([2], None)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT seq, message FROM messages ORDER BY seq").fetchall() == [
            (1, '"once"'), (2, '"next"')]
    store.close()
    cutter.close()


@pytest.mark.parametrize("path", ["one statement", "transaction"])
@pytest.mark.parametrize("warm", [False, True])
async def test_a_commit_cut_off_while_the_server_stays_unreachable_is_answered_busy(
        pg_url, nursery, caplog, warm, path):
    """The server unreachable for the whole busy timeout after a COMMIT
    was cut off: the batch is answered busy (never run again, the writer
    keeps writing), and once the server answers what became of it is
    logged: here it had committed. ``warm``: the node wrote the session
    before; ``path``: see ``appending``."""
    port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
    cutter = CommitCutter(port, "answer")
    cutter.refuse_after_cut = True
    store = open_store(pg_url.replace(f":{port}/", f":{cutter.port}/"), busy_timeout=1.0)
    store.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
    first = 1
    if warm:
        store.run_batch([lambda s: s.append_message("g", "a", '"warm"', 0, 0)])
        first = 2
    reports = Reports()
    writer = Writer(store, reports)
    await nursery.start(writer.run)
    caplog.set_level(logging.INFO, "chatd.store")
    cutter.armed.set()
    writer.submit(job(appending(path, '"cut"', 1)))
    await reports.wait_for(1)
    [(_, results, failure)] = reports.batches
    assert results is None and failure.busy and "may or may not be stored" in failure.cause
    assert not writer.failed
    cutter.refuse.clear()
    writer.resume()
    writer.submit(job(appending(path, '"next"', 2)))
    await reports.wait_for(2)
    assert reports.batches[1][1:] == ([first + 1], None)
    assert any("answered 'storage busy', did commit" in r.message
               or "answered 'storage busy' did commit" in r.message for r in caplog.records)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT seq, message FROM messages WHERE seq >= %s ORDER BY seq",
                            (first,)).fetchall() == [(first, '"cut"'), (first + 1, '"next"')]
    store.close()
    cutter.close()


async def test_a_black_holed_path_is_answered_busy_within_the_bound_then_writes_resume(
        pg_url, nursery, caplog):
    """Every packet to and from the server silently dropped (an open
    connection that never answers, new connections never answered): each
    write is answered busy after the busy timeout plus the documented
    margin, not left waiting; once the path is back writes commit again
    by themselves, and the loss and the return are logged once each."""
    port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
    relay = CommitCutter(port)
    store = open_store(pg_url.replace(f":{port}/", f":{relay.port}/"), busy_timeout=1.0)
    store.run_batch([lambda s: s.create_session("g", "mutable", ["a"], 1)])
    reports = Reports()
    writer = Writer(store, reports)
    await nursery.start(writer.run)
    caplog.set_level(logging.INFO, "chatd.store")
    relay.freeze()
    writer.submit(job(lambda s: s.append_message("g", "a", '"lost"', 1, 1)))
    # The bound: busy timeout + 2 s (connect) + busy timeout (a COMMIT cut
    # off); the guard only stops a hung test, it is not what is checked.
    with trio.fail_after(GUARD):
        await reports.wait_for(1)
    [(_, results, failure)] = reports.batches
    assert results is None and failure.busy
    relay.thaw()
    writer.resume()
    writer.submit(job(lambda s: s.append_message("g", "a", '"back"', 2, 2)))
    await reports.wait_for(2)
    assert reports.batches[1][1] is not None
    messages = [r.message for r in caplog.records]
    assert sum(" lost (" in m for m in messages) == 1
    assert sum(" is back: " in m for m in messages) == 1
    store.close()
    relay.close()


# --- chatd on PostgreSQL, end to end -----------------------------------------------------


async def start(chat, url: str, busy_timeout: float = GUARD):
    server = await chat.start(store=url, store_busy_timeout=busy_timeout)
    # Until server.py opens the store with open_store(busy_timeout=...).
    server.store.busy_timeout = busy_timeout
    return server, next(s for s in server.services if isinstance(s, Sessions))


async def test_gradagenda_on_postgres_stores_and_answers_with_the_committed_seq(chat, pg_url):
    server, sessions = await start(chat, pg_url)
    alice, bob = await login(chat, "alice"), await login(chat, "bob")
    pair = (await direct(alice, "bob"))["session-id"]
    for n in range(1, 4):
        await alice.send(message(pair, f"#{n}", cdid=str(n)))
        assert (await alice.recv())["seq"] == n
        assert (await bob.recv())["message"]["body"] == f"#{n}"
    assert [m["seq"] for m in await history(bob, pair)] == [1, 2, 3]
    assert await sessions.ready() is None


async def test_a_restarted_postgres_fails_writes_clearly_then_they_resume(chat, pg_private):
    url = with_database(pg_private.url, "chatd")
    server, sessions = await start(chat, url, busy_timeout=1.0)
    alice, bob = await login(chat, "alice"), await login(chat, "bob")
    pair = (await direct(alice, "bob"))["session-id"]
    await alice.send(message(pair, "before", cdid="m1"))
    assert (await alice.recv())["seq"] == 1
    assert (await bob.recv())["message"]["body"] == "before"

    await trio.to_thread.run_sync(pg_private.stop)
    await alice.send(message(pair, "while down", cdid="m2"))
    assert await failed(alice, "m2") == STORE_RETRY
    assert (await sessions.ready()).startswith("store busy for ")
    await still_serving(chat)  # the lobbies never needed the store

    await trio.to_thread.run_sync(pg_private.start)
    await alice.send(message(pair, "after", cdid="m3"))
    confirmed = await alice.recv()
    assert (confirmed["cdid"], confirmed["seq"]) == ("m3", 2)
    assert (await bob.recv())["message"]["body"] == "after"
    assert [m["message"]["body"] for m in await history(bob, pair)] == ["before", "after"]
    await wait_until(lambda: sessions.writer.busy_since is None)
    assert await sessions.ready() is None
