"""Bytecodes per transaction, by function: where a contender's cost over raw goes.

Callgrind counts a contender's instructions as one figure. This profile splits
it: every Python function's executed bytecodes are counted (``sys.settrace``
with opcode events) over ``N`` transactions of each contender of a sync SQLite
workload, and the table shows, per function, a contender's count minus raw's.
The counts are exact and repeat from run to run; a bytecode is not a fixed
number of machine instructions (an attribute store is cheap, a call is dear),
so this says *where* the overhead is, and callgrind says *how much*.

    python -m benchmarks.opcodes                       # insert_sync_sqlite
    python -m benchmarks.opcodes --workload decorator_sync_sqlite --top 40
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from .env import Env
from .workloads import by_name

__all__ = ["main", "profile"]

_ROOT = str(Path(__file__).resolve().parent.parent) + "/"


def _where(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in ("site-packages/", _ROOT):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    name = code.co_qualname if sys.version_info >= (3, 11) else code.co_name
    return f"{path}:{name}"


def profile(run: Callable[[int], None], n: int) -> Counter[str]:
    """Bytecodes executed by each function during ``run(n)``, summed."""
    counts: Counter[str] = Counter()

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        key = _where(frame)

        def on_event(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[key] += 1
            return on_event

        return on_event

    sys.settrace(on_call)
    try:
        run(n)
    finally:
        sys.settrace(None)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.opcodes", description=__doc__)
    parser.add_argument("--workload", default="insert_sync_sqlite")
    parser.add_argument("--n", type=int, default=50, help="transactions per contender")
    parser.add_argument("--top", type=int, default=30, help="functions shown per contender")
    args = parser.parse_args(argv)
    workload = by_name(args.workload)
    if workload.mode != "sync" or workload.backend != "sqlite":
        parser.error("only the sync SQLite workloads are profiled")
    env = Env("sqlite", "sqlite://")
    env.setup_sync()
    runners = workload.build(env, workload.name)
    for run in runners.values():  # first use of every path: caches, specialisation
        run(30)
    counts: dict[str, Counter[str]] = {}
    for variant, run in runners.items():
        env.clear_sync()
        run(10)
        counts[variant] = profile(run, args.n)
    env.close()
    raw = counts["raw"]
    print(f"{workload.name}: bytecodes per transaction (N={args.n})")
    for variant, found in counts.items():
        print(f"  {variant:24} {sum(found.values()) / args.n:10.1f}")
    for variant, found in counts.items():
        if variant == "raw":
            continue
        diff = {k: found[k] - raw[k] for k in found.keys() | raw.keys() if found[k] != raw[k]}
        total = sum(diff.values()) / args.n
        own = sum(d for k, d in diff.items() if k.startswith("src/sessionscope/")) / args.n
        print(f"\n{variant} minus raw: {total:+.1f} per transaction ({own:+.1f} in sessionscope)")
        for key, d in sorted(diff.items(), key=lambda item: -abs(item[1]))[: args.top]:
            print(f"  {d / args.n:+8.1f}  {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
