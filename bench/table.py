"""One result row per server and scenario, and the markdown table they make."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.load import LoadResult


@dataclass(frozen=True)
class Row:
    """`met` is None for a baseline, which has no target of its own."""

    scenario: str
    server: str
    target: str
    measured: str
    met: bool | None
    numbers: dict[str, float] = field(default_factory=dict)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| scenario | server | target | measured | met |", "|---|---|---|---|---|"]
    for row in rows:
        met = "—" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(f"| {row.scenario} | {row.server} | {row.target} | {row.measured} | {met} |")
    return "\n".join(lines) + "\n"


def load_text(result: LoadResult) -> str:
    text = (
        f"{result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
        f"{result.errors} errors"
    )
    if result.server_cpu_us is not None:
        text += f", {result.server_cpu_us:.0f} µs server CPU per request"
    return text
