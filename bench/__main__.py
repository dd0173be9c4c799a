"""`python -m bench`: run the scenarios, print the table, write bench/results/latest.{md,json,png}."""

from __future__ import annotations

import argparse
import contextlib
import resource
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from bench.context import Context, Options
from bench.machine import StolenTime
from bench.report import command_line, write_results
from bench.scenarios import SCENARIOS, SMOKE_SCENARIOS
from bench.services import Services, server_runtime
from bench.table import Row, markdown_table

_RESULTS = Path(__file__).resolve().parent / "results"
_SMOKE = Options(
    duration_s=1,
    warmup_s=1,
    files=200,
    miss_files=50,
    flight_requests=100,
    transfer_bytes=4_000_000,
    verify_transfers=True,
)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = args.only or (list(SMOKE_SCENARIOS) if args.smoke else list(SCENARIOS))
    missing = sorted({tool for name in names for tool in SCENARIOS[name].tools if not shutil.which(tool)})
    if missing:
        tools = " ".join(missing)
        print(f"bench: {tools}: not installed; run bench/run or apt-get install -y {tools}", file=sys.stderr)
        return 2
    options = _options(args)
    _raise_file_limit()
    rows: list[Row] = []
    stolen: dict[str, float] = {}
    with _sigterm_as_interrupt(), _workdir(args.workdir) as workdir:
        with Services(workdir) as services:
            ctx = Context(services, options)
            for name in names:
                print(f"bench: {name} ...", file=sys.stderr, flush=True)
                with StolenTime() as steal:
                    rows += SCENARIOS[name].run(ctx)
                stolen[name] = steal.share
            notes = _notes(ctx, stolen)
    write_results(args.out, rows, command_line(), notes)
    print(markdown_table(rows), end="")
    print(f"bench: wrote {args.out}/latest.md, latest.json and latest.png", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only", action="append", choices=list(SCENARIOS), help="run this scenario (repeatable)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes; by default only the wrk-free scenarios"
    )
    parser.add_argument(
        "--duration",
        type=float,
        help="seconds per measured wrk run (default 6); noisy-neighbour windows are twice this",
    )
    parser.add_argument("--warmup", type=float, help="seconds of unmeasured load before each run (default 2)")
    parser.add_argument("--transfer-mb", type=float, help="size of the download and upload (default 500)")
    parser.add_argument("--files", type=int, help="files in the Zipf mix (default 10000)")
    parser.add_argument("--zipf", type=float, help="Zipf exponent of the mix (default 1.0)")
    parser.add_argument("--mix-rate", type=float, help="req/s offered in the Zipf mix (default 1000)")
    parser.add_argument("--flight-requests", type=int, help="concurrent requests for one file (default 1000)")
    parser.add_argument("--out", type=Path, default=_RESULTS, help="where latest.md/json/png go")
    parser.add_argument(
        "--workdir", type=Path, help="keep configs, access logs and server stderr here (default: a temp dir)"
    )
    return parser


def _options(args: argparse.Namespace) -> Options:
    base = _SMOKE if args.smoke else Options()
    given = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "transfer_bytes": None if args.transfer_mb is None else int(args.transfer_mb * 1_000_000),
        "files": args.files,
        "zipf_s": args.zipf,
        "mix_rate": args.mix_rate,
        "flight_requests": args.flight_requests,
    }
    return Options(**{**base.__dict__, **{k: v for k, v in given.items() if v is not None}})


def _notes(ctx: Context, stolen: dict[str, float]) -> list[str]:
    started = [
        name
        for name in ("simulator", "proxy_redis", "proxy_memory", "bare", "server_alone")
        if name in ctx.__dict__
    ]
    runtimes = ", ".join(
        f"{name.replace('_', ' ')} {server_runtime(getattr(ctx, name).pid)}" for name in started
    )
    return [
        "one process each, on loopback, sharing the machine with wrk; one scenario at a time",
        f"event loop and HTTP parser each server really loaded: {runtimes or 'none started'}",
        "misses: `Cache-Control: no-cache` on every request (store lookup, upstream fetch, store write)",
        "CPU time the hypervisor gave to other guests (steal) during each scenario: "
        + ", ".join(f"{name} {share:.0%}" for name, share in stolen.items()),
    ]


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="files-proxy-bench-") as workdir:
        yield Path(workdir)


def _raise_file_limit() -> None:
    """A thousand concurrent connections need more descriptors than a 1024 soft limit (children inherit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every started server is stopped on the way out."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
