"""The group-commit writer, shared by every backend.

One task takes every queued job, runs them in one transaction in the
store's own worker thread (``Store.run_batch``), then reports them all at
once: a burst of messages pays one commit (one fsync) per batch, not one
per message, and the router never waits for the database.

The thread lives as long as the writer runs (started by the first commit,
stopped when ``run`` ends or by ``aclose``): a batch is handed to it on a
queue and its result comes back through trio's token, with none of the
per-call set-up of ``trio.to_thread`` (a thread from the cache, naming it,
a capacity limiter, a copied context).

Failures (docs/storage.md):

- *transient* (``Store.is_transient``: locked, busy, connection lost
  before COMMIT, serialization failure, deadlock, server shutting down):
  nothing was stored, so the batch is run again, with jobs queued
  meanwhile joining it, after a growing pause (10 ms doubling to 250 ms),
  for up to ``store.busy_timeout`` seconds from the first failure. Past
  that the batch is reported failed with ``Failure(busy=True)`` and later
  jobs are tried afresh: writes resume by themselves once the store is back.
- *persistent* (anything else): logged once with its cause, reported with
  ``Failure(busy=False)``, and every later job is refused (fail-stop): what
  was confirmed is stored, and nothing more is confirmed until a restart
  reloads the committed state.

A batch is never run again after its COMMIT was sent: a COMMIT whose
outcome is unknown (the connection dropped) is persistent
(``CommitUnknown``), so no job is ever stored twice.

After a failed batch the writer pauses until the service has dealt with
it: ``resume()`` hands back every job queued meanwhile (they were accepted
against in-memory state that assumed the failed jobs would be stored) and
starts writing again.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import trio

from chatd.store.base import Store

log = logging.getLogger("chatd.store")

#: Seconds between the tries of a batch that failed transiently: doubling
#: from the first to the last.
RETRY_FIRST, RETRY_MAX = 0.01, 0.25


class Failure(NamedTuple):
    """Why a batch was not stored: ``busy`` (transient, past the busy
    timeout: try again later) or not (persistent: fail-stop); ``cause`` is
    the database's own words."""

    busy: bool
    cause: str


@dataclass(slots=True)
class Job:
    """One unit of store work: ``run`` in the writer's thread, inside the
    batch's transaction; then ``done(result)`` once it has committed, or
    ``failed(failure)`` if it was not stored. ``undo`` takes back the
    in-memory change the job's service made when queueing it; on a failure
    the service calls it, newest job first, before any ``failed``."""

    run: Callable[[Store], Any]
    done: Callable[[Any], None]
    failed: Callable[[Failure], None]
    undo: Callable[[], None] | None = None


#: ``report(jobs, results, failure)``: ``results`` (one per job) if the
#: batch committed, else None and the ``failure``.
Report = Callable[[list[Job], list[Any] | None, Failure | None], Awaitable[None]]


