"""Memory per transaction and bounded statistics: ``python -m benchmarks.memory``.

Two measurements, written to ``results/memory.json`` (``--out``, ``--name``):

* **Per workload and contender** (the in-memory SQLite workloads of
  :mod:`benchmarks.workloads`), each in a fresh child process so its peak RSS is
  its own: after a warm-up, ``--n`` transactions, then the peak RSS of the
  process (``ru_maxrss``); then, under ``tracemalloc``, the memory one
  transaction allocates at its high point (peak traced bytes minus the bytes
  live before it, median over ``--samples`` transactions) and what is still live
  after ``--n`` more (a leak shows as bytes retained per transaction).
* **Bounded statistics** (``--functions``, ``--transactions``): a manager
  decorates that many distinct functions and calls them round robin for that
  many transactions (empty bodies: the statistics are what is measured); the
  process's current RSS and the size of the per-function table are sampled every
  tenth of the run. After the first pass (every function seen once) the RSS
  must stay flat.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from .env import Env
from .workloads import LABELS, WORKLOADS, Workload, by_name

__all__ = ["main"]

_ROOT = Path(__file__).resolve().parent.parent
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_now() -> int:
    """Current resident set size in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# -- per workload ----------------------------------------------------------------------


def _measure_sync(run: Any, n: int, samples: int, warmup: int) -> dict[str, Any]:
    run(warmup)
    run(n)
    peak_rss = _peak_rss()
    gc.collect()
    tracemalloc.start()
    run(warmup)  # the tracer's own first allocations
    per_tx = []
    for _ in range(samples):
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        run(1)
        per_tx.append(tracemalloc.get_traced_memory()[1] - before)
    gc.collect()
    live_before = tracemalloc.get_traced_memory()[0]
    run(n)
    gc.collect()
    retained = tracemalloc.get_traced_memory()[0] - live_before
    tracemalloc.stop()
    return _figures(per_tx, retained, n, peak_rss)


async def _measure_async(run: Any, n: int, samples: int, warmup: int) -> dict[str, Any]:
    await run(warmup)
    await run(n)
    peak_rss = _peak_rss()
    gc.collect()
    tracemalloc.start()
    await run(warmup)
    per_tx = []
    for _ in range(samples):
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        await run(1)
        per_tx.append(tracemalloc.get_traced_memory()[1] - before)
    gc.collect()
    live_before = tracemalloc.get_traced_memory()[0]
    await run(n)
    gc.collect()
    retained = tracemalloc.get_traced_memory()[0] - live_before
    tracemalloc.stop()
    return _figures(per_tx, retained, n, peak_rss)


def _figures(per_tx: list[int], retained: int, n: int, peak_rss: int) -> dict[str, Any]:
    return {
        "alloc_peak_bytes_per_tx": round(statistics.median(per_tx)),
        "retained_bytes_per_tx": round(retained / n, 1),
        "peak_rss_mib": round(peak_rss / 2**20, 1),
    }


def _child(workload_name: str, variant: str, n: int, samples: int, warmup: int) -> None:
    workload = by_name(workload_name)
    env = Env("sqlite", "sqlite://")
    if workload.mode == "sync":
        env.setup_sync()
        run = workload.build(env, workload.name)[variant]
        result = _measure_sync(run, n, samples, warmup)
        env.close()
    else:

        async def main() -> dict[str, Any]:
            await env.setup_async()
            run = workload.build(env, workload.name)[variant]
            figures = await _measure_async(run, n, samples, warmup)
            await env.aclose()
            return figures

        result = asyncio.run(main())
    print(json.dumps(result))


def _variants(workload: Workload) -> list[str]:
    """The contenders of ``workload`` (built on a throwaway environment)."""
    env = Env("sqlite", "sqlite://")
    if workload.mode == "sync":
        env.setup_sync()
        names = list(workload.build(env, workload.name))
        env.close()
        return names

    async def main() -> list[str]:
        await env.setup_async()
        names = list(workload.build(env, workload.name))
        await env.aclose()
        return names

    return asyncio.run(main())


