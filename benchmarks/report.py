"""Rendering of a result document: the text table, the JSON file and the PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .workloads import LABELS

__all__ = ["render_table", "write_json", "write_png"]


def _fmt_int(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _fmt_ratio(value: float | None, q1: float | None = None, q3: float | None = None) -> str:
    if value is None:
        return "-"
    if q1 is None or q3 is None:
        return f"{value:.3f}x"
    return f"{value:.3f}x [{q1:.2f}-{q3:.2f}]"


def _instr(wl: dict[str, Any], fig: dict[str, Any]) -> float | None:
    """The instruction ratio shown beside the wall-clock one: for a throughput
    workload the throughput the counts predict (higher is better), as its wall
    column is."""
    key = "instructions_throughput_ratio" if wl["throughput"] else "instructions_ratio"
    value: float | None = fig.get(key)
    return value


def _ceiling_line(wl: dict[str, Any]) -> str | None:
    """Each contender's share of the hand-written ceiling (wall clock and
    instructions) and how CPU-bound the process was, for a workload that has one."""
    variants = wl["variants"]
    if "raw_close" not in variants:
        return None
    shares = ", ".join(
        f"{LABELS.get(v, v)} {_fmt_ratio(f.get('vs_raw_close'))}"
        f" / {_fmt_ratio(f.get('instructions_vs_raw_close'))}"
        for v, f in variants.items()
        if "vs_raw_close" in f
    )
    cpu = [f["cpu_share"] for f in variants.values() if "cpu_share" in f]
    busy = f"; process on a CPU {min(cpu):.0%}-{max(cpu):.0%} of the wall time" if cpu else ""
    return f"share of the hand-written ceiling (wall / instructions): {shares}{busy}"


def render_table(doc: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of a run."""
    lines: list[str] = []
    head = (
        f"{'contender':<34} {'us/tx':>9} {'tx/s':>8}  {'wall vs raw [IQR]':<24}"
        f" {'instr/tx':>11} {'instr vs raw':>12}"
    )
    for name, wl in doc["workloads"].items():
        lines.append("")
        lines.append(f"{wl['group']} | {name}: {wl['title']}")
        if "skipped" in wl:
            lines.append(f"  skipped: {wl['skipped']}")
            continue
        direction = "throughput ratio, higher is better" if wl["throughput"] else "lower is better"
        lines.append(
            f"  ({wl['rounds']} rounds x {wl['units']} unit(s), {wl['tx_per_unit']} tx/unit; "
            f"ratio = median of per-round ratios, {direction})"
        )
        lines.append("  " + head)
        for variant, fig in wl["variants"].items():
            label = LABELS.get(variant, variant)
            lines.append(
                f"  {label:<34} {fig['median_us_per_tx']:>9.1f} {fig['tx_per_s']:>8.0f}  "
                f"{_fmt_ratio(fig['ratio'], fig['ratio_q1'], fig['ratio_q3']):<24}"
                f" {_fmt_int(fig.get('instructions_per_tx')):>11}"
                f" {_fmt_ratio(_instr(wl, fig)):>12}"
            )
        for peer, reason in wl["not_applicable"].items():
            lines.append(f"  {LABELS.get(peer, peer):<34} n/a: {reason}")
        ceiling = _ceiling_line(wl)
        if ceiling is not None:
            lines.append(f"  {ceiling}")
        if "pool_after" in wl:
            lines.append(f"  pool afterwards: {wl['pool_after']}")
    lines.append("")
    lines.append("Targets (SPEC section 5)")
    lines.append(f"  {'target':<58} {'limit':>8} {'wall':>8} {'instr':>8}  met")
    for t in doc["targets"]:
        limit = f"{t['op']}{t['limit']:.2f}"
        extra = ""
        if "pool_checked_out_after" in t:
            extra = f" (pool checked out afterwards: {t['pool_checked_out_after']})"
        met = {True: "yes", False: "NO", None: "?"}[t["met"]]
        lines.append(
            f"  {t['name']:<58} {limit:>8} {_fmt_ratio(t.get('wall')):>8}"
            f" {_fmt_ratio(t.get('instructions')):>8}  {met}{extra}"
        )
    return "\n".join(lines)


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def write_png(doc: dict[str, Any], path: Path) -> None:
    """Bar chart: each contender's cost relative to raw SQLAlchemy (time per
    transaction, and instructions per transaction where counted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, float, float | None, str]] = []
    for name, wl in doc["workloads"].items():
        if "skipped" in wl:
            continue
        for variant, fig in wl["variants"].items():
            if variant == "raw":
                continue
            wall = fig["ratio"]
            label = f"{name} | {LABELS.get(variant, variant)}"
            if wl["throughput"]:
                label += f" (throughput {wall:.2f}x)"
                wall = 1.0 / wall
            rows.append((label, wall, fig.get("instructions_ratio"), variant))
    if not rows:
        return
    colours = {
        "fastapi_async_sqlalchemy": "#8c6bb1",
        "advanced_alchemy": "#e6842a",
        "raw_close": "#999999",
        "raw_close_again": "#777777",
        "raw_recipe": "#cccccc",
    }
    height = max(4.0, 0.28 * len(rows) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(15, height), sharey=True)
    ys = list(range(len(rows)))[::-1]
    colour = [colours.get(r[3], "#2b8cbe") for r in rows]
    axes[0].barh(ys, [r[1] for r in rows], color=colour)
    axes[0].set_title("wall clock per tx vs plain raw = 1.0 (median of rounds)", fontsize=9)
    instr = [r[2] if r[2] is not None else 0.0 for r in rows]
    axes[1].barh(ys, instr, color=colour)
    axes[1].set_title(
        "instructions per tx vs plain raw (callgrind: SQLite in memory, and the client of"
        " the 200-task workload)",
        fontsize=9,
    )
    for ax in axes:
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("x raw (lower is better)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([r[0] for r in rows], fontsize=7)
    from matplotlib.patches import Patch

    legend = [Patch(color="#2b8cbe", label="sessionscope")]
    legend.append(Patch(facecolor="white", edgecolor="black", label="plain raw SQLAlchemy = 1.0"))
    legend += [
        Patch(color=colour, label=LABELS[key]) for key, colour in colours.items()
    ]
    fig.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=8)
    meta = doc["meta"]
    fig.suptitle(
        f"sessionscope {meta['sessionscope']} vs raw SQLAlchemy {meta['packages']['sqlalchemy']}"
        f" and peers - {meta['date']} - {meta['machine']['cpu']} x{meta['machine']['cores']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def render_markdown(doc: dict[str, Any]) -> str:
    """The result table as Markdown, for the README (``python -m benchmarks.report``)."""
    meta = doc["meta"]
    pk = meta["packages"]
    cg = meta.get("callgrind")
    lines = [
        f"Measured {meta['date']} on {meta['machine']['cpu']} x{meta['machine']['cores']} "
        f"({meta['machine']['kernel']}, load average {meta['machine']['loadavg_start'][0]} "
        f"at start), CPython {meta['python']}, SQLAlchemy {pk['sqlalchemy']}, greenlet "
        f"{pk['greenlet']}, aiosqlite {pk['aiosqlite']} (SQLite {meta['sqlite']}), psycopg "
        f"{pk['psycopg']}, asyncpg {pk['asyncpg']}, PostgreSQL {meta.get('postgresql') or '-'}, "
        f"fastapi-async-sqlalchemy {pk['fastapi_async_sqlalchemy']}, advanced-alchemy "
        f"{pk['advanced_alchemy']}; sessionscope {meta['sessionscope']}."
        + (
            f" Instructions: callgrind ({cg['valgrind']}), N={cg['n']}, mean of "
            f"{cg['layouts']} memory layouts."
            if isinstance(cg, dict)
            else ""
        ),
        "",
        "| workload | contender | us/tx | wall vs raw [IQR] | instr/tx | instr vs raw |",
        "|---|---|---:|---|---:|---:|",
    ]
    for name, wl in doc["workloads"].items():
        if "skipped" in wl:
            lines.append(f"| {name} | skipped: {wl['skipped']} | | | | |")
            continue
        for variant, fig in wl["variants"].items():
            wall = f"{fig['ratio']:.3f}x [{fig['ratio_q1']:.2f}-{fig['ratio_q3']:.2f}]"
            if wl["throughput"]:
                wall += " throughput"
            lines.append(
                f"| {name} | {LABELS.get(variant, variant)} | {fig['median_us_per_tx']:.1f} | "
                f"{wall} | {_fmt_int(fig.get('instructions_per_tx'))} | "
                f"{_fmt_ratio(_instr(wl, fig))} |"
            )
    for name, wl in doc["workloads"].items():
        ceiling = _ceiling_line(wl) if "variants" in wl else None
        if ceiling is not None:
            lines += ["", f"{name}: {ceiling}."]
    missing: dict[tuple[str, str], list[str]] = {}
    for name, wl in doc["workloads"].items():
        for peer, reason in wl["not_applicable"].items():
            missing.setdefault((LABELS.get(peer, peer), reason), []).append(name)
    if missing:
        lines += ["", "No equivalent (not measured):", ""]
        for (peer, reason), names in missing.items():
            lines.append(f"- {peer}: {reason} ({', '.join(names)})")
    lines += ["", "| target | limit | wall | instr | met |", "|---|---:|---:|---:|---|"]
    for t in doc["targets"]:
        met = {True: "yes", False: "**no**", None: "?"}[t["met"]]
        if "pool_checked_out_after" in t:
            met += f" (pool checked out afterwards: {t['pool_checked_out_after']})"
        lines.append(
            f"| {t['name']} | {t['op']} {t['limit']:.2f} | {_fmt_ratio(t.get('wall'))} | "
            f"{_fmt_ratio(t.get('instructions'))} | {met} |"
        )
    return "\n".join(lines)


def render_memory_markdown(doc: dict[str, Any]) -> str:
    """The tables of ``python -m benchmarks.memory`` as Markdown."""
    lines = []
    labels = doc.get("labels", LABELS)
    if "workloads" in doc:
        lines += [
            "| workload | contender | allocated at the high point of a transaction | vs "
            "plain raw | retained per tx | peak RSS |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, figures in doc["workloads"].items():
            for variant, fig in figures.items():
                lines.append(
                    f"| {name} | {labels.get(variant, variant)} | "
                    f"{fig['alloc_peak_bytes_per_tx']:,} B | {fig.get('alloc_vs_raw', 0):.3f}x | "
                    f"{fig['retained_bytes_per_tx']:.1f} B | {fig['peak_rss_mib']:.1f} MiB |"
                )
    bounded = doc.get("bounded_stats")
    if bounded:
        lines += [
            "",
            f"{bounded['transactions']:,} transactions across {bounded['functions']:,} "
            f"decorated functions ({bounded['seconds']} s): RSS "
            + ", ".join(f"{s['rss_mib']:.1f}" for s in bounded["samples"])
            + f" MiB at each tenth; {bounded['functions_in_stats']} entries in the "
            f"per-function table (limit {bounded['function_limit']} + `<other>`); growth "
            f"after the first pass {bounded['rss_growth_after_first_pass_mib']} MiB.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    source = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/latest.json")
    loaded = json.loads(source.read_text())
    print(render_memory_markdown(loaded) if "meta" not in loaded else render_markdown(loaded))
