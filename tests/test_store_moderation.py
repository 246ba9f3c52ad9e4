"""chatd.store.moderation on both backends: one schema, the same answers
(issue 22). Each step runs inside ``run_batch``, as the writer runs it."""

from __future__ import annotations

import pytest

from chatd.store import open_store
from chatd.store import moderation as db
from tests.pg import pg_run_database, pg_url  # noqa: F401


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        opened = open_store(str(tmp_path / "chatd.db"))
    else:
        opened = open_store(request.getfixturevalue("pg_url"))
    yield opened
    opened.close()


def run(store, step):
    return store.run_batch([step])[0]


def test_rules_are_stored_listed_expired_and_removed(store):
    run(store, db.ensure_schema)
    run(store, db.ensure_schema)  # idempotent: every start runs it
    forever = db.RuleRow("a1", "ban", "name", "mallory", None, "spam", 1000, None, "127.0.0.1")
    timed = db.RuleRow("b2", "mute", "address", "10.0.0.0/8", "lobby", "", 2000, 5000, "::1")
    run(store, lambda s: db.add_rule(s, forever))
    run(store, lambda s: db.add_rule(s, timed))
    assert run(store, lambda s: db.load_rules(s, 4999)) == [forever, timed]
    assert run(store, lambda s: db.load_rules(s, 5000)) == [forever]  # expired: deleted
    run(store, lambda s: db.remove_rules(s, ["a1"]))
    assert run(store, lambda s: db.load_rules(s, 0)) == []


def test_deletion_erasure_and_retention_keep_each_sessions_newest_seq(store):
    run(store, db.ensure_schema)

    def fill(s):
        s.create_session("g1", "mutable", ["alice", "bob"], 0)
        s.create_session("g2", "mutable", ["alice"], 0)
        for seq in range(1, 7):
            s.append_message("g1", "bob" if seq % 2 else "alice", '{"type":"text","body":"x"}',
                             seq, seq * 1000)
        s.append_message("g2", "bob", '{"type":"text","body":"y"}', 1, 1000)

    run(store, fill)
    assert run(store, lambda s: db.delete_message(s, "g1", 2, "chatd")) is True
    assert run(store, lambda s: db.delete_message(s, "g1", 2, "chatd")) is False
    assert run(store, lambda s: db.erase_messages(s, "bob", "chatd")) == 4  # 1, 3, 5 and g2's 1
    rows = run(store, lambda s: s.history("g1"))
    assert [(seq, sender) for seq, sender, *_ in rows] == [(4, "alice"), (6, "alice")]
    # g2's only message was its newest: blanked, not removed.
    assert run(store, lambda s: s.history("g2"))[0][1:3] == ("chatd", db.TOMBSTONE)
    assert run(store, lambda s: s.append_message("g2", "alice", "{}", 2, 2000)) == 2
    run(store, lambda s: db.set_retention(s, "g1", 1, None))
    assert run(store, db.retention) == {"g1": (1, None)}
    assert run(store, lambda s: db.prune(s, 10**13, None, None)) == 1  # g1 alone: its own setting
    assert [r[0] for r in run(store, lambda s: s.history("g1"))] == [6]
    assert run(store, lambda s: db.prune(s, 10**13, None, 1)) == 1  # every session by age
    assert [r[0] for r in run(store, lambda s: s.history("g2"))] == [2]


def test_emptying_a_session_removes_every_sender_and_keeps_its_seq(store):
    """erase-user's step for a direct session (which cannot be deleted):
    both sides' messages go, the newest blanked, and the next seq follows."""
    run(store, db.ensure_schema)

    def fill(s):
        s.create_session("d1", "direct", ["alice", "bob"], 0)
        for seq in range(1, 5):
            s.append_message("d1", "bob" if seq % 2 else "alice", '{"type":"text","body":"x"}',
                             seq, seq * 1000)

    run(store, fill)
    assert run(store, lambda s: db.empty_session(s, "d1", "chatd")) == 4
    rows = run(store, lambda s: s.history("d1"))
    assert [(seq, sender, message) for seq, sender, message, *_ in rows] == [
        (4, "chatd", db.TOMBSTONE)]
    assert run(store, lambda s: db.empty_session(s, "d1", "chatd")) == 0  # nothing left
    assert run(store, lambda s: s.append_message("d1", "bob", "{}", 5, 5000)) == 5
    assert run(store, lambda s: db.empty_session(s, "nothing", "chatd")) == 0
