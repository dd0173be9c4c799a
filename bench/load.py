"""HTTP load with wrk and bench/files.lua; one result per run (requests/s, p50, p99, errors)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parent / "files.lua"
_MARKER = "BENCH_JSON "


@dataclass(frozen=True)
class LoadResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    # CPU time (user + system, its processes together) the server spent per request, when measured.
    server_cpu_us: float | None = None


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, *, connections: int, duration_s: float, options: dict[str, str]) -> LoadResult:
    """Run wrk against `url` (scheme and host; paths come from the script's options)."""
    threads = 1 if connections < 4 else 2
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(_SCRIPT),
        url,
        "--",
        f"threads={threads}",
        *(f"{name}={value}" for name, value in options.items()),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60)
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr.strip()}")
    return parse_wrk_output(completed.stdout)


def parse_wrk_output(stdout: str) -> LoadResult:
    """The summary line that files.lua's done() prints."""
    for line in stdout.splitlines():
        if line.startswith(_MARKER):
            data = json.loads(line.removeprefix(_MARKER))
            return LoadResult(
                requests=int(data["requests"]),
                duration_s=float(data["duration_s"]),
                rps=float(data["rps"]),
                p50_ms=float(data["p50_ms"]),
                p99_ms=float(data["p99_ms"]),
                errors=int(data["errors"]),
            )
    raise RuntimeError(f"no {_MARKER.strip()} line in wrk's output:\n{stdout}")
