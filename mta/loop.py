"""The event loop of a long-running mta process: the epoll reactor's poll without a
log context around every event (`install`), and the garbage collector's settings
(`settle_garbage_collector`).

Twisted's `EPollReactor.doPoll` hands each ready descriptor to
`_doReadOrWrite` through `twisted.python.log.callWithLogger`, which asks the
descriptor for its log prefix and pushes it as the legacy log system (a dict
and two context-tracker calls) for the length of the call.  Only legacy
`log.msg`/`log.err` calls read that system; mta logs through
`twisted.logger` and its mail log (maillog.py), which never do.  An SMTP
message is ten events or so in the receiving process (the accept, each
command, the body, the close, the commit's result) and a few in the main
process, so the wrapper was 4-5% of each process's CPU in py-spy profiles; a
bare Twisted echo server spent 35-50 µs less CPU a connection of eight events
without it (four alternating runs).

`install` replaces the poll of a plain `EPollReactor` (what twistd and the
receiving process run on Linux) with the same loop minus the wrapper.  What
the wrapper also did, catching an exception that escapes `_doReadOrWrite`
(one from a protocol's connectionLost) so the other ready descriptors are
still served, the loop does too, and logs it with the descriptor named.  Any
other reactor, or an EPollReactor whose internals moved on, is left as it is.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="mta.loop")


def install(reactor: Any) -> bool:
    """Give `reactor` the lean poll; whether it did."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return False
    if type(reactor) is not EPollReactor or not all(
            hasattr(reactor, name) for name in ("_poller", "_selectables", "_doReadOrWrite")):
        return False
    selectables = reactor._selectables
    handle = reactor._doReadOrWrite

    def do_poll(timeout: float | None) -> None:
        try:
            # As many events as there are descriptors, as Twisted's own poll asks.
            events = reactor._poller.poll(-1 if timeout is None else timeout, len(selectables))
        except InterruptedError:
            return
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier event of this round
            try:
                handle(selectable, fd, event)
            except Exception:  # noqa: BLE001 (one descriptor's bug must not stop the others)
                log.failure("unhandled error serving {selectable!r}", selectable=selectable)

    reactor.doPoll = reactor.doIteration = do_poll
    return True


# Container objects allocated, net of those freed, before the youngest generation is
# collected (Python's default is 700).
GC_YOUNG_THRESHOLD = 5000


def settle_garbage_collector(reactor: Any) -> None:
    """Collect less often, and leave what start-up made out of the collections.

    With Python's defaults the main process relaying at 20 sessions collected its
    youngest generation 1,134 times in 12,000 messages, and the whole heap 10 times
    at about 56 ms each (the modules, the config and the services: some 66,000
    objects): 70 µs of CPU a relayed message, a seventh of that process's
    (gc.callbacks, timed).  Handling a message allocates more than 700 objects
    before it frees them, so the count crosses the default threshold again and
    again; at 5,000 it seldom does (10 collections in the same 12,000 messages).
    Everything alive once the reactor runs is frozen (`gc.freeze`): it lives as
    long as the process, and no later collection walks it.  The cost is bounded:
    garbage in cycles waits for up to 5,000 allocations, and what start-up made
    that a reload later drops stays, once."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    reactor.callWhenRunning(gc.freeze)
