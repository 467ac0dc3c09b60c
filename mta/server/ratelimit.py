"""Events per client address in a sliding window: AUTH failures, ETRN requests.

`WindowCounter(limit, window, clock)`: `record(address)` counts one event
and returns the events now in the window; `discard(address)` takes the latest
back; `blocked(address)` says whether the address has used up its `limit`.  `clock` is an `IReactorTime` (anything
with ``seconds()``), so tests use `task.Clock`.  Memory stays bounded by
the events of about two windows: once a window, addresses whose events all
expired are forgotten.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class WindowCounter:
    def __init__(self, limit: int, window: float, clock: Any) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._events: dict[str, deque[float]] = {}
        self._last_sweep = clock.seconds()

    def record(self, address: str) -> int:
        """Count one event; returns the events now in the window."""
        self._sweep()
        times = self._events.setdefault(address, deque())
        times.append(self._clock.seconds())
        return self.count(address)

    def discard(self, address: str) -> None:
        """Take back the latest event of `address` (an attempt that turned out well)."""
        times = self._events.get(address)
        if times:
            times.pop()
            if not times:
                del self._events[address]

    def count(self, address: str) -> int:
        times = self._events.get(address)
        if times is None:
            return 0
        self._expire(address, times)
        return len(times)

    def blocked(self, address: str) -> bool:
        return self.count(address) >= self.limit

    def _expire(self, address: str, times: deque[float]) -> None:
        horizon = self._clock.seconds() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._events[address]

    def _sweep(self) -> None:
        if self._clock.seconds() - self._last_sweep < self.window:
            return
        self._last_sweep = self._clock.seconds()
        for address, times in list(self._events.items()):
            self._expire(address, times)
