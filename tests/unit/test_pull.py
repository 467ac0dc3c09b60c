"""The customer side's scheduler: PullService runs each [[pull]] entry, one run at a time."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, task

from mta import config as config_mod
from mta.pull import PullService
from mta.spool.store import Spool


class Runs:
    """Stands in for one pull run (pull.odmr / pull.etrn): a Deferred the test fires."""

    def __init__(self) -> None:
        self.started: list[defer.Deferred[object]] = []

    def __call__(self, pull: config_mod.Pull) -> defer.Deferred[object]:
        d: defer.Deferred[object] = defer.Deferred()
        self.started.append(d)
        return d


def service(tmp_path: Path) -> tuple[PullService, Runs, task.Clock]:
    config = config_mod.from_dict({
        "server": {"hostname": "customer.test", "spool": str(tmp_path / "spool")},
        "pull": [{"protocol": "etrn", "server": "provider.test", "domains": ["customer.test"],
                  "interval": "10m"}],
    }, "<test>")
    clock = task.Clock()
    pulls = PullService(config, Spool(config.server.spool), queue=None, reactor=clock)
    runs = Runs()
    pulls._start = runs  # type: ignore[method-assign]
    return pulls, runs, clock


def test_stopping_during_a_run_ends(tmp_path: Path) -> None:
    pulls, runs, _ = service(tmp_path)
    pulls.startService()
    assert len(runs.started) == 1
    stopped = pulls.stopService()
    assert stopped is not None
    ended: list[object] = []
    stopped.addBoth(ended.append)
    assert ended, "stopService's Deferred never fired: the shutdown would hang"


def test_runs_do_not_overlap_and_a_failure_does_not_stop_the_next(tmp_path: Path) -> None:
    pulls, runs, clock = service(tmp_path)
    pulls.startService()
    clock.advance(600)
    assert len(runs.started) == 1  # the first run is still going: no second one
    runs.started[0].errback(ConnectionError("provider down"))
    clock.advance(600)
    assert len(runs.started) == 2
    runs.started[1].callback(None)
    clock.advance(600)
    assert len(runs.started) == 3


def test_a_reload_reschedules_changed_pulls_and_runs_new_ones_at_once(tmp_path: Path) -> None:
    pulls, runs, clock = service(tmp_path)
    pulls.startService()
    assert len(runs.started) == 1  # at start-up every entry runs at once
    runs.started[0].callback(None)
    old = pulls.config
    new = config_mod.from_dict({
        "server": {"hostname": "customer.test", "spool": str(tmp_path / "spool")},
        "pull": [{"protocol": "etrn", "server": "provider.test", "domains": ["customer.test"],
                  "interval": "10m"},
                 {"protocol": "etrn", "server": "other.test", "domains": ["customer.test"],
                  "interval": "1m"}],
    }, "<test>")
    pulls.reconfigure(new)
    assert len(runs.started) == 2  # only the new entry ran now
    runs.started[1].callback(None)
    clock.advance(60)
    assert len(runs.started) == 3  # the new one, on its own interval
    runs.started[2].callback(None)
    clock.advance(540)
    assert len(runs.started) == 5  # the old one's ten minutes, and the new one again
    pulls.reconfigure(old)  # the second entry is gone: nothing of it runs any more
    for d in runs.started[3:]:
        d.callback(None)
    clock.advance(60)
    assert len(runs.started) == 5
    pulls.stopService()
