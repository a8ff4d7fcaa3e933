"""Run the benchmark suite: ``python -m benchmarks [options]``.

Measures every workload of :mod:`benchmarks.workloads` interleaved, counts
instructions per transaction with callgrind for the in-memory SQLite ones,
checks the SPEC section 5 targets, prints a table and writes
``results/latest.json`` and ``results/latest.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from sessionscope._stats import JOURNAL_LIMIT

from . import callgrind, report
from .env import Env
from .harness import Measurement, Plan, measure_async, measure_sync, summarize
from .proxy import Proxy
from .workloads import LABELS, PEERS, WORKLOADS, Workload, by_name

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/ss_bench"

TARGETS: tuple[dict[str, Any], ...] = (
    {
        "name": "scope overhead, sync, SQLite memory, monitoring on",
        "workload": "insert_sync_sqlite", "variant": "sessionscope", "op": "<=", "limit": 1.03,
        "basis": "instructions",
    },
    {
        "name": "scope overhead, async, SQLite memory, monitoring on",
        "workload": "insert_async_sqlite", "variant": "sessionscope", "op": "<=", "limit": 1.03,
        "basis": "instructions",
    },
    {
        "name": "decorator overhead, sync, SQLite memory",
        "workload": "decorator_sync_sqlite", "variant": "decorator", "op": "<=", "limit": 1.05,
        "basis": "instructions",
    },
    {
        "name": "decorator overhead, async, SQLite memory",
        "workload": "decorator_async_sqlite", "variant": "decorator", "op": "<=", "limit": 1.05,
        "basis": "instructions",
    },
    {
        "name": "throughput, 200 async tasks, PostgreSQL pool 10",
        "workload": "concurrent_async_postgresql", "variant": "sessionscope",
        "op": ">=", "limit": 1.25, "instructions_field": "instructions_throughput_ratio",
    },
    {
        "name": "throughput vs commit() + close() by hand, same rounds",
        "workload": "concurrent_async_postgresql", "variant": "sessionscope",
        "op": ">=", "limit": 0.98, "field": "vs_raw_close",
        "instructions_field": "instructions_vs_raw_close",
    },
    *(
        {
            "name": f"read_only snapshot=False session.get(), {mode}, PostgreSQL{where}",
            "workload": f"readonly_{mode}_postgresql{suffix}",
            "variant": "readonly_autocommit", "op": "<=", "limit": limit,
        }
        for suffix, where, limit in (
            ("", " loopback (>= 1.15x faster)", round(1 / 1.15, 4)),
            ("_1ms", " +1 ms per round trip (>= 2x faster)", 0.5),
        )
        for mode in ("sync", "async")
    ),
)


def _plans(profile: str) -> dict[str, Plan]:
    """Measurement plans by kind of workload. ``full`` keeps the whole run near
    five minutes on a 2-core machine; ``smoke`` only proves everything runs."""
    if profile == "smoke":
        tiny = Plan(rounds=2, batch_seconds=0.0, warmup=2, max_units=2)
        return {"sqlite": tiny, "server": tiny, "concurrent": Plan(2, 0.0, 1, max_units=1)}
    scale = 0.5 if profile == "quick" else 1.0
    return {
        "sqlite": Plan(rounds=max(5, round(25 * scale)), batch_seconds=0.05, warmup=30),
        "server": Plan(rounds=max(5, round(15 * scale)), batch_seconds=0.1, warmup=20),
        # A round's ratio of two batches of the same code spreads by +-10% here:
        # many short rounds rather than a few long ones.
        "concurrent": Plan(rounds=max(6, round(48 * scale)), batch_seconds=0.15, warmup=1),
    }


def _plan_for(plans: dict[str, Plan], workload: Workload) -> Plan:
    if workload.tx_per_unit > 1:
        return plans["concurrent"]
    return plans["sqlite" if workload.backend == "sqlite" else "server"]


# -- environment and versions ---------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def collect_meta() -> dict[str, Any]:
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--", "src")
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sessionscope": f"{_version('sessionscope')} ({commit or 'unknown commit'}"
        f"{', src modified' if dirty else ''})",
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "arch": platform.machine(),
            "kernel": f"{platform.system()} {platform.release()}",
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "packages": {
            name: _version(dist)
            for name, dist in (
                ("sqlalchemy", "SQLAlchemy"),
                ("greenlet", "greenlet"),
                ("aiosqlite", "aiosqlite"),
                ("psycopg", "psycopg"),
                ("asyncpg", "asyncpg"),
                ("fastapi_async_sqlalchemy", "fastapi-async-sqlalchemy"),
                ("advanced_alchemy", "advanced-alchemy"),
            )
        },
        "sqlite": sqlite3.sqlite_version,
    }


def _prepare_postgresql(url: str) -> tuple[str | None, str | None]:
    """Create the benchmark database if missing; return (server version, reason
    it cannot be used)."""
    parsed = make_url(url)
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": parsed.database}
            )
            if not exists:
                conn.exec_driver_sql(f'CREATE DATABASE "{parsed.database}"')
            version = conn.scalar(text("SHOW server_version"))
    except Exception as err:  # absent or refusing: skip its workloads, say why
        return None, f"PostgreSQL unavailable ({type(err).__name__})"
    finally:
        admin.dispose()
    return str(version), None


# -- measuring -----------------------------------------------------------------------


def _entry(workload: Workload) -> dict[str, Any]:
    return {
        "group": workload.group,
        "title": workload.title,
        "mode": workload.mode,
        "backend": workload.backend + (" (in memory)" if workload.backend == "sqlite" else ""),
        "throughput": workload.throughput,
        "tx_per_unit": workload.tx_per_unit,
        "not_applicable": dict(workload.not_applicable),
    }


def _finish(
    entry: dict[str, Any], workload: Workload, m: Measurement, rows: dict[str, int]
) -> None:
    entry["rounds"] = m.rounds
    entry["units"] = m.units
    entry["variants"] = summarize(m, workload.throughput)
    ceiling = m.per_tx.get("raw_close")
    if ceiling is not None:
        # The hand-written ceiling, measured in the same rounds: the median of each
        # contender's per-round throughput ratios to it.
        for variant, per_tx in m.per_tx.items():
            if variant != "raw_close":
                ratios = [c / x for x, c in zip(per_tx, ceiling, strict=True)]
                entry["variants"][variant]["vs_raw_close"] = round(statistics.median(ratios), 4)
    problems = []
    for variant, found in rows.items():
        expected = m.tx_done[variant] * workload.rows_per_tx
        if found != expected:
            problems.append(f"{variant}: {found} rows, expected {expected}")
    entry["rows_verified"] = not problems
    if problems:
        entry["row_problems"] = problems
    print(f"  {workload.name}: done ({m.units} unit(s) x {m.rounds} rounds)", flush=True)


def _run_sync(
    env: Env, workloads: list[Workload], plans: dict[str, Plan], out: dict[str, Any]
) -> None:
    env.setup_sync()
    pool = env.manager.engine.pool
    probe = pool.checkedout if env.backend == "postgresql" else None
    for workload in workloads:
        runners = workload.build(env, workload.name)
        m = measure_sync(runners, _plan_for(plans, workload), workload.tx_per_unit, probe)
        rows = {v: env.count_sync(workload.tag(v)) for v in runners}
        entry = out[workload.name]
        _finish(entry, workload, m, rows)
        if probe is not None:
            entry["pool_after"] = env.manager.pool_status()["sync"]


async def _run_async(
    env: Env, workloads: list[Workload], plans: dict[str, Plan], out: dict[str, Any]
) -> None:
    await env.setup_async()
    pool = env.manager.async_engine.pool
    probe = pool.checkedout if env.backend == "postgresql" else None
    for workload in workloads:
        runners = workload.build(env, workload.name)
        m = await measure_async(runners, _plan_for(plans, workload), workload.tx_per_unit, probe)
        rows = {v: await env.count_async(workload.tag(v)) for v in runners}
        entry = out[workload.name]
        _finish(entry, workload, m, rows)
        if probe is not None:
            entry["pool_after"] = env.manager.pool_status()["async"]
            entry["sessionscope_active_sessions_after"] = env.manager.stats.active_sessions


async def _async_phase(
    sqlite_env: Env | None,
    pg_runs: list[tuple[Env, list[Workload]]],
    sqlite_wl: list[Workload],
    plans: dict[str, Plan],
    out: dict[str, Any],
) -> None:
    if sqlite_env is not None and sqlite_wl:
        await _run_async(sqlite_env, sqlite_wl, plans, out)
        await sqlite_env.aclose()
    for pg_env, pg_wl in pg_runs:
        try:
            if pg_wl:
                await _run_async(pg_env, pg_wl, plans, out)
        finally:
            await pg_env.aclose()


def _added_latency(direct: str, proxied: str, n: int = 200) -> dict[str, float]:
    """Median time of a ``SELECT 1`` round trip straight to the server and through
    the proxy, in microseconds: what the proxy really adds (its timer has about
    a millisecond's granularity)."""
    medians = {}
    for label, url in (("direct_us", direct), ("proxied_us", proxied)):
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    cursor.execute("SELECT 1")
                    cursor.fetchall()
                    times.append(time.perf_counter() - t0)
                medians[label] = round(statistics.median(times) * 1e6, 1)
        finally:
            engine.dispose()
    medians["added_us"] = round(medians["proxied_us"] - medians["direct_us"], 1)
    return medians


def _apply_instructions(out: dict[str, Any], counts: dict[str, dict[str, list[float]]]) -> None:
    """Mean instructions per transaction over the layouts, and the mean of the
    per-layout ratios to raw with their range. For a throughput workload (whose
    process is CPU-bound) also the throughput those counts predict, relative to
    raw and to the hand-written ceiling: the inverse cost ratios."""
    for name, per_variant in counts.items():
        entry = out.get(name)
        if entry is None or "variants" not in entry:
            continue
        base = per_variant.get("raw")
        ceiling = per_variant.get("raw_close")
        for variant, per_layout in per_variant.items():
            fig = entry["variants"].get(variant)
            if fig is None:
                continue
            fig["instructions_per_tx"] = round(statistics.fmean(per_layout))
            if base:
                ratios = [x / b for x, b in zip(per_layout, base, strict=True)]
                fig["instructions_ratio"] = round(statistics.fmean(ratios), 4)
                fig["instructions_ratio_layouts"] = [round(r, 4) for r in ratios]
                if entry["throughput"]:
                    inverse = statistics.fmean(1 / r for r in ratios)
                    fig["instructions_throughput_ratio"] = round(inverse, 4)
            if entry["throughput"] and ceiling and variant != "raw_close":
                shares = [c / x for x, c in zip(per_layout, ceiling, strict=True)]
                fig["instructions_vs_raw_close"] = round(statistics.fmean(shares), 4)


def evaluate_targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its wall-clock and instruction ratios; ``met`` is True only
    if every figure available meets it (None when nothing was measured). A target
    with ``basis: instructions`` (the SQLite overhead targets of issue 13, which
    wall clock on a shared 2-core machine cannot resolve to a per cent) is judged
    on the instruction ratio, the wall-clock one shown beside it; so is a
    throughput target (its ``instructions_field``), whose process is CPU-bound:
    client instructions per transaction, counted against the real server, decide
    its throughput, and wall clock on this machine does not resolve 2% (the
    ceiling measured against itself in the same rounds shows how far it does)."""
    results = []
    for target in TARGETS:
        row: dict[str, Any] = dict(target)
        entry = out.get(target["workload"], {})
        fig = entry.get("variants", {}).get(target["variant"])
        checks: list[bool] = []
        by_instructions = target.get("basis") == "instructions" or "instructions_field" in target
        counted = target.get("instructions_field", "instructions_ratio")
        if fig is not None and target.get("field", "ratio") in fig:
            row["wall"] = fig[target.get("field", "ratio")]
            if not (by_instructions and counted in fig):
                checks.append(_meets(row["wall"], target))
            if counted in fig:
                row["instructions"] = fig[counted]
                checks.append(_meets(fig[counted], target))
            if "pool_after" in entry:
                out_now = entry["pool_after"].get("checked_out")
                row["pool_checked_out_after"] = out_now
                checks.append(out_now == 0 and fig.get("pool_checked_out_after_batches_max") == 0)
        row["met"] = all(checks) if checks else None
        results.append(row)
    return results


def _meets(value: float, target: dict[str, Any]) -> bool:
    limit: float = target["limit"]
    return value <= limit if target["op"] == "<=" else value >= limit


# -- command line ------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="sessionscope vs raw SQLAlchemy and peer libraries (SPEC section 5)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="half the rounds")
    size.add_argument(
        "--smoke", action="store_true", help="a few iterations: proves the suite runs (CI)"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated substrings of workload names to run"
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("SESSIONSCOPE_BENCH_PG_URL", DEFAULT_PG_URL),
        help=f"PostgreSQL URL, created if missing (default {DEFAULT_PG_URL})",
    )
    parser.add_argument(
        "--no-postgresql", action="store_true", help="skip the PostgreSQL workloads"
    )
    parser.add_argument("--no-callgrind", action="store_true", help="skip instruction counts")
    parser.add_argument(
        "--callgrind-n", type=int, default=None, help="N of the N / 2N callgrind runs (default 256)"
    )
    parser.add_argument(
        "--callgrind-layouts",
        type=int,
        default=None,
        help="memory layouts to average the counts over (default 4; 1 with --smoke)",
    )
    parser.add_argument(
        "--callgrind-only",
        default=None,
        help="comma-separated substrings of the workloads to count (default: every SQLite "
        "one and, client side, the 200-task one; with --smoke: the decorator ones, which "
        "import no peer library)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results", help="where to write results"
    )
    parser.add_argument("--name", default="latest", help="file stem of the results (latest)")
    parser.add_argument("--no-png", action="store_true", help="do not draw the chart")
    parser.add_argument(
        "--recount",
        type=Path,
        default=None,
        help="count instructions only, into this results file of an earlier run "
        "(its wall-clock figures kept; the code counted is recorded)",
    )
    return parser.parse_args(argv)


def _recount(args: argparse.Namespace) -> int:
    """Instruction counts for the workloads of an earlier run's results file,
    written back into it: for a run whose counting failed, or code changed since
    its wall clock was measured (``meta.callgrind.code`` says which)."""
    doc = json.loads(args.recount.read_text())
    names = [n for n, e in doc["workloads"].items() if "variants" in e]
    workloads = [by_name(n) for n in names]
    counted = [w for w in workloads if w.backend == "sqlite" or w.client_bound]
    layouts = args.callgrind_layouts or callgrind.LAYOUTS
    n = args.callgrind_n or 8 * JOURNAL_LIMIT
    print(f"  callgrind: counting instructions (N={n} and 2N, {layouts} layout(s))...", flush=True)
    counts, details = callgrind.count(counted, n, 20, layouts, server_url=args.pg_url)
    details["valgrind"] = callgrind.valgrind_version()
    details["code"] = collect_meta()["sessionscope"]
    doc["meta"]["callgrind"] = details
    _apply_instructions(doc["workloads"], counts)
    doc["targets"] = evaluate_targets(doc["workloads"])
    report.write_json(doc, args.recount)
    if not args.no_png:
        report.write_png(doc, args.recount.with_suffix(".png"))
    print(report.render_table(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.recount is not None:
        return _recount(args)
    profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    plans = _plans(profile)
    filters = [f.strip() for f in args.only.split(",") if f.strip()]
    selected = [w for w in WORKLOADS if not filters or any(f in w.name for f in filters)]
    started = time.perf_counter()
    meta = collect_meta()
    meta["profile"] = profile
    meta["plans"] = {k: vars(v) for k, v in plans.items()}
    out: dict[str, dict[str, Any]] = {w.name: _entry(w) for w in selected}

    pg_wanted = [w for w in selected if w.backend == "postgresql"]
    pg_envs: dict[float, Env] = {}  # by latency added
    proxies: list[Proxy] = []
    if pg_wanted:
        reason = "--no-postgresql given" if args.no_postgresql else None
        if reason is None:
            version, reason = _prepare_postgresql(args.pg_url)
            meta["postgresql"] = version
        if reason is not None:
            for w in pg_wanted:
                out[w.name]["skipped"] = reason
            pg_wanted = []
        else:
            for latency in sorted({w.latency for w in pg_wanted}):
                url = args.pg_url
                if latency:
                    target = make_url(args.pg_url)
                    proxy = Proxy(target.host or "127.0.0.1", target.port or 5432, delay=latency)
                    proxies.append(proxy.start())
                    url = target.set(host="127.0.0.1", port=proxy.port).render_as_string(
                        hide_password=False
                    )
                    meta.setdefault("latency_proxy", {})[str(latency)] = _added_latency(
                        args.pg_url, url
                    )
                pg_envs[latency] = Env("postgresql", url, tag=f"_{round(latency * 1e6)}us")
    meta["postgresql_url"] = make_url(args.pg_url).render_as_string(hide_password=True)

    print(f"sessionscope benchmarks ({profile}), {len(selected)} workload(s)", flush=True)
    sqlite_sync = [w for w in selected if w.backend == "sqlite" and w.mode == "sync"]
    sqlite_async = [w for w in selected if w.backend == "sqlite" and w.mode == "async"]
    sqlite_env = Env("sqlite", "sqlite://") if (sqlite_sync or sqlite_async) else None
    try:
        if sqlite_env is not None and sqlite_sync:
            _run_sync(sqlite_env, sqlite_sync, plans, out)
        for latency, pg_env in pg_envs.items():
            pg_sync = [w for w in pg_wanted if w.mode == "sync" and w.latency == latency]
            if pg_sync:
                _run_sync(pg_env, pg_sync, plans, out)
        asyncio.run(
            _async_phase(
                sqlite_env,
                [
                    (env, [w for w in pg_wanted if w.mode == "async" and w.latency == latency])
                    for latency, env in pg_envs.items()
                ],
                sqlite_async,
                plans,
                out,
            )
        )
    finally:
        for pg_env in pg_envs.values():
            pg_env.close()
        for proxy in proxies:
            proxy.stop()
    meta["machine"]["loadavg_after_wall_clock"] = [round(x, 2) for x in os.getloadavg()]

    counted = [w for w in selected if w.backend == "sqlite" or (w in pg_wanted and w.client_bound)]
    only = args.callgrind_only
    if only is None and args.smoke:
        # Valgrind start-up with the peers imported takes ~30 s; the smoke run only
        # has to prove the counting works.
        only = "decorator_"
    if only:
        keep = [f.strip() for f in only.split(",") if f.strip()]
        counted = [w for w in counted if any(f in w.name for f in keep)]
    if counted and not args.no_callgrind:
        if callgrind.available() is None:
            meta["callgrind"] = "valgrind not installed: no instruction counts"
        else:
            # A multiple of the statistics journal's length, so each measured span
            # folds it the same number of times; and long: the same code measured
            # up to 1.4% of an insert apart between memory layouts at N=64, at most
            # 0.7% at 256. Every layout there is: with the six sync workloads in
            # one child, two layouts of the same scope still differed by 1.2%,
            # more than the margin a target is judged at.
            n = args.callgrind_n or (2 if args.smoke else 8 * JOURNAL_LIMIT)
            warmup = 1 if args.smoke else 20
            layouts = args.callgrind_layouts or (1 if args.smoke else callgrind.LAYOUTS)
            print(
                f"  callgrind: counting instructions (N={n} and 2N, {layouts} layout(s))...",
                flush=True,
            )
            try:
                counts, details = callgrind.count(
                    counted, n, warmup, layouts, server_url=args.pg_url if pg_wanted else None
                )
            except RuntimeError as err:
                # Keep the wall-clock figures of the run; say why counts are missing.
                meta["callgrind"] = f"failed: {str(err).splitlines()[0]}"
                print(f"  callgrind {meta['callgrind']}", file=sys.stderr)
            else:
                details["valgrind"] = callgrind.valgrind_version()
                meta["callgrind"] = details
                _apply_instructions(out, counts)
    meta["seconds"] = round(time.perf_counter() - started, 1)

    doc = {
        "meta": meta,
        "peers": {p: LABELS[p] for p in PEERS},
        "labels": LABELS,
        "workloads": out,
        "targets": evaluate_targets(out),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(doc, args.out / f"{args.name}.json")
    if not args.no_png:
        report.write_png(doc, args.out / f"{args.name}.png")
    print(report.render_table(doc))
    print(
        f"\n{meta['seconds']} s; results in {args.out / (args.name + '.json')}"
        + ("" if args.no_png else f" and {args.name}.png")
    )
    bad = [n for n, e in out.items() if e.get("rows_verified") is False]
    if bad:
        print(f"ERROR: contenders did not commit the expected rows in {bad}", file=sys.stderr)
        return 1
    return 0
