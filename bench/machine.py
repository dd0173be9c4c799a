"""How much of the machine the hypervisor took while something was measured: Linux's steal time, the
CPU time a virtual machine's vCPUs were ready to run but another guest had the core. On a shared
host it moves within minutes, and every latency and req/s figure moves with it, so each scenario
(and each noisy-neighbour window) reports it next to its figures."""

from __future__ import annotations

from types import TracebackType

import psutil


class StolenTime:
    """`with StolenTime() as stolen: ...`, then `stolen.share`: the hypervisor's share of all the
    machine's CPU time over the block (0.0 where the system reports no steal time)."""

    def __init__(self) -> None:
        self.share = 0.0
        self._before: tuple[float, float] = (0.0, 0.0)

    def __enter__(self) -> StolenTime:
        self._before = _stolen_and_total()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        stolen, total = (
            after - before for after, before in zip(_stolen_and_total(), self._before, strict=True)
        )
        self.share = stolen / total if total > 0 else 0.0


def _stolen_and_total() -> tuple[float, float]:
    times = psutil.cpu_times()
    # guest time is already counted in user time (and guest_nice in nice): not added twice.
    counted = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return getattr(times, "steal", 0.0), counted
