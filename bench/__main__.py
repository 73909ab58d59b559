"""`python -m bench`: run every benchmark, write bench/RESULTS.md and bench/out/*.json."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.db import fresh_database, server_dsn
from bench.intake import intake
from bench.limits import ClaimShape, claim_limit, http_limit
from bench.load import GENERATOR, LoadShape
from bench.machine import machine_facts
from bench.memory import MemoryShape, memory
from bench.report import write_results
from bench.scheduler import LAYOUT, SchedulerShape, scheduler
from bench.stats import combine

log = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = ("limits", "intake", "scheduler", "memory")


@dataclass(frozen=True)
class Sizes:
    load: LoadShape
    claim: ClaimShape
    scheduler: SchedulerShape
    memory: MemoryShape


SIZES = {
    "full": Sizes(LoadShape(), ClaimShape(), SchedulerShape(), MemoryShape()),
    "tiny": Sizes(
        LoadShape(duration_s=0.5, warmup_s=0.2, max_requests=2000),
        ClaimShape(rows=2000, duration_s=0.5),
        SchedulerShape(jobs=2, steps=1, tasks=10, timeout_s=30.0),
        MemoryShape(jobs=2, tasks=10, timeout_s=30.0),
    ),
}

RunOnce = Callable[[str, int], Awaitable[dict[str, Any]]]


async def repeat(name: str, runs: int, run_once: RunOnce) -> dict[str, Any]:
    """Run a benchmark `runs` times, each on a fresh database; stop early on a skip."""
    results = []
    for number in range(1, runs + 1):
        async with fresh_database(server_dsn()) as dsn:
            result = await run_once(dsn, number)
        if "skipped" in result:
            log.info("%s skipped: %s", name, result["skipped"])
            return {"skipped": result["skipped"]}
        log.info("%s run %d/%d: %s", name, number, runs, _headline(result))
        results.append(result)
    return {"runs": results, "summary": combine(results)}


def _headline(result: dict[str, Any]) -> str:
    keys = ("requests_per_s", "rows_per_s", "tasks_per_s", "peak_rss_mb", "p99_ms")
    return ", ".join(f"{key} {result[key]:.1f}" for key in keys if key in result)


async def run_benchmarks(
    sizes: Sizes, runs: int, only: tuple[str, ...], logs: Path, profile: bool
) -> dict[str, dict[str, Any]]:
    chosen: dict[str, RunOnce] = {}
    if "limits" in only:
        for mode in ("plain", "verify", "insert"):
            chosen[f"limit_{mode}"] = _http_limit(mode, sizes.load, logs)
        chosen["limit_claim"] = lambda dsn, _n: claim_limit(dsn, sizes.claim)
    if "intake" in only:
        chosen["intake"] = lambda dsn, n: intake(dsn, sizes.load, logs, n, profile)
    if "scheduler" in only:
        chosen["scheduler"] = lambda dsn, n: scheduler(dsn, sizes.scheduler, logs, n, profile)
    if "memory" in only:
        chosen["memory"] = lambda dsn, n: memory(dsn, sizes.memory, logs, n)
    return {name: await repeat(name, runs, run_once) for name, run_once in chosen.items()}


def _http_limit(mode: str, shape: LoadShape, logs: Path) -> RunOnce:
    return lambda dsn, n: http_limit(mode, dsn, shape, logs, n)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    sizes = SIZES[args.size]
    out_dir = Path(args.out)
    facts = await machine_facts(server_dsn())
    load_at_start = os.getloadavg()[0]
    benchmarks = await run_benchmarks(
        sizes, args.runs, tuple(args.only), out_dir / "logs", args.profile
    )
    return {
        "machine": facts,
        "size": args.size,
        "runs": args.runs,
        "shapes": dataclasses.asdict(sizes),
        "load_generator": GENERATOR,
        "scheduler_layout": LAYOUT,
        "profiled": args.profile,
        "benchmarks": benchmarks,
        "duration_s": time.monotonic() - started,
        "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="workload size")
    parser.add_argument("--runs", type=int, default=3, help="runs of each benchmark")
    parser.add_argument(
        "--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="benchmarks"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only write the results file again from OUT/latest.json",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record py-spy profiles of `kubeci serve` in the intake and scheduler (slows it)",
    )
    parser.add_argument("--out", default=str(BENCH_DIR / "out"), help="folder for JSON and logs")
    parser.add_argument(
        "--results", default=str(BENCH_DIR / "RESULTS.md"), help="Markdown file to write"
    )
    return parser


def _write_report(results: dict[str, Any], results_path: Path) -> None:
    notes = BENCH_DIR / "NOTES.md"
    write_results(results, results_path, notes if notes.exists() else None)


def main(argv: list[str] | None = None, *, configure_logging: bool = True) -> int:
    """Run the benchmarks (or, with --report-only, re-render the last results)."""
    args = _parser().parse_args(argv)
    if args.runs < 1:
        sys.stderr.write(f"--runs {args.runs} is invalid; give 1 or more\n")
        return 2
    if configure_logging:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        # The engine, used here to create runs, would log each run and migration.
        logging.getLogger("bot").setLevel(logging.WARNING)
    out_dir = Path(args.out)
    latest = out_dir / "latest.json"
    if args.report_only:
        if not latest.exists():
            sys.stderr.write(f"{latest} is missing; run the benchmarks first\n")
            return 2
        _write_report(json.loads(latest.read_text()), Path(args.results))
        return 0
    results = asyncio.run(main_async(args))
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in (out_dir / f"results-{stamp}.json", latest):
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    _write_report(results, Path(args.results))
    log.info("wrote %s and %s in %.0f s", args.results, latest, results["duration_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
