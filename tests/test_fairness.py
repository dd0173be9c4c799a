"""Fair shares of the proxy's CPU: what each team's steps cost is measured, and while the process is
busy a team over its share gets fewer upstream requests at once and its steps take turns, one per
pass of the loop with the other teams' steps between; an idle or lone team never is held."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.config import UpstreamConfig
from proxy.fairness import BUSY, FairShare, Load
from proxy.upstream import UpstreamClient
from tests.constants import ALPHA

HEAVY, LIGHT = "heavy", "light"
LIMIT = 8


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _ticks(
    share: FairShare, count: int, busy: float, loads: dict[str, Load], spent: dict[str, float]
) -> None:
    for _ in range(count):
        for team, seconds in spent.items():
            share.charge(team, seconds)
        share.tick(busy, loads)


def test_a_team_over_its_share_while_busy_is_halved_down_to_one() -> None:
    share = FairShare()
    loads = {HEAVY: Load(in_flight=6, limit=LIMIT), LIGHT: Load(in_flight=6, limit=LIMIT)}
    seen = []
    for _ in range(4):
        _ticks(share, 1, 1.0, loads, {HEAVY: 0.04, LIGHT: 0.005})
        seen.append(share.window(HEAVY, LIMIT))
    assert seen == [3, 1, 1, 1]
    # The light team waits on its upstream, not on the loop: it keeps its whole share.
    assert share.window(LIGHT, LIMIT) == LIMIT


def test_held_windows_grow_back_by_one_a_tick_once_the_process_is_not_busy() -> None:
    share = FairShare()
    loads = {HEAVY: Load(in_flight=1, limit=4), LIGHT: Load(in_flight=0, limit=4)}
    _ticks(share, 3, 1.0, loads, {HEAVY: 0.04, LIGHT: 0.001})
    assert share.window(HEAVY, 4) == 1
    seen = []
    for _ in range(4):
        _ticks(share, 1, BUSY / 2, loads, {HEAVY: 0.04, LIGHT: 0.001})
        seen.append(share.window(HEAVY, 4))
    assert seen == [2, 3, 4, 4]


def test_a_lone_team_is_never_held_however_busy() -> None:
    share = FairShare()
    _ticks(share, 20, 1.0, {HEAVY: Load(in_flight=LIMIT, limit=LIMIT)}, {HEAVY: 0.05})
    assert share.window(HEAVY, LIMIT) == LIMIT


def test_a_team_that_stopped_using_the_proxy_stops_counting() -> None:
    """A burst long past does not make the team that stayed look greedy for ever."""
    share = FairShare()
    loads = {HEAVY: Load(in_flight=4, limit=LIMIT)}
    _ticks(share, 5, 1.0, loads, {HEAVY: 0.04, LIGHT: 0.04})
    _ticks(share, 400, 1.0, loads, {HEAVY: 0.04})
    assert share.window(HEAVY, LIMIT) == LIMIT


def _as_team(share: FairShare, team: str, awaitable: Awaitable[Any]) -> asyncio.Task[Any]:
    return asyncio.ensure_future(share.steps(awaitable, lambda: team))


def _hold(share: FairShare, team: str) -> None:
    """Put `team` over its share while the process is busy."""
    share.charge(team, 0.04)
    share.charge("other", 0.001)
    share.tick(1.0, {team: Load(in_flight=4, limit=LIMIT)})
    assert share.window(team, LIMIT) < LIMIT


@pytest.mark.anyio
async def test_a_held_team_runs_one_step_per_pass_and_the_other_teams_steps_go_between() -> None:
    share = FairShare()
    _hold(share, HEAVY)
    passes = 0

    async def count_passes() -> None:
        nonlocal passes
        while True:
            passes += 1
            await asyncio.sleep(0)  # back at the next pass

    seen: dict[str, list[int]] = {HEAVY: [], LIGHT: []}

    async def work(team: str) -> None:
        for _ in range(5):
            seen[team].append(passes)
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_passes())
    await asyncio.sleep(0)
    await asyncio.gather(*(_as_team(share, team, work(team)) for team in (HEAVY, LIGHT) * 3))
    counter.cancel()

    assert len(seen[HEAVY]) == 15 and len(set(seen[HEAVY])) == 15  # never two in one pass
    assert len(set(seen[LIGHT])) < len(seen[LIGHT])  # not held: its steps share passes
    assert max(seen[LIGHT]) < max(seen[HEAVY])  # so it was done first


@pytest.mark.anyio
async def test_a_cancelled_waiting_step_takes_no_turn_and_a_team_within_its_share_runs_freely() -> None:
    share = FairShare()
    _hold(share, HEAVY)
    order: list[str] = []
    go_on = asyncio.Event()

    async def step_then(name: str, wait: Callable[[], Awaitable[Any]]) -> None:
        order.append(name)
        await wait()
        order.append(f"{name} again")

    first, second, third = (
        _as_team(share, HEAVY, step_then(name, go_on.wait)) for name in ("first", "second", "third")
    )
    await asyncio.sleep(0)  # the first took the turn; the other two wait for theirs
    second.cancel()
    await asyncio.sleep(0.01)
    assert order == ["first", "third"]  # each in its turn; the cancelled one took none
    with pytest.raises(asyncio.CancelledError):
        await second

    share.tick(BUSY / 2, {})  # the proxy has room again: the team's steps no longer take turns
    go_on.set()
    await asyncio.gather(first, third)
    assert sorted(order[2:]) == ["first again", "third again"]


@pytest.mark.anyio
async def test_steps_are_charged_to_the_team_named_and_results_errors_pass_through() -> None:
    share = FairShare()
    team: str | None = None

    async def names_its_team() -> str:
        nonlocal team
        await asyncio.sleep(0)
        team = HEAVY  # as authentication names the tenant, in a step of the request
        time.sleep(0.005)  # the step's CPU
        await asyncio.sleep(0)
        return "done"

    async def fails() -> None:
        await asyncio.sleep(0)
        raise LookupError("inner")

    assert await share.steps(names_its_team(), lambda: team) == "done"
    with pytest.raises(LookupError, match="inner"):
        await share.steps(fails(), lambda: LIGHT)
    share.charge("other", 0.001)
    share.tick(1.0, {HEAVY: Load(in_flight=4, limit=LIMIT)})
    assert share.window(HEAVY, LIMIT) == 2  # its 5 ms were charged to it: over its share, halved


@pytest.mark.anyio
async def test_a_cancellation_reaches_the_awaitable() -> None:
    cleaned = asyncio.Event()

    async def waits() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    task = _as_team(FairShare(), HEAVY, waits())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()


@pytest.mark.anyio
async def test_a_narrowed_share_serves_its_waiters_in_order_and_a_cancelled_one_takes_no_slot() -> None:
    """The upstream client applies the team's window: past it, its requests wait their turn."""
    tenant = ALPHA.tenant()
    client = UpstreamClient(UpstreamConfig(max_connections=8, pool_timeout_s=5))
    client.fair_share.charge(tenant.name, 1.0)
    client.fair_share.charge("other", 0.01)
    client.fair_share.tick(1.0, {tenant.name: Load(in_flight=2, limit=4)})
    assert client.fair_share.window(tenant.name, 4) == 1

    first = await client._take_share(tenant)
    order: list[int] = []

    async def wait(number: int) -> None:
        release = await client._take_share(tenant)
        order.append(number)
        release()

    waiters = [asyncio.create_task(wait(number)) for number in range(3)]
    await asyncio.sleep(0.01)
    assert order == []
    waiters[1].cancel()
    first()
    await asyncio.gather(waiters[0], waiters[2])
    assert order == [0, 2]
