"""Write a run's results: the markdown table with where and how it ran, the raw numbers as JSON,
and a PNG of requests/s (and MB/s) per server for each scenario."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.table import Row, markdown_table


def machine() -> str:
    return f"{os.cpu_count()} cores, {_cpu_model()}, Python {platform.python_version()}, {platform.system()}"


def write_results(out_dir: Path, rows: list[Row], command: str, notes: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    met = [row.met for row in rows if row.met is not None]
    summary = f"{sum(met)} of {len(met)} targets met."
    header = [
        "# files-proxy benchmark",
        "",
        f"- date: {when}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        *(f"- {note}" for note in notes),
        "",
        summary,
        "",
    ]
    (out_dir / "latest.md").write_text("\n".join(header) + markdown_table(rows))
    raw = {
        "date": when,
        "machine": machine(),
        "command": command,
        "notes": notes,
        "rows": [asdict(r) for r in rows],
    }
    (out_dir / "latest.json").write_text(json.dumps(raw, indent=2) + "\n")
    plot(rows, out_dir / "latest.png")


def plot(rows: list[Row], path: Path) -> None:
    """One panel per scenario: req/s per server for load scenarios, MB/s for transfers."""
    panels: dict[str, list[tuple[str, float, bool | None]]] = {}
    units: dict[str, str] = {}
    for row in rows:
        for unit, key in (("req/s", "rps"), ("MB/s", "mb_per_s")):
            if key in row.numbers:
                panels.setdefault(row.scenario, []).append((row.server, row.numbers[key], row.met))
                units[row.scenario] = unit
    if not panels:
        panels, units = {"no load scenario ran": []}, {"no load scenario ran": ""}
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 2.4 * len(panels)), squeeze=False)
    for axis, (scenario, bars) in zip(axes[:, 0], panels.items(), strict=True):
        colours = ["tab:gray" if met is None else ("tab:green" if met else "tab:red") for _, _, met in bars]
        axis.barh([server for server, _, _ in bars], [value for _, value, _ in bars], color=colours)
        axis.invert_yaxis()
        axis.set_title(scenario, fontsize=9, loc="left")
        axis.set_xlabel(units[scenario], fontsize=8)
        axis.tick_params(labelsize=8)
    figure.suptitle("files-proxy bench (grey: baseline, green: target met, red: missed)", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / len(panels)))
    figure.savefig(path, dpi=100)
    plt.close(figure)


def command_line() -> str:
    return " ".join(["python -m bench", *sys.argv[1:]])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
