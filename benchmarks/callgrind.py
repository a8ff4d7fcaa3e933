"""Instructions per transaction, counted with valgrind's callgrind.

Wall-clock ratios wobble on a shared machine; instruction counts repeat from run
to run. A child process runs under callgrind and, for each contender, does a
warm-up, then ``N`` transactions, then ``2N``, calling ``os.getppid()`` at each
boundary. Callgrind is started with ``--dump-before=getppid``, so every boundary
writes the counts since the previous one to a new part file. The ``2N`` part
minus the ``N`` part is the cost of ``N`` transactions with start-up, imports,
warm-up and the boundary calls cancelled out.

The counts repeat exactly for the same code and environment, but memory layout
moves them: a longer environment shifts the stack, which changes alignment-
dependent paths in libc and address-dependent ordering in the interpreter, by up
to about 1.5% of an ORM insert. Each child therefore runs in several layouts (an
environment variable of a different length) and the figures are their mean; the
spread is reported beside them.

Every contender starts from an empty table (a bigger B-tree makes inserts
dearer, which would penalise whoever is measured later). The in-memory SQLite
workloads are counted whole. Of the PostgreSQL ones, only those whose client
process is the bottleneck (``Workload.client_bound``: the 200-task workload,
whose process is on a CPU nearly all of its wall time) are counted, client side
only, against the real server: the server's work happens in other processes that
callgrind does not see, and which every contender asks of it alike. There ``N``
is a number of units (200 transactions each).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

from .env import Env
from .workloads import Workload, by_name

__all__ = ["LAYOUTS", "available", "count", "valgrind_version"]

_ROOT = Path(__file__).resolve().parent.parent
_TOTALS = re.compile(rb"^(?:totals|summary):\s*(\d+)", re.MULTILINE)


def available() -> str | None:
    """Path of valgrind, or None when it is not installed."""
    return shutil.which("valgrind")


def valgrind_version() -> str | None:
    exe = available()
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def _marker() -> None:
    os.getppid()  # callgrind dumps its counters right before this call


def _child(
    mode: str, names: list[str], n: int, warmup: int, order_file: str, url: str | None
) -> None:
    workloads = [by_name(name) for name in names]
    order: list[list[str]] = []
    # Under valgrind, with other children on the same cores, a task of the
    # 200-task workload can queue for a pooled connection longer than the
    # default 30 s: only the timeout is raised, the pool stays at 10.
    env = (
        Env("sqlite", "sqlite://")
        if url is None
        else Env("postgresql", url, tag="_cg", pool_timeout=3600)
    )
    if mode == "sync":
        env.setup_sync()
        for workload in workloads:  # first use of every path: caches, heap growth
            for run in workload.build(env, workload.name).values():
                run(warmup)
        gc.collect()
        gc.freeze()
        for workload in workloads:
            for variant, run in workload.build(env, workload.name).items():
                env.clear_sync()
                run(warmup)
                gc.collect()
                _marker()
                run(n)
                gc.collect()
                _marker()
                run(2 * n)
                gc.collect()
                _marker()
                order.append([workload.name, variant])
        env.close()
    else:

        async def main() -> None:
            await env.setup_async()
            for workload in workloads:
                for run in workload.build(env, workload.name).values():
                    await run(warmup)
            gc.collect()
            gc.freeze()
            for workload in workloads:
                for variant, run in workload.build(env, workload.name).items():
                    await env.clear_async()
                    await run(warmup)
                    gc.collect()
                    _marker()
                    await run(n)
                    gc.collect()
                    _marker()
                    await run(2 * n)
                    gc.collect()
                    _marker()
                    order.append([workload.name, variant])
            await env.aclose()

        asyncio.run(main())
    Path(order_file).write_text(json.dumps(order))


def _parts(directory: Path, pid: int) -> list[int]:
    """Instruction totals of the numbered part files, in dump order."""
    found: list[tuple[int, int]] = []
    for path in directory.glob(f"cg.{pid}.*"):
        suffix = path.name.rsplit(".", 1)[1]
        if not suffix.isdigit():
            continue
        match = _TOTALS.search(path.read_bytes())
        if match is None:
            raise RuntimeError(f"callgrind part {path.name} has no totals line")
        found.append((int(suffix), int(match.group(1))))
    return [total for _, total in sorted(found)]


_LAYOUT_PADS = (0, 37, 101, 211)  # environment padding per layout, in characters
LAYOUTS: Final = len(_LAYOUT_PADS)
"""How many memory layouts :func:`count` can run, the full suite's default."""


_Job = tuple[str, "subprocess.Popen[bytes]", Path, Any]  # tag, child, order file, log


