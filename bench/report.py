"""RESULTS.md: the machine, each target with its verdict, and every figure as
median (min to max) over the runs. Hand-written notes (NOTES.md) are appended as is."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Summary = dict[str, dict[str, float]]


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: not measured

    @property
    def word(self) -> str:
        return {True: "met", False: "missed", None: "not measured"}[self.met]


def number(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(summary: Summary, key: str) -> str:
    if key not in summary:
        return "n/a"
    figure = summary[key]
    if figure["min"] == figure["max"]:
        return number(figure["median"])
    return f"{number(figure['median'])} ({number(figure['min'])} to {number(figure['max'])})"


def median(benchmarks: dict[str, Any], name: str, key: str) -> float | None:
    summary = benchmarks.get(name, {}).get("summary", {})
    return summary[key]["median"] if key in summary else None


def _ratio_verdict(
    target: str, value: float | None, limit: float | None, wanted: float, unit: str
) -> Verdict:
    if value is None or limit is None or limit == 0:
        return Verdict(target, "", None)
    ratio = value / limit
    measured = f"{number(value)} {unit} against {number(limit)}: {ratio:.0%}"
    return Verdict(target, measured, ratio >= wanted)


def verdicts(benchmarks: dict[str, Any]) -> list[Verdict]:
    found: list[Verdict] = []
    intake_rate = median(benchmarks, "intake", "requests_per_s")
    insert_rate = median(benchmarks, "limit_insert", "requests_per_s")
    found.append(
        _ratio_verdict(
            "Intake: accepted deliveries/s >= 75% of limit (c)",
            intake_rate,
            insert_rate,
            0.75,
            "/s",
        )
    )
    intake_p99 = median(benchmarks, "intake", "p99_ms")
    insert_p99 = median(benchmarks, "limit_insert", "p99_ms")
    if intake_p99 is None or insert_p99 is None:
        found.append(Verdict("Intake: p99 <= 2x the p99 of limit (c)", "", None))
    else:
        measured = f"{number(intake_p99)} ms against 2 x {number(insert_p99)} ms"
        found.append(
            Verdict(
                "Intake: p99 <= 2x the p99 of limit (c)", measured, intake_p99 <= 2 * insert_p99
            )
        )
    found.append(
        _ratio_verdict(
            "Scheduler: tasks/s >= 50% of limit (d)",
            median(benchmarks, "scheduler", "tasks_per_s"),
            median(benchmarks, "limit_claim", "rows_per_s"),
            0.5,
            "/s",
        )
    )
    found.append(_drain_verdict(benchmarks))
    found.append(_memory_verdict(benchmarks))
    return found


def _drain_verdict(benchmarks: dict[str, Any]) -> Verdict:
    target = "Scheduler: last 1,000 completions drain at >= 80% of the first 1,000's rate"
    ratio = median(benchmarks, "scheduler", "last_to_first_ratio")
    if ratio is None:
        return Verdict(target, "", None)
    first = median(benchmarks, "scheduler", "first_window_per_s") or math.nan
    last = median(benchmarks, "scheduler", "last_window_per_s") or math.nan
    return Verdict(target, f"{number(last)}/s against {number(first)}/s: {ratio:.0%}", ratio >= 0.8)


def _memory_verdict(benchmarks: dict[str, Any]) -> Verdict:
    target = "Memory: peak RSS with 1,000 tasks in flight < 300 MB (largest run)"
    summary = benchmarks.get("memory", {}).get("summary", {})
    if "peak_rss_mb" not in summary:
        return Verdict(target, "", None)
    peak = summary["peak_rss_mb"]["max"]
    return Verdict(target, f"{number(peak)} MB", peak < 300)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def machine_section(results: dict[str, Any]) -> list[str]:
    facts = results["machine"]
    lines = [
        "## Machine",
        "",
        f"- Date: {facts['date']}, checkout {facts['commit']}",
        f"- CPU: {facts['cores']} cores ({facts['cpu']}), {facts['memory_gib']} GiB memory,"
        f" Linux {facts['kernel']}",
        f"- Python {facts['python']}, aiohttp {facts['aiohttp']}, asyncpg {facts['asyncpg']}",
        f"- Postgres {facts['postgres_version']} on 127.0.0.1, synchronous_commit"
        f" {facts['synchronous_commit']}, fsync {facts['fsync']}; a fresh database per run",
        f"- Load generator: {results['load_generator']}",
        f"- Runs: {results['runs']} of each benchmark; each figure is the median (min to max)."
        f" The whole benchmark took {results['duration_s']:.0f} s.",
    ]
    load = results.get("load_average")
    if load:
        lines.append(
            f"- 1-minute load average: {load['start']:.2f} before the run, {load['end']:.2f}"
            " after it. Other work on this machine slows the figures down; compare the"
            " machine busy cores with the benchmark's own processes."
        )
    if results.get("profiled"):
        lines.append("- py-spy sampled the scheduler's worker, which slowed it down.")
    return [*lines, ""]


def targets_section(benchmarks: dict[str, Any]) -> list[str]:
    rows = [[v.target, v.measured or "n/a", v.word] for v in verdicts(benchmarks)]
    return ["## Targets", "", *_table(["Target", "Measured (medians)", "Verdict"], rows), ""]


LIMIT_ROWS = (
    ("limit_plain", "(a) read an 8 KB body, return 202", "requests_per_s"),
    ("limit_verify", "(b) (a) + HMAC-SHA256 check + JSON parse", "requests_per_s"),
    ("limit_insert", "(c) (b) + one durable INSERT (asyncpg)", "requests_per_s"),
    ("limit_claim", "(d) SKIP LOCKED claim and complete, one row per transaction", "rows_per_s"),
)


def limits_section(benchmarks: dict[str, Any], shapes: dict[str, Any]) -> list[str]:
    header = [
        "Limit",
        "per s",
        "p50 ms",
        "p99 ms",
        "server cores",
        "client cores",
        "Postgres cores",
        "machine busy cores",
    ]
    rows = []
    for name, what, rate in LIMIT_ROWS:
        summary = benchmarks.get(name, {}).get("summary", {})
        if not summary:
            continue
        rows.append(
            [
                what,
                cell(summary, rate),
                cell(summary, "p50_ms"),
                cell(summary, "p99_ms"),
                cell(summary, "server_cores"),
                cell(summary, "client_cores"),
                cell(summary, "postgres_cores"),
                cell(summary, "machine_cores"),
            ]
        )
    if not rows:
        return []
    load, claim = shapes["load"], shapes["claim"]
    return [
        "## Limits of this machine",
        "",
        f"(a) to (c): an aiohttp server in its own process, {load['senders']} concurrent"
        f" senders for {load['duration_s']:g} s after {load['warmup_s']:g} s of warm-up."
        f" (d): {claim['connections']} connections in the bench process over a queue of"
        f" {claim['rows']:,} rows indexed on (due_at, id), for {claim['duration_s']:g} s."
        " Cores are CPU seconds per wall second. The client is the bench process, Postgres"
        " is every `postgres` process, and machine busy cores count all work on the machine,"
        " so the part not explained by the other columns is other work.",
        "",
        *_table(header, rows),
        "",
    ]


def intake_section(benchmarks: dict[str, Any]) -> list[str]:
    result = benchmarks.get("intake")
    if result is None:
        return []
    lines = ["## Intake", ""]
    if "skipped" in result:
        return [*lines, f"Skipped: {result['skipped']}.", ""]
    summary = result["summary"]
    header = ["accepted/s", "p50 ms", "p99 ms", "server cores", "client cores", "Postgres cores"]
    header.append("machine busy cores")
    row = [
        cell(summary, key)
        for key in (
            "requests_per_s",
            "p50_ms",
            "p99_ms",
            "server_cores",
            "client_cores",
            "postgres_cores",
            "machine_cores",
        )
    ]
    return [
        *lines,
        "`kubeci serve` receiving signed push deliveries (about 8 KB, each with its own"
        " delivery id and head SHA) from the same load generator as the limits; the fake"
        " GitHub serves a pipeline whose one job runs only for tags.",
        "",
        *_table(header, [row]),
        "",
    ]


def scheduler_section(results: dict[str, Any]) -> list[str]:
    result = results["benchmarks"].get("scheduler")
    if result is None:
        return []
    shape = results["shapes"]["scheduler"]
    summary = result["summary"]
    window = int(result["runs"][0]["drain_window"])
    keys = [
        ("tasks/s end to end", "tasks_per_s"),
        ("run created to last task done, s", "elapsed_s"),
        ("create_run, s", "create_run_s"),
        (f"first {window:,} completions, per s", "first_window_per_s"),
        (f"last {window:,} completions, per s", "last_window_per_s"),
        ("last / first", "last_to_first_ratio"),
        ("worker process cores", "worker_cores"),
        ("bench process cores (target, load)", "bench_cores"),
        ("Postgres cores", "postgres_cores"),
        ("machine busy cores (everything running)", "machine_cores"),
    ]
    total = shape["jobs"] * shape["steps"] * shape["tasks"]
    return [
        "## Scheduler",
        "",
        f"One run of {total:,} sync webhook tasks ({shape['jobs']} jobs x {shape['steps']}"
        f" step x {shape['tasks']} tasks) created through `Engine.create_run`; each task"
        " POSTs to a target that returns 204. Layout: " + results["scheduler_layout"] + "."
        " Rates come from the database's timestamps.",
        "",
        *_table(["Figure", "Value"], [[label, cell(summary, key)] for label, key in keys]),
        "",
    ]


def memory_section(results: dict[str, Any]) -> list[str]:
    result = results["benchmarks"].get("memory")
    if result is None:
        return []
    shape = results["shapes"]["memory"]
    summary = result["summary"]
    keys = [
        ("peak RSS (VmHWM), MB", "peak_rss_mb"),
        ("RSS after start, MB", "rss_at_start_mb"),
        ("RSS with every task parked, MB", "rss_all_parked_mb"),
        ("RSS at the end, MB", "rss_at_end_mb"),
        ("time to park every task, s", "park_all_s"),
    ]
    return [
        "## Memory",
        "",
        f"{shape['jobs'] * shape['tasks']:,} async webhook tasks ({shape['jobs']} jobs x"
        f" {shape['tasks']} tasks) in one `kubeci serve` process with default settings. The"
        " target returns 202 and calls every task back once all of them are parked.",
        "",
        *_table(["Figure", "Value"], [[label, cell(summary, key)] for label, key in keys]),
        "",
    ]


def render(results: dict[str, Any], notes: str = "") -> str:
    benchmarks = results["benchmarks"]
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m bench`); raw figures are in `bench/out/`."
        " The sections after the figures come from `bench/NOTES.md`.",
        "",
        *machine_section(results),
        *targets_section(benchmarks),
        *limits_section(benchmarks, results["shapes"]),
        *intake_section(benchmarks),
        *scheduler_section(results),
        *memory_section(results),
    ]
    text = "\n".join(lines).rstrip() + "\n"
    return text + ("\n" + notes.strip() + "\n" if notes.strip() else "")


def write_results(results: dict[str, Any], path: Path, notes_path: Path | None) -> None:
    notes = notes_path.read_text() if notes_path is not None else ""
    path.write_text(render(results, notes))
