"""One result row per server and scenario, and the markdown table they make."""

from __future__ import annotations

from dataclasses import dataclass, field


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


def load_text(rps: float, p50_ms: float, p99_ms: float, errors: int) -> str:
    return f"{rps:,.0f} req/s, p50 {p50_ms:.2f} ms, p99 {p99_ms:.2f} ms, {errors} errors"