class Writer:
    def __init__(self, store: Store, report: Report, max_pending: int = 10_000) -> None:
        self.store = store
        self.report = report
        self.max_pending = max_pending
        #: Set by a persistent failure: every later job is refused.
        self.failure: Failure | None = None
        self.closed = False
        #: trio time of the first transient failure not yet followed by a
        #: commit, and its cause.
        self.busy_since: float | None = None
        self.busy_cause = ""
        #: Transactions committed and the jobs in them (logged at shutdown).
        self.commits = 0
        self.committed_jobs = 0
        self._queue: list[Job] = []
        #: Jobs in the batch being committed (or retried) now.
        self._in_flight = 0
        self._wakeup = trio.Event()
        self._lock = trio.Lock()
        self._paused = False
        self._resumed = trio.Event()
        self._probe: _Probe | None = None
        self._thread: _StoreThread | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None

    @property
    def accepting(self) -> bool:
        return not (self.failed or self.closed) and self.pending < self.max_pending

    @property
    def pending(self) -> int:
        """Jobs queued or being committed."""
        return len(self._queue) + self._in_flight

    def submit(self, job: Job) -> bool:
        """Queue a job without waiting; False if the writer cannot take it."""
        if not self.accepting:
            return False
        self._queue.append(job)
        self._wakeup.set()
        return True

    def resume(self) -> list[Job]:
        """After a reported failure: take back the jobs queued since, and
        write again. Call it from the same task that handles reports."""
        rest, self._queue = self._queue, []
        self._paused = False
        self._resumed.set()
        return rest

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                if self._paused:
                    await self._resumed.wait()
                await self.flush()
        finally:
            self._stop_thread()

    async def flush(self) -> None:
        """Commit everything queued so far (and wait for a commit under way)."""
        async with self._lock:
            self._wakeup = trio.Event()
            jobs, self._queue = self._queue, []
            if not jobs:
                return
            if self.failure is not None:
                results, failure = None, self.failure
            else:
                try:
                    results, failure = await self._commit(jobs)
                finally:
                    self._in_flight = 0
            if failure is not None and not self.closed:
                self._paused, self._resumed = True, trio.Event()
            await self.report(jobs, results, failure)

    async def _commit(self, jobs: list[Job]) -> tuple[list[Any] | None, Failure | None]:
        """Run ``jobs`` (extended in place by jobs that join while it is
        retried) in one transaction: (results, None) or (None, why not)."""
        name, deadline, pause = self.store.name, None, RETRY_FIRST
        while True:
            self._in_flight = len(jobs)
            try:
                if self._thread is None:
                    self._thread = _StoreThread(f"chatd-store-{name}")
                results = await self._thread.call(self.store.run_batch, [job.run for job in jobs])
            except Exception as exc:
                now = trio.current_time()
                if not self.store.is_transient(exc):
                    log.exception("store %s: commit of %d jobs failed; refusing further writes "
                                  "until restart", name, len(jobs))
                    self.failure = Failure(busy=False, cause=_one_line(exc))
                    return None, self.failure
                self.busy_cause = _one_line(exc)
                if self.busy_since is None:
                    self.busy_since = now
                    log.warning("store %s busy (%s): retrying for up to %g s", name,
                                self.busy_cause, self.store.busy_timeout)
                if deadline is None:
                    deadline = now + self.store.busy_timeout
                if now >= deadline:
                    log.warning("store %s still busy after %g s (%s): %d writes answered busy",
                                name, self.store.busy_timeout, self.busy_cause, len(jobs))
                    return None, Failure(busy=True, cause=self.busy_cause)
                await trio.sleep(min(pause, deadline - now))
                pause = min(pause * 2, RETRY_MAX)
                jobs += self._queue
                self._queue = []
                continue
            if self.busy_since is not None:
                log.warning("store %s takes writes again after %.1f s", name,
                            trio.current_time() - self.busy_since)
                self.busy_since = None
            self.commits += 1
            self.committed_jobs += len(jobs)
            return results, None

    async def ready(self, timeout: float = 2.0) -> str | None:
        """None if the store takes writes now, else why not (for /readyz).

        Answers at once while the store is failed, busy or the queue full;
        otherwise queues a probe (one tiny write, shared by concurrent
        callers) and waits up to ``timeout`` seconds for its commit."""
        reason = self._not_ready()
        if reason is not None:
            return reason
        if self._probe is None:
            probe = self._probe = _Probe()

            def finish(result: str | None) -> None:
                probe.result, self._probe = result, None
                probe.answered.set()

            job = Job(lambda store: store.probe(), lambda _: finish(None),
                      lambda failure: finish(_describe(failure)))
            if not self.submit(job):
                self._probe = None
                return self._not_ready() or "store writer closed"
        probe = self._probe
        with trio.move_on_after(timeout):
            await probe.answered.wait()
            return probe.result
        return self._not_ready() or f"store {self.store.name} did not commit within {timeout:g} s"

    def _not_ready(self) -> str | None:
        if self.failure is not None:
            return _describe(self.failure)
        if self.busy_since is not None:
            return f"store busy for {trio.current_time() - self.busy_since:.1f} s: {self.busy_cause}"
        if self.closed:
            return "store writer closed"
        if self.pending >= self.max_pending:
            return f"store write queue full ({self.max_pending} jobs)"
        return None

    async def aclose(self) -> None:
        """Refuse new work and commit everything already queued."""
        self.closed = True
        self._resumed.set()
        try:
            await self.flush()
        finally:
            self._stop_thread()
        log.info("store writer: %d jobs in %d transactions", self.committed_jobs, self.commits)

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None


class _StoreThread:
    """One thread that runs a store's calls one at a time, in order.

    ``call`` hands a function to the thread and waits, shielded from
    cancellation (a started commit always finishes and is reported), for
    its result or exception, which the thread passes back with
    ``TrioToken.run_sync_soon``. ``stop`` lets the thread end once the
    calls before it are done. Daemonic, so a writer never closed cannot
    keep the process alive.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    async def call(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """``fn(arg)`` in the thread: its result, or its exception raised here."""
        call = _Call(fn, arg)
        self._calls.put(call)
        with trio.CancelScope(shield=True):
            await call.done.wait()
        if call.error is not None:
            error, call.error = call.error, None
            raise error
        return call.result

    def stop(self) -> None:
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                call.result = call.fn(call.arg)
            except BaseException as exc:  # reported to the caller, whatever it is
                call.error = exc
            try:
                self._token.run_sync_soon(call.done.set)
            except trio.RunFinishedError:
                return  # trio is gone: nobody waits


class _Call:
    __slots__ = ("fn", "arg", "done", "result", "error")

    def __init__(self, fn: Callable[[Any], Any], arg: Any) -> None:
        self.fn, self.arg = fn, arg
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _Probe:
    """One readiness probe under way, shared by the callers waiting for it."""

    def __init__(self) -> None:
        self.answered = trio.Event()
        self.result: str | None = None


def _describe(failure: Failure) -> str:
    return f"store {'busy' if failure.busy else 'failed'}: {failure.cause}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
