"""Fair shares of the proxy's CPU: while the proxy is busy, a team using more than its share of it
gets fewer upstream requests at once, so the other teams' requests do not queue behind its work.

One event loop serves every team, and a request's work runs in steps the loop takes in turn. A
team whose misses cost much CPU (list pages of many files, say) keeps several such steps queued at
once, and every other team's cached hit waits behind them. Its concurrency buys it nothing while
the proxy is busy (one loop runs one step at a time), so it is lowered, as TCP lowers a window: cut
in half each tick its team is over its share while the process is busy, raised by one each tick
otherwise, back to its `max_upstream_connections`. A team whose requests mostly wait on the
upstream (slow answers, long downloads) uses little CPU and keeps its whole share.

The CPU a team uses is measured, not guessed: the loop time of each step of its requests (`timed`).
"""

from __future__ import annotations

import asyncio
import time
import types
from collections import defaultdict
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

_T = TypeVar("_T")

TICK_S = 0.05
# The process's CPU over a tick, as a fraction of one core, from which teams are held to their share:
# near saturation, where requests start to queue on the loop. Below it no team is held, so a team
# doing much on a proxy with room to spare keeps its whole share.
BUSY = 0.8
# Each tick keeps this much of what the teams used before (half of it after 0.25 s): a team's share
# follows its last second or so, so a flood is seen within a few ticks, and so is its end.
_KEPT = 0.5 ** (TICK_S / 0.25)
# Loop time (s, decayed) below which a team no longer counts as one that uses the proxy.
_IDLE_S = 1e-5


@dataclass(frozen=True, slots=True)
class Load:
    """A team's upstream requests open now, and how many its `max_upstream_connections` allows."""

    in_flight: int
    limit: int


class FairShare:
    """Each team's recent CPU (loop time), and the upstream window of each team held to its share."""

    def __init__(self) -> None:
        self._spent: defaultdict[str, float] = defaultdict(float)  # this tick
        self._recent: dict[str, float] = {}
        self._windows: dict[str, int] = {}  # only teams held below their limit

    def charge(self, team: str, seconds: float) -> None:
        self._spent[team] += seconds

    def window(self, team: str, limit: int) -> int:
        """Upstream requests the team may have open at once."""
        return min(limit, self._windows.get(team, limit))

    def tick(self, busy: float, loads: Mapping[str, Load]) -> None:
        """One tick: `busy` is the process's CPU over it (a fraction of one core), `loads` the teams'
        upstream requests now."""
        recent = {team: used * _KEPT for team, used in self._recent.items()}
        for team, spent in self._spent.items():
            recent[team] = recent.get(team, 0.0) + spent
        self._spent.clear()
        self._recent = {team: used for team, used in recent.items() if used > _IDLE_S}
        total = sum(self._recent.values())
        fair = 1 / len(self._recent) if self._recent else 1.0
        for team, load in loads.items():
            window = self._windows.get(team, load.limit)
            if busy >= BUSY and self._recent.get(team, 0.0) > fair * total:
                window = max(1, min(window, load.in_flight) // 2)
            else:
                window += 1
            if window < load.limit:
                self._windows[team] = window
            else:
                self._windows.pop(team, None)

    async def run(self, loads: Callable[[], Mapping[str, Load]], applied: Callable[[], None]) -> None:
        """Tick until cancelled: `loads` reads the teams' upstream requests, `applied` is told the
        windows changed."""
        wall, cpu = time.monotonic(), time.process_time()
        while True:
            await asyncio.sleep(TICK_S)
            now_wall, now_cpu = time.monotonic(), time.process_time()
            self.tick((now_cpu - cpu) / max(now_wall - wall, 1e-9), loads())
            wall, cpu = now_wall, now_cpu
            applied()


def timed(awaitable: Awaitable[_T], charge: Callable[[float], None]) -> Awaitable[_T]:
    """`awaitable`, with the loop time of each of its steps passed to `charge`."""
    return _timed(awaitable, charge)


@types.coroutine
def _timed(awaitable: Awaitable[_T], charge: Callable[[float], None]) -> Generator[Any, Any, _T]:
    steps = awaitable.__await__()
    sent: Any = None
    thrown: BaseException | None = None
    while True:
        started = time.perf_counter()
        try:
            yielded = steps.send(sent) if thrown is None else steps.throw(thrown)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        finally:
            charge(time.perf_counter() - started)
        try:
            sent, thrown = (yield yielded), None
        except GeneratorExit:
            steps.close()
            raise
        except BaseException as exc:
            sent, thrown = None, exc
