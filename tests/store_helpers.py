"""Helpers for the store tests: a writer's reports, jobs, waiting for a state."""

from __future__ import annotations

from collections.abc import Callable

import trio

from chatd.store import Job, Store
from tests.conftest import GUARD


class Reports:
    """Collects what a ``Writer`` reports and answers the jobs (as the
    sessions service does), and lets a test wait for it."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[Job], list | None, object]] = []
        self.changed = trio.Event()

    async def __call__(self, jobs, results, failure) -> None:
        self.batches.append((jobs, results, failure))
        for index, reported in enumerate(jobs):
            if results is None:
                reported.failed(failure)
            else:
                reported.done(results[index])
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        """Until ``count`` jobs in all have been reported."""
        with trio.fail_after(GUARD):
            while sum(len(jobs) for jobs, _, _ in self.batches) < count:
                await self.changed.wait()


def job(run) -> Job:
    return Job(run, done=lambda result: None, failed=lambda failure: None)


def add_messages(store: Store, session_id: str, count: int) -> None:
    """Messages ``"1"`` … ``"count"``, sent and stored at times 1 … count."""
    store.run_batch([lambda s, n=n: s.append_message(session_id, "a", f'"{n}"', n, n)
                     for n in range(1, count + 1)])


async def wait_until(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (a state another task or process reaches
    by itself, with no event to wait on), checked every 10 ms."""
    with trio.fail_after(GUARD):
        while not condition():
            await trio.sleep(0.01)
