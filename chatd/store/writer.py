"""The group-commit writer, shared by every backend.

The store's own thread takes every queued job, runs them in one
transaction (``Store.run_batch``), hands the outcome back to trio and
goes straight on with the jobs queued meanwhile: a burst of messages pays
one commit (one fsync) per batch, not one per message, the next batch
starts as soon as the last has committed, without waiting for the event
loop, and the router never waits for the database. In trio, the writer
task reports each batch (``report``), in commit order.

Jobs reach the thread through a thread-safe queue at once (``submit``);
the outcomes come back through the trio token. The thread lives as long
as ``run`` (and ``aclose``, which commits what is left), without the
per-call set-up of ``trio.to_thread``.

Failures (docs/storage.md) stop the thread until the writer task has
decided what next:

- *transient* (``Store.is_transient``: locked, busy, connection lost
  before COMMIT, serialization failure, deadlock, server shutting down):
  nothing was stored, so the batch is run again, with jobs queued
  meanwhile joining it, after a growing pause (10 ms doubling to 250 ms),
  until ``store.busy_timeout`` seconds after its first try began (each
  try is given that deadline: ``Store.run_batch`` cuts off what still
  hangs then). Past that the batch is reported failed with
  ``Failure(busy=True)`` and later jobs are tried afresh: writes resume by
  themselves once the store is back. The store being lost is logged once
  (WARNING) and its return once (INFO).
- *persistent* (anything else): logged once with its cause, reported with
  ``Failure(busy=False)``, and every later job is refused (fail-stop): what
  was confirmed is stored, and nothing more is confirmed until a restart
  reloads the committed state.

A batch is never run again after its COMMIT may have succeeded: a COMMIT
whose outcome the store could not learn (``CommitUnknown``: the
connection dropped and the server stayed out of reach) is reported
``Failure(busy=True)`` without a retry, and writing goes on; no job is
ever stored twice.

After a failed batch the writer pauses until the service has dealt with
it: ``resume()`` hands back every job queued meanwhile (they were accepted
against in-memory state that assumed the failed jobs would be stored) and
starts writing again.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import trio

from chatd.store.base import CommitUnknown, Store

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
    """``on_commit(seconds)``: called from the writer's thread with the time
    each committed batch took (``chatd_store_commit_seconds``)."""

    def __init__(self, store: Store, report: Report, max_pending: int = 10_000,
                 on_commit: Callable[[float], None] | None = None) -> None:
        self.store = store
        self.report = report
        self.max_pending = max_pending
        self.on_commit = on_commit
        #: Set by a persistent failure: every later job is refused.
        self.failure: Failure | None = None
        self.closed = False
        #: ``time.monotonic()`` of the first transient failure not yet
        #: followed by a commit, and its cause.
        self.busy_since: float | None = None
        self.busy_cause = ""
        #: Jobs answered busy since the store was lost (logged when back).
        self.busy_answered = 0
        #: Transactions committed and the jobs in them (logged at shutdown).
        self.commits = 0
        self.committed_jobs = 0
        #: Jobs submitted and not reported yet.
        self._pending = 0
        #: Jobs for the thread, in order (and a thread's own stop token).
        self._jobs: queue.SimpleQueue[Job | _WriterThread] = queue.SimpleQueue()
        self._outcomes_in, self._outcomes = trio.open_memory_channel[_Outcome](math.inf)
        #: Held while an outcome is taken and handled, so that they are
        #: reported in order whoever handles them (``run`` or ``aclose``).
        self._lock = trio.Lock()
        #: After a failure: the thread waits for ``resume``.
        self._paused = False
        self._probe: _Probe | None = None
        self._thread: _WriterThread | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None

    @property
    def accepting(self) -> bool:
        return not (self.failed or self.closed) and self._pending < self.max_pending

    @property
    def pending(self) -> int:
        """Jobs queued or being committed."""
        return self._pending

    def submit(self, job: Job) -> bool:
        """Queue a job without waiting; False if the writer cannot take it."""
        if not self.accepting:
            return False
        self._pending += 1
        self._jobs.put(job)
        return True

    def resume(self) -> list[Job]:
        """After a reported failure: take back the jobs queued since, and
        write again. Call it from the same task that handles reports."""
        rest = self._take_queued()
        self._pending -= len(rest)
        if self._paused:
            self._paused = False
            if self._thread is not None:
                self._thread.go()
        return rest

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Report every batch the thread commits (or fails), in order."""
        self._running_thread()
        task_status.started()
        try:
            while True:
                async with self._lock:
                    await self._settle(await self._outcomes.receive())
        finally:
            with trio.CancelScope(shield=True):
                await self._stop_thread()

    async def flush(self) -> None:
        """Wait until everything queued so far is committed and reported
        (or failed)."""
        while self._pending:
            if self._paused:
                # A failure the service has not dealt with: what waits is
                # tried again, or refused after a persistent failure.
                self._paused = False
                if self.failure is not None:
                    jobs = self._take_queued()
                    self._pending -= len(jobs)
                    await self.report(jobs, None, self.failure)
                    continue
                if self._thread is not None:
                    self._thread.go()
            async with self._lock:
                if self._pending and not self._paused:
                    self._running_thread()
                    await self._settle(await self._outcomes.receive())

    async def _settle(self, outcome: _Outcome) -> None:
        """Handle one batch's outcome: report it, after retrying it while
        the store is busy; on a failure, pause the thread."""
        jobs, results, error, deadline = outcome
        try:
            failure = None
            if error is not None:
                results, failure = await self._retry(jobs, error, deadline)
            if failure is None:
                if self.busy_since is not None:
                    log.info("store %s is back: takes writes again after %.1f s "
                             "(%d writes answered busy meanwhile)", self.store.name,
                             time.monotonic() - self.busy_since, self.busy_answered)
                    self.busy_since = None
                    self.busy_answered = 0
                self.commits += 1
                self.committed_jobs += len(jobs)
            else:
                self._paused = True  # until resume(), or flush() when closing
        finally:
            self._pending -= len(jobs)  # reported, or abandoned by a cancellation
        await self.report(jobs, results, failure)

    async def _retry(self, jobs: list[Job], error: BaseException, deadline: float
                     ) -> tuple[list[Any] | None, Failure | None]:
        """The thread waits: run the batch again, extended in place by jobs
        queued meanwhile, while it fails transiently, until ``deadline``
        (its first try's start plus the busy timeout). (results, None) once
        it commits, else (None, why not)."""
        name, pause = self.store.name, RETRY_FIRST
        while error is not None:
            now = time.monotonic()
            if isinstance(error, CommitUnknown):
                # Never run again; the store logs what it became once known.
                self._lost(error, now)
                log.warning("%s: %d writes answered busy", _one_line(error), len(jobs))
                self.busy_answered += len(jobs)
                return None, Failure(busy=True, cause=_one_line(error))
            if not self.store.is_transient(error):
                log.error("store %s: commit of %d jobs failed; refusing further writes "
                          "until restart", name, len(jobs), exc_info=error)
                self.failure = Failure(busy=False, cause=_one_line(error))
                return None, self.failure
            self._lost(error, now)
            if now >= deadline:
                log.debug("store %s still busy after %g s (%s): %d writes answered busy",
                          name, self.store.busy_timeout, self.busy_cause, len(jobs))
                self.busy_answered += len(jobs)
                return None, Failure(busy=True, cause=self.busy_cause)
            await trio.sleep(min(pause, deadline - now))
            pause = min(pause * 2, RETRY_MAX)
            jobs += self._take_queued()
            self._running_thread().retry(jobs, deadline)
            _, results, error, _ = await self._outcomes.receive()
        return results, None

    def _lost(self, error: BaseException, now: float) -> None:
        """Note a transient failure; the first since the last commit is
        logged, once, as the store being lost."""
        self.busy_cause = _one_line(error)
        if self.busy_since is None:
            self.busy_since = now
            log.warning("store %s lost (%s): retrying each write for up to %g s, then "
                        "answering it 'storage busy', until the store is back",
                        self.store.name, self.busy_cause, self.store.busy_timeout)

    def _take_queued(self) -> list[Job]:
        """The jobs the thread has not taken (it waits after a failure)."""
        jobs = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return jobs
            if isinstance(job, Job):
                jobs.append(job)

    async def ready(self, timeout: float = 2.0) -> str | None:
        """None if the store takes writes now, else why not (for /readyz).

        Answers at once while the store is failed, busy or the queue full;
        otherwise queues a probe (one tiny write, shared by concurrent
        callers) and waits up to ``timeout`` seconds for its commit."""
        reason = self._not_ready()
        # Busy with nothing queued: only a write can tell whether the store
        # is back, so probe it (else /readyz would say busy until a client
        # wrote, and a load balancer sends no client to a node not ready).
        retest = self.busy_since is not None and self.failure is None and not self.pending
        if reason is not None and not retest:
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
            return None if probe.result is None else self._not_ready() or probe.result
        return self._not_ready() or f"store {self.store.name} did not commit within {timeout:g} s"

    def _not_ready(self) -> str | None:
        if self.failure is not None:
            return _describe(self.failure)
        if self.busy_since is not None:
            return f"store busy for {time.monotonic() - self.busy_since:.1f} s: {self.busy_cause}"
        if self.closed:
            return "store writer closed"
        if self._pending >= self.max_pending:
            return f"store write queue full ({self.max_pending} jobs)"
        return None

    async def aclose(self) -> None:
        """Refuse new work and commit everything already queued."""
        self.closed = True
        try:
            await self.flush()
        finally:
            with trio.CancelScope(shield=True):
                await self._stop_thread()
        log.info("store writer: %d jobs in %d transactions", self.committed_jobs, self.commits)

    def _running_thread(self) -> _WriterThread:
        if self._thread is None:
            self._thread = _WriterThread(self.store, self._jobs, self._outcomes_in,
                                         f"chatd-store-{self.store.name}", self.on_commit)
        return self._thread

    async def _stop_thread(self) -> None:
        """End the thread once the jobs queued before are committed. What
        nobody reported (the writer task was cancelled) is abandoned, as a
        cancelled report is: stored or not, never answered."""
        thread, self._thread = self._thread, None
        if thread is not None:
            await thread.stop()
        while True:
            try:
                jobs, _, _, _ = self._outcomes.receive_nowait()
            except trio.WouldBlock:
                return
            self._pending -= len(jobs)