def count(
    workloads: list[Workload],
    n: int,
    warmup: int,
    layouts: int = 2,
    workdir: Path | None = None,
    server_url: str | None = None,
    server_n: int = 2,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """Instructions per transaction for every contender of ``workloads``, in
    ``layouts`` memory layouts: the in-memory SQLite ones with ``n`` transactions,
    and, given ``server_url``, the async client-bound PostgreSQL ones (client side)
    with ``server_n`` units. Each kind and layout runs as a separate child: the
    SQLite children side by side, then the server children side by side once they
    have ended. A server child's count depends on how often a task finds its reply
    waiting, so the server must not queue for a CPU behind eight valgrind
    processes: run among them, the same code counted up to 2% more client
    instructions per transaction than run alone.

    Returns ``{workload: {variant: [instructions per layout]}}`` and run details.
    """
    if not 1 <= layouts <= len(_LAYOUT_PADS):
        raise ValueError(f"layouts must be 1..{len(_LAYOUT_PADS)}, got {layouts}")
    exe = available()
    if exe is None:
        raise RuntimeError("valgrind is not installed")
    tmp = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="ss-cg-"))
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p
    )
    kinds: list[tuple[str, str, list[Workload], int]] = [
        (mode, mode, [w for w in workloads if w.mode == mode and w.backend == "sqlite"], n)
        for mode in ("sync", "async")
    ]
    if server_url is not None:
        server = [w for w in workloads if w.client_bound and w.mode == "async"]
        kinds.append(("server", "async", server, server_n))
    per_tx = {w.name: length * w.tx_per_unit for _, _, chosen, length in kinds for w in chosen}
    def start(kind: str, mode: str, names: list[str], length: int, layout: int) -> _Job:
        tag = f"{kind}-{layout}"
        order_file = tmp / f"order-{tag}.json"
        log = (tmp / f"valgrind-{tag}.log").open("wb")
        child_env = dict(env, SS_BENCH_LAYOUT="x" * _LAYOUT_PADS[layout])
        cmd = [
            exe,
            "--tool=callgrind",
            "--dump-before=getppid",
            f"--callgrind-out-file={tmp}/cg.%p",
            sys.executable,
            "-m",
            "benchmarks.callgrind",
            "--child",
            mode,
            "--n",
            str(length),
            "--warmup",
            str(warmup if kind != "server" else 1),
            "--order-file",
            str(order_file),
            *(["--url", server_url] if kind == "server" and server_url else []),
            *names,
        ]
        proc = subprocess.Popen(
            cmd, cwd=_ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT
        )
        return tag, proc, order_file, log

    jobs: list[_Job] = []
    for wave in ([k for k in kinds if k[0] != "server"], [k for k in kinds if k[0] == "server"]):
        started = [
            start(kind, mode, [w.name for w in chosen], length, layout)
            for (kind, mode, chosen, length), layout in itertools.product(wave, range(layouts))
            if chosen
        ]
        for _tag, proc, _order_file, log in started:
            proc.wait()
            log.close()
        # A failed child fails the count: say so now, not after the next wave.
        for tag, proc, _order_file, _log in started:
            if proc.returncode != 0:
                tail = (tmp / f"valgrind-{tag}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"callgrind child ({tag}) exited with {proc.returncode}:\n{tail}"
                )
        jobs += started
    counts: dict[str, dict[str, list[float]]] = {}
    for tag, proc, order_file, _log in jobs:
        order = json.loads(order_file.read_text())
        parts = _parts(tmp, proc.pid)
        if len(parts) != 3 * len(order):
            raise RuntimeError(
                f"callgrind ({tag}) wrote {len(parts)} parts for {len(order)} contenders; "
                "something else called getppid()"
            )
        for j, (workload, variant) in enumerate(order):
            once, twice = parts[3 * j + 1], parts[3 * j + 2]
            counts.setdefault(workload, {}).setdefault(variant, []).append(
                (twice - once) / per_tx[workload]
            )
    details = {
        "n": n,
        "server_n_units": server_n if server_url is not None else None,
        "warmup": warmup,
        "layouts": layouts,
        "pythonhashseed": 0,
        "workdir": str(tmp),
    }
    if workdir is None:
        shutil.rmtree(tmp, ignore_errors=True)
        details.pop("workdir")
    return counts, details


def _main() -> None:
    parser = argparse.ArgumentParser(description="callgrind child (internal)")
    parser.add_argument("--child", choices=("sync", "async"), required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--order-file", required=True)
    parser.add_argument("--url", default=None, help="PostgreSQL URL (server workloads)")
    parser.add_argument("workloads", nargs="+")
    args = parser.parse_args()
    _child(args.child, args.workloads, args.n, args.warmup, args.order_file, args.url)


if __name__ == "__main__":
    _main()