def per_workload(
    workloads: list[Workload], n: int, samples: int, warmup: int
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    env = dict(os.environ, PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    for workload in workloads:
        figures: dict[str, Any] = {}
        for variant in _variants(workload):
            cmd = [
                sys.executable, "-m", "benchmarks.memory", "--child", workload.name, variant,
                "--n", str(n), "--samples", str(samples), "--warmup", str(warmup),
            ]
            done = subprocess.run(
                cmd, cwd=_ROOT, env=env, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"{workload.name}/{variant} failed:\n{done.stderr[-3000:]}")
            figures[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        base = figures.get("raw", {}).get("alloc_peak_bytes_per_tx")
        for fig in figures.values():
            if base:
                fig["alloc_vs_raw"] = round(fig["alloc_peak_bytes_per_tx"] / base, 4)
        out[workload.name] = figures
        print(f"  {workload.name}: " + ", ".join(
            f"{v} {f['alloc_peak_bytes_per_tx']} B ({f.get('alloc_vs_raw', 0):.3f}x)"
            for v, f in figures.items()
        ), flush=True)
    return out


# -- bounded statistics ---------------------------------------------------------------


def bounded_stats(functions: int, transactions: int) -> dict[str, Any]:
    """Many distinct decorated functions, called round robin; RSS sampled."""
    from sessionscope import SessionManager
    from sessionscope._stats import FUNCTION_LIMIT

    manager = SessionManager("sqlite://")
    made = []
    for i in range(functions):

        def body(session: Any) -> None:
            return None

        body.__qualname__ = f"generated_{i}"
        made.append(manager.with_session(body))
    gc.collect()
    start_rss = _rss_now()
    samples = []
    step = max(1, transactions // 10)
    started = time.perf_counter()
    for done in range(1, transactions + 1):
        made[done % functions]()
        if done % step == 0:
            gc.collect()
            samples.append(
                {
                    "transactions": done,
                    "rss_mib": round(_rss_now() / 2**20, 2),
                    "functions_in_stats": len(manager.stats.functions),
                }
            )
            print(f"  {done:>9,} tx: {samples[-1]}", flush=True)
    seconds = time.perf_counter() - started
    stats = manager.get_stats()
    after_warmup = [s["rss_mib"] for s in samples if s["transactions"] >= functions]
    return {
        "functions": functions,
        "transactions": transactions,
        "function_limit": FUNCTION_LIMIT,
        "rss_mib_after_creating_functions": round(start_rss / 2**20, 2),
        "samples": samples,
        "rss_growth_after_first_pass_mib": round(max(after_warmup) - min(after_warmup), 2)
        if after_warmup
        else None,
        "functions_in_stats": len(stats["functions"]),
        "total_transactions": stats["total_transactions"],
        "seconds": round(seconds, 1),
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--only", default="", help="comma-separated substrings of workload names")
    parser.add_argument("--n", type=int, default=2000, help="transactions per batch (2000)")
    parser.add_argument("--samples", type=int, default=200, help="transactions sampled (200)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--functions", type=int, default=100_000)
    parser.add_argument("--transactions", type=int, default=1_000_000)
    parser.add_argument("--no-bounded", action="store_true", help="skip the bounded-stats run")
    parser.add_argument("--no-workloads", action="store_true", help="skip the per-workload run")
    parser.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="memory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        _child(args.child[0], args.child[1], args.n, args.samples, args.warmup)
        return 0
    filters = [f.strip() for f in args.only.split(",") if f.strip()]
    selected = [
        w for w in WORKLOADS
        if w.backend == "sqlite" and (not filters or any(f in w.name for f in filters))
    ]
    doc: dict[str, Any] = {
        "python": sys.version.split()[0],
        "labels": LABELS,
        "settings": {"n": args.n, "samples": args.samples, "warmup": args.warmup},
    }
    if not args.no_workloads:
        print(f"memory per transaction, {len(selected)} workload(s)", flush=True)
        doc["workloads"] = per_workload(selected, args.n, args.samples, args.warmup)
    if not args.no_bounded:
        print(f"bounded statistics: {args.transactions:,} transactions across "
              f"{args.functions:,} decorated functions", flush=True)
        doc["bounded_stats"] = bounded_stats(args.functions, args.transactions)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