#: What the thread reports of one batch: (jobs, results, None, deadline)
#: if it committed, (jobs, None, the exception, deadline) if not; its
#: ``deadline`` (``time.monotonic()``) is its first try's start plus the
#: busy timeout.
_Outcome = tuple[list[Job], list[Any] | None, BaseException | None, float]


class _WriterThread:
    """The thread that runs batches: every job queued, in one transaction,
    again and again, with no wait between batches.

    After a failed batch it waits for the writer task's word: ``retry``
    (run these jobs now) or ``go`` (take queued jobs again). ``stop`` ends
    it once the jobs queued before are committed (or at once if it waits
    after a failure). Daemonic, so a writer never closed cannot keep the
    process alive.
    """

    def __init__(self, store: Store, jobs: queue.SimpleQueue,
                 outcomes: trio.MemorySendChannel[_Outcome], name: str,
                 on_commit: Callable[[float], None] | None = None) -> None:
        self._store = store
        self._jobs = jobs
        self._on_commit = on_commit
        self._outcomes = outcomes
        self._orders: queue.SimpleQueue[tuple[list[Job], float] | bool] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._stopped = trio.Event()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def retry(self, jobs: list[Job], deadline: float) -> None:
        self._orders.put((jobs, deadline))

    def go(self) -> None:
        self._orders.put(True)

    async def stop(self) -> None:
        self._jobs.put(self)      # taken after the jobs queued before it
        self._orders.put(False)   # if it waits after a failure
        await self._stopped.wait()

    def _serve(self) -> None:
        try:
            while (batch := self._take()) is not None:
                deadline = time.monotonic() + self._store.busy_timeout
                while batch:
                    if self._run(batch, deadline):
                        break
                    order = self._orders.get()  # failed: wait for the writer task
                    if order is False:
                        return
                    batch, deadline = order if order is not True else (None, 0.0)
        finally:
            self._report(self._stopped.set)

    def _take(self) -> list[Job] | None:
        """Every job queued (waiting for the first); None at its stop token."""
        batch: list[Job] = []
        job = self._jobs.get()
        while True:
            if job is self:
                if not batch:
                    return None
                self._jobs.put(self)  # after this batch
                return batch
            if isinstance(job, Job):  # not an earlier thread's stop token
                batch.append(job)
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                if batch:
                    return batch
                job = self._jobs.get()

    def _run(self, batch: list[Job], deadline: float) -> bool:
        """Run ``batch`` in one transaction and report it; whether it committed."""
        started = time.perf_counter()
        try:
            results = self._store.run_batch([job.run for job in batch], deadline)
        except BaseException as exc:  # the writer task decides what it means
            self._report(self._outcomes.send_nowait, (batch, None, exc, deadline))
            return False
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - started)
        self._report(self._outcomes.send_nowait, (batch, results, None, deadline))
        return True

    def _report(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass  # trio is gone: nobody waits


class _Probe:
    """One readiness probe under way, shared by the callers waiting for it."""

    def __init__(self) -> None:
        self.answered = trio.Event()
        self.result: str | None = None


def _describe(failure: Failure) -> str:
    return f"store {'busy' if failure.busy else 'failed'}: {failure.cause}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
