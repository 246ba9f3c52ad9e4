"""Shared by the fault tests: proof that the server still serves, lifted limits."""

from __future__ import annotations

import itertools
import logging

import pytest

from chatd.config import Config
from tests.conftest import Harness

_names = itertools.count()


async def still_serving(chat: Harness) -> None:
    """Two fresh clients chat: what a user would check after an attack."""
    n = next(_names)
    alice = await chat.multichat(f"after-{n}-a")
    bob = await chat.multichat(f"after-{n}-b")
    await alice.send({"action": "client-message", "content": f"still here {n}"})
    assert await bob.recv() == {"action": "forwarding-message",
                                "source-client-name": f"after-{n}-a",
                                "content": f"still here {n}"}
    await alice.close()
    await bob.close()


def no_rate_limits() -> dict:
    """Overrides lifting the per-connection message rate limit, so a test can
    see how the protocols and the router bear a flood on their own (the
    limit itself is tested in test_limits.py)."""
    wanted = {"message_rate": 1e9, "message_burst": 10**9}
    return {k: v for k, v in wanted.items() if k in Config.__struct_fields__}


@pytest.fixture(autouse=True)
def no_tracebacks(caplog):
    """Fails a test whose attack made the server log an error: bad input must
    be handled, not merely survived. Import it into a test module to use it."""
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    formatter = logging.Formatter("%(name)s: %(message)s")
    assert not errors, "server logged errors:\n" + "\n".join(map(formatter.format, errors))
