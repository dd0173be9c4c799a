"""Fair shares of the proxy's CPU: what each team's steps cost is measured, and while the process is
busy a team over its share gets fewer upstream requests at once; an idle or lone team never does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from proxy.config import Tenant, UpstreamConfig
from proxy.fairness import BUSY, FairShare, Load, timed
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


@pytest.mark.anyio
async def test_timed_charges_the_loop_time_of_each_step_and_passes_results_and_errors_through() -> None:
    charged: list[float] = []

    async def steps() -> str:
        for _ in range(3):
            await asyncio.sleep(0)
        return "done"

    async def fails() -> None:
        await asyncio.sleep(0)
        raise LookupError("inner")

    assert await timed(steps(), charged.append) == "done"
    assert len(charged) == 4 and all(seconds >= 0 for seconds in charged)
    with pytest.raises(LookupError, match="inner"):
        await timed(fails(), charged.append)


@pytest.mark.anyio
async def test_timed_passes_a_cancellation_into_the_awaitable() -> None:
    cleaned = asyncio.Event()

    async def waits() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    task = asyncio.create_task(timed(waits(), lambda seconds: None))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()


async def _queued_behind_one(
    client: UpstreamClient, tenant: Tenant, count: int
) -> tuple[Callable[[], None], list[int], list[asyncio.Task[None]]]:
    """One slot taken, then `count` requests waiting for theirs: the first one's release, the order
    the waiters got their slots in, and the waiters."""
    first = await client._take_share(tenant)
    order: list[int] = []

    async def wait(number: int) -> None:
        release = await client._take_share(tenant)
        order.append(number)
        release()

    waiters = [asyncio.create_task(wait(number)) for number in range(count)]
    await asyncio.sleep(0.01)
    return first, order, waiters


@pytest.mark.anyio
async def test_a_narrowed_share_serves_its_waiters_in_order_and_a_cancelled_one_takes_no_slot() -> None:
    """The upstream client applies the team's window: past it, its requests wait their turn."""
    tenant = ALPHA.tenant()
    client = UpstreamClient(UpstreamConfig(max_connections=8, pool_timeout_s=5))
    client.fair_share.charge(tenant.name, 1.0)
    client.fair_share.charge("other", 0.01)
    client.fair_share.tick(1.0, {tenant.name: Load(in_flight=2, limit=4)})
    assert client.fair_share.window(tenant.name, 4) == 1

    first, order, waiters = await _queued_behind_one(client, tenant, 3)
    assert order == []
    waiters[1].cancel()
    first()
    await asyncio.gather(waiters[0], waiters[2])
    assert order == [0, 2]


@pytest.mark.anyio
async def test_a_slot_freed_while_the_first_waiter_is_being_cancelled_goes_to_the_next() -> None:
    """A waiter cancelled (by its pool timeout, or its client leaving) is skipped when a slot is
    handed over, even before its own task has run to leave the queue."""
    tenant = ALPHA.tenant()
    client = UpstreamClient(UpstreamConfig(max_connections=2, pool_timeout_s=5))
    first, order, waiters = await _queued_behind_one(client, tenant, 2)
    waiters[0].cancel()
    first()  # in the same turn: the cancelled waiter has not left the queue yet
    await waiters[1]
    with pytest.raises(asyncio.CancelledError):
        await waiters[0]
    assert order == [1]
    await asyncio.wait_for(client._take_share(tenant), 1)  # and the slot came back after
