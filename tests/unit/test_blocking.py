"""mta.blocking.Workers: blocking calls in threads, results fired in the reactor's thread,
one wake-up for the results that finished while the reactor had not yet run."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pytest

from mta.blocking import Workers

WAIT = 10.0


class FakeReactor:
    """callFromThread queues the call; the test runs it, as the reactor's turn would."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.triggers: list[tuple[str, str, Any]] = []

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
        self.triggers.append((phase, event, f))

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.put((f, args))

    def turn(self) -> None:
        f, args = self.calls.get(timeout=WAIT)
        f(*args)


def fired(d: Any) -> list[Any]:
    got: list[Any] = []
    d.addBoth(got.append)
    return got


def wait_until(check: Any) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_result_and_a_failure_reach_their_deferreds_in_the_reactor_turn() -> None:
    reactor = FakeReactor()
    workers = Workers(reactor)
    ran_in: list[str] = []

    def job(x: int) -> int:
        ran_in.append(threading.current_thread().name)
        return x * 2

    ok = fired(workers(job, 21))
    bad = fired(workers(lambda: 1 / 0))
    wait_until(lambda: len(ran_in) == 1 and reactor.calls.qsize() >= 1)
    assert ok == [] and bad == []  # nothing fires outside the reactor's turn...
    while not (ok and bad):
        reactor.turn()
    assert ok == [42]  # ...and everything in it
    assert bad[0].check(ZeroDivisionError)
    assert ran_in[0].startswith("mta-blocking-")
    workers.stop()


def test_results_that_finish_together_share_one_wake_up() -> None:
    reactor = FakeReactor()
    workers = Workers(reactor, size=4)
    go = threading.Event()
    done = []

    def job(i: int) -> int:
        go.wait(WAIT)
        done.append(i)
        return i

    results = [fired(workers(job, i)) for i in range(8)]
    go.set()
    # All eight results waiting for the reactor, and the one wake-up asked for.
    wait_until(lambda: len(workers._finished) == 8 and reactor.calls.qsize() >= 1)
    assert done and reactor.calls.qsize() == 1
    reactor.turn()
    assert [r for (r,) in results] == list(range(8))
    workers.stop()


def test_no_more_threads_than_its_size() -> None:
    reactor = FakeReactor()
    workers = Workers(reactor, size=3)
    lock = threading.Lock()
    running, most = [0], [0]
    go = threading.Event()

    def job() -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        go.wait(WAIT)
        with lock:
            running[0] -= 1

    results = [fired(workers(job)) for _ in range(9)]
    wait_until(lambda: running[0] == 3)
    go.set()
    while not all(results):
        reactor.turn()
    assert most[0] == 3
    assert len(workers._threads) == 3
    workers.stop()


def test_a_burst_of_calls_runs_at_once_on_threads_of_its_own() -> None:
    """Commits made in one turn of the reactor overlap their fsyncs: each of four
    calls made together gets a thread, or the barrier is never passed."""
    reactor = FakeReactor()
    workers = Workers(reactor, size=4)
    barrier = threading.Barrier(4, timeout=WAIT)
    results = [fired(workers(barrier.wait)) for _ in range(4)]
    while not all(results):
        reactor.turn()
    assert sorted(r for (r,) in results) == [0, 1, 2, 3]  # every thread passed it
    workers.stop()


def test_stop_finishes_queued_jobs_and_later_calls_run_at_once() -> None:
    reactor = FakeReactor()
    workers = Workers(reactor, size=2)
    assert ("during", "shutdown", workers.stop) in reactor.triggers
    go = threading.Event()
    done = []

    def job(i: int) -> None:
        go.wait(WAIT)
        done.append(i)

    for i in range(6):
        workers(job, i)
    stopper = threading.Thread(target=workers.stop)
    stopper.start()
    go.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert sorted(done) == list(range(6))
    assert not any(t.is_alive() for t in workers._threads)
    late = fired(workers(lambda: "inline"))
    assert late == ["inline"]


@pytest.mark.parametrize("size", [1, 10])
def test_many_calls_from_the_reactor_all_complete(size: int) -> None:
    reactor = FakeReactor()
    workers = Workers(reactor, size=size)
    results = [fired(workers(pow, i, 2)) for i in range(500)]
    while not all(results):
        reactor.turn()
    assert [r for (r,) in results] == [i * i for i in range(500)]
    workers.stop()


class ManualRunner:
    """run_blocking whose jobs run when the test says, in the test's thread."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], Any]] = []

    def __call__(self, f: Any, *args: Any) -> Any:
        from twisted.internet import defer
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_next(self) -> None:
        f, args, d = self.jobs.pop(0)
        d.callback(f(*args))


def test_calls_made_while_a_batch_runs_go_together_in_the_next() -> None:
    from mta.blocking import Gathered
    runner = ManualRunner()
    done: list[str] = []

    def remove(name: str) -> None:
        if name == "bad":
            raise FileNotFoundError(name)
        done.append(name)

    gathered = Gathered(runner, remove)
    first = fired(gathered("a"))
    assert len(runner.jobs) == 1  # at once, alone
    later = [fired(gathered(name)) for name in ("b", "bad", "c")]
    assert len(runner.jobs) == 1  # waiting for the first batch
    runner.run_next()
    assert first == [None] and done == ["a"]
    assert len(runner.jobs) == 1 and runner.jobs[0][1][1] == ["b", "bad", "c"]  # one job
    runner.run_next()
    assert done == ["a", "b", "c"]
    assert later[0] == [None] and later[2] == [None]
    assert later[1][0].check(FileNotFoundError)  # its own failure, and only its own
    assert runner.jobs == []
    fired(gathered("d"))
    assert len(runner.jobs) == 1  # idle again: the next call goes at once


def test_a_batch_whose_job_fails_fails_each_of_its_calls() -> None:
    from twisted.internet import defer

    from mta.blocking import Gathered

    def broken(f: Any, *args: Any) -> Any:
        return defer.fail(OSError("no thread"))

    gathered = Gathered(broken, lambda item: None)
    results = [fired(gathered(i)) for i in range(2)]
    assert all(r[0].check(OSError) for r in results)


def test_work_between_jobs_runs_after_the_result_is_handed_over() -> None:
    reactor = FakeReactor()
    workers = Workers(reactor, size=1)
    events: list[str] = []
    release = threading.Event()

    def between() -> None:
        events.append("between")
        release.wait(WAIT)

    def broken() -> None:
        events.append("broken")
        raise RuntimeError("a task that broke")

    workers.between_jobs += [between, broken]
    d = fired(workers(lambda: events.append("job") or "done"))
    wait_until(lambda: "between" in events)
    assert events == ["job", "between"]
    reactor.turn()  # the result was handed over before the work between jobs began
    assert d == ["done"]
    release.set()
    wait_until(lambda: "broken" in events)
    second = fired(workers(lambda: "again"))  # the worker outlived the broken task
    reactor.turn()
    assert second == ["again"]
    workers.between_jobs.clear()
    workers.stop()
