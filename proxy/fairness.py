"""Fair shares of the proxy's CPU: while the proxy is busy, a team using more than its share of it
is held, so the other teams' requests do not queue behind its work.

One event loop serves every team, and a request's work runs in steps (from one await to the next)
that the loop takes in turn. A team whose requests cost much CPU (list pages of many files, say)
keeps several such steps ready at once, and every other team's cached hit waits behind them all.
Its concurrency buys it nothing while the proxy is busy (one loop runs one step at a time), so
while it is over its share:
- its upstream window is lowered, as TCP lowers a window: cut in half each tick, down to 1, and
  raised by one a tick once it is within its share again, back to its `max_upstream_connections`;
  fewer of its requests at once means less of its work in the proxy, the store and the upstream;
- its steps take turns: one at a time, the next only at the loop's next pass, once what became
  ready meanwhile has run, so the other teams' steps go between its steps, not behind a queue of them.
A team whose requests mostly wait on the upstream (slow answers, long downloads) uses little CPU
and is not held, nor is a lone team, nor anyone while the proxy has room to spare.

The CPU a team uses is measured, not guessed: the loop time of each step of its requests (`steps`).
"""

from __future__ import annotations

import asyncio
import time
import types
from collections import defaultdict, deque
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


class _Turns:
    """A held team's steps, one per turn, in order. A turn ends at the loop's next pass after its
    step, so whatever became ready during the step runs before the team's next one."""

    def __init__(self) -> None:
        self._taken = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._ended = False  # the team is no longer held: every step goes at once

    def take(self) -> asyncio.Future[None] | None:
        """None when the turn is the caller's now; else a future done when it is."""
        if self._ended:
            return None
        if not self._taken:
            self._taken = True
            return None
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    def give_back(self) -> None:
        """The turn's step is done: hand the turn on at the loop's next pass."""
        if not self._ended:
            asyncio.get_running_loop().call_soon(self._hand_on)

    def end(self) -> None:
        self._ended = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def _hand_on(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter takes no turn
                waiter.set_result(None)
                return
        self._taken = False


class FairShare:
    """Each team's recent CPU (loop time); for each team held to its share, its upstream window and
    its turns."""

    def __init__(self) -> None:
        self._spent: defaultdict[str, float] = defaultdict(float)  # this tick
        self._recent: dict[str, float] = {}
        self._windows: dict[str, int] = {}  # only teams held below their limit
        self._turns: dict[str, _Turns] = {}  # only teams over their share now

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
        fair = sum(self._recent.values()) / max(len(self._recent), 1)
        over = {team for team, used in self._recent.items() if busy >= BUSY and used > fair}
        for team, load in loads.items():
            window = self._windows.get(team, load.limit)
            if team in over:
                window = max(1, min(window, load.in_flight) // 2)
            else:
                window += 1
            if window < load.limit:
                self._windows[team] = window
            else:
                self._windows.pop(team, None)
        for team in self._turns.keys() - over:
            self._turns.pop(team).end()
        for team in over - self._turns.keys():
            self._turns[team] = _Turns()

    def steps(self, awaitable: Awaitable[_T], team: Callable[[], str | None]) -> Awaitable[_T]:
        """`awaitable`, each step charged to `team()` (None: not known yet) and, while that team is
        over its share, run in its turn."""
        return self._steps(awaitable, team)

    @types.coroutine
    def _steps(self, awaitable: Awaitable[_T], team: Callable[[], str | None]) -> Generator[Any, Any, _T]:
        steps = awaitable.__await__()
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            name = team()
            turns = None if name is None else self._turns.get(name)
            waiter = None if turns is None else turns.take()
            if waiter is not None:
                try:
                    yield from waiter.__await__()
                except BaseException as exc:
                    if not (waiter.done() and not waiter.cancelled()):
                        turns = None  # it never had the turn
                    if isinstance(exc, GeneratorExit):
                        if turns is not None:
                            turns.give_back()
                        steps.close()
                        raise
                    sent, thrown = None, exc  # cancelled while waiting: the next step takes it in
            started = time.perf_counter()
            try:
                yielded = steps.send(sent) if thrown is None else steps.throw(thrown)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            finally:
                name = team()  # the step that authenticates names the team
                if name is not None:
                    self.charge(name, time.perf_counter() - started)
                if turns is not None:
                    turns.give_back()
            try:
                sent, thrown = (yield yielded), None
            except GeneratorExit:
                steps.close()
                raise
            except BaseException as exc:
                sent, thrown = None, exc

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
