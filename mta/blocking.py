"""Blocking spool work off the reactor: a few threads, one wake-up for a batch of results.

Every message costs two blocking calls at least (the commit with its fsyncs, and
the removal after delivery).  Twisted's `deferToThread` costs about 75 µs of CPU
a call on a 2-core machine, as much as the fsync it waits for: the pool's
coordinator hands each call from thread to thread, and every result wakes the
reactor through its pipe on its own.  Here a job goes on a plain queue that the
worker threads take from, and a worker that finishes a job while other results
still wait for the reactor adds its result to theirs: the reactor wakes once and
fires every finished Deferred in that turn.  Measured alone, a call costs half of
what `deferToThread` does; under load the wake-ups are shared too.

A thread starts when a call finds no idle thread free for it, up to `size`.  At reactor shutdown
the workers finish the jobs already queued (a commit under way completes; the
message is durable even if its client is gone) and are joined; a call made after
that runs at once in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

SIZE = 10  # as Twisted's reactor pool: commits of 20 sessions share fsync rounds

_STOP = object()

log = Logger()


class Workers:
    def __init__(self, reactor: Any, size: int = SIZE, name: str = "mta-blocking") -> None:
        self.reactor = reactor
        self.size = size
        self.name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _finished
        self._threads: list[threading.Thread] = []
        # One item per thread waiting for a job: list.append and list.pop are atomic, so
        # neither a call nor a worker takes a lock for it.  A call starts a thread when
        # the jobs already waiting would take every idle one (20 commits in one turn of
        # the reactor get threads of their own, up to `size`, and their fsyncs overlap).
        # Read just as a thread takes a job, the counts may start a thread early or
        # leave a job to wait for a busy one: never a job without a thread.
        self._idle: list[None] = []
        self._finished: list[tuple[defer.Deferred[Any], bool, Any]] = []
        self._stopped = False
        # Blocking work that can wait: each worker runs these after handing over a
        # job's result, before its next job (the spool's spare files).
        self.between_jobs: list[Callable[[], None]] = []
        reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        """`f(*args, **kwargs)` in a worker thread; a Deferred of its result."""
        if self._stopped:
            return defer.maybeDeferred(f, *args, **kwargs)
        if len(self._idle) <= self._jobs.qsize() and len(self._threads) < self.size:
            worker = threading.Thread(target=self._work, daemon=True,
                                      name=f"{self.name}-{len(self._threads)}")
            worker.start()
            self._threads.append(worker)
        d: defer.Deferred[Any] = defer.Deferred()
        self._jobs.put((d, f, args, kwargs))
        return d

    def _work(self) -> None:
        self._idle.append(None)
        while True:
            job = self._jobs.get()
            self._idle.pop()
            if job is _STOP:
                return
            d, f, args, kwargs = job
            try:
                result: Any = f(*args, **kwargs)
                ok = True
            except BaseException:  # noqa: BLE001 - the caller gets every failure
                result = Failure()
                ok = False
            del job, f, args, kwargs
            with self._lock:
                self._finished.append((d, ok, result))
                wake = len(self._finished) == 1
            del d, result
            self._idle.append(None)  # before the wake-up: the reactor's next call sees it
            if wake:
                self.reactor.callFromThread(self._deliver)
            for task in self.between_jobs:
                try:
                    task()
                except Exception:  # noqa: BLE001 (a worker outlives a task that broke)
                    log.failure("work between jobs failed")

    def _deliver(self) -> None:
        """In the reactor: fire every Deferred whose job has finished."""
        with self._lock:
            finished, self._finished = self._finished, []
        for d, ok, result in finished:
            if ok:
                d.callback(result)
            else:
                d.errback(result)

    def stop(self) -> None:
        """Finish the queued jobs, then end the threads (blocking: at shutdown)."""
        if self._stopped:
            return
        self._stopped = True
        threads = list(self._threads)
        for _ in threads:
            self._jobs.put(_STOP)
        for worker in threads:
            worker.join()


_workers: dict[Any, Workers] = {}


def workers_for(reactor: Any) -> Workers:
    """The process's `Workers` for `reactor` (made at the first call)."""
    workers = _workers.get(reactor)
    if workers is None:
        workers = _workers[reactor] = Workers(reactor)
    return workers


def run_blocking(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    """`f(*args, **kwargs)` in a worker of the global reactor."""
    from twisted.internet import reactor
    return workers_for(reactor)(f, *args, **kwargs)


class Gathered:
    """`f(item)` in a worker for each call, with the calls made while a batch runs
    gathered into the next batch: one job, one hand-over to a thread and one wake-up
    of the reactor for all of them.  With little to do, each call is a batch of its
    own at once; under load the batches grow by themselves, with no timer.  For
    work that is cheap next to a hand-over (the two unlinks of a delivered message):
    done in the reactor's thread it would be cheaper still, but an unlink can wait
    there for the file system's journal, and with it every session."""

    def __init__(self, run_blocking: Callable[..., defer.Deferred[Any]],
                 f: Callable[[Any], Any]) -> None:
        self.run_blocking = run_blocking
        self.f = f
        self._waiting: list[tuple[Any, defer.Deferred[Any]]] = []
        self._running = False

    def __call__(self, item: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting.append((item, d))
        if not self._running:
            self._next()
        return d

    def _next(self) -> None:
        batch, self._waiting = self._waiting, []
        if not batch:
            self._running = False
            return
        self._running = True
        job = self.run_blocking(_each, self.f, [item for item, _ in batch])
        job.addBoth(self._done, batch)

    def _done(self, outcomes: Any, batch: list[tuple[Any, defer.Deferred[Any]]]) -> None:
        for i, (_, d) in enumerate(batch):
            outcome = outcomes if isinstance(outcomes, Failure) else outcomes[i]
            if outcome is None:
                d.callback(None)
            else:
                d.errback(outcome)
        self._next()


def _each(f: Callable[[Any], Any], items: list[Any]) -> list[Failure | None]:
    """`f` of each item, in a worker; None or the Failure of each."""
    outcomes: list[Failure | None] = []
    for item in items:
        try:
            f(item)
        except Exception:  # noqa: BLE001 - each caller gets its own failure
            outcomes.append(Failure())
        else:
            outcomes.append(None)
    return outcomes
