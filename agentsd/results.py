"""The benchmark's rows: their fields and run information, the speed targets read off them,
and the files they are written to (JSON, CSV, Markdown, a plot)."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

COMPILE_SUFFIX = "+compile"
FIELDS = (
    "arch", "size", "batch", "dtype", "device", "torch", "diffusers", "commit", "method", "preset",
    "median_ms", "p10_ms", "p90_ms", "peak_mb", "speedup", "ceiling_fraction", "saved_fraction", "repeats",
)  # fmt: skip


def git_commit() -> str:
    """The short commit of the checkout agentsd runs from, or "unknown" (an installed wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (times in ms, memory in MB)."""
    columns = ("arch", "size", "batch", "method", "median_ms", "p10_ms", "p90_ms", "peak_mb", "speedup",
               "ceiling_fraction", "saved_fraction")  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [
            "" if row[c] is None else (f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])) for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The speed targets the rows are read against (see `target_lines`).
CEILING_TARGET = 0.9  # fraction of the ceiling's speedup reached in the agent phase
TOMESD_TARGET = 1.3  # agentsd's speed over ToMe for SD at the same ratio
DEFAULT_AGENTSD = ("agentsd-agent", "agentsd-tome", "agentsd-schedule")


def _never_slower(by: dict[str, dict[str, Any]]) -> str:
    """The never-slower verdict of one scenario's rows (by method).

    A default agentsd row with a median above its baseline's is slower beyond the noise when
    its p10 is above the baseline's p90; otherwise its spread overlaps the baseline's and it
    is named as slower within the noise. The derived schedule row has no spread of its own
    and is never beyond the noise by itself.
    """
    beyond, within = [], []
    for method, row in by.items():
        suffix = COMPILE_SUFFIX if method.endswith(COMPILE_SUFFIX) else ""
        if method.removesuffix(suffix) not in DEFAULT_AGENTSD or row["speedup"] >= 1:
            continue
        base = by["baseline" + suffix]
        clear = row.get("p10_ms") is not None and base.get("p90_ms") is not None and row["p10_ms"] > base["p90_ms"]
        (beyond if clear else within).append(f"{method} {row['speedup']:.2f}x")
    if beyond:
        return f"NO ({', '.join(beyond)})" + (f", slower within the noise: {', '.join(within)}" if within else "")
    if within:
        return f"yes within the noise (slower medians, spreads overlapping the baseline's: {', '.join(within)})"
    return "yes"


def target_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The speed targets read off the rows, one Markdown list item per scenario.

    Never slower: every default agentsd row (agent phase, ToMe phase, the schedule; compiled
    too) has a speedup of at least 1 over its own baseline, or is named (`_never_slower`
    tells noise apart). Then the agent phase's fraction of the ceiling's speedup (eager and
    compiled) and agentsd's speed over tomesd (tomesd time / agentsd time, for the agent
    phase and the schedule) next to its bound, the ceiling's speed over tomesd, where those
    rows were run. Medians of one run: compare them with the p10/p90 spread in the table.
    """
    lines = []
    for arch, size, batch in dict.fromkeys((r["arch"], r["size"], r["batch"]) for r in rows):
        by = {r["method"]: r for r in rows if (r["arch"], r["size"], r["batch"]) == (arch, size, batch)}
        checks = ["never slower: " + _never_slower(by)]
        for suffix in ("", COMPILE_SUFFIX):
            fraction = by.get("agentsd-agent" + suffix, {}).get("ceiling_fraction")
            if fraction is not None:
                checks.append(
                    f"agent phase{suffix}: {fraction:.1%} of the ceiling's speedup (target {CEILING_TARGET:.0%})"
                )
        if "tomesd" in by:
            over = [
                f"{label} {by['tomesd']['median_ms'] / by[method]['median_ms']:.2f}x"
                for method, label in (("agentsd-agent", "agent phase"), ("agentsd-schedule", "schedule"))
                if method in by
            ]
            if over and "ceiling" in by:  # no self-attention-only method can beat tomesd by more
                over.append(f"bound (ceiling) {by['tomesd']['median_ms'] / by['ceiling']['median_ms']:.2f}x")
            if over:
                checks.append(f"over tomesd: {', '.join(over)} (target {TOMESD_TARGET}x)")
        lines.append(f"- {arch} {size} px x{batch}: " + "; ".join(checks))
    return lines


def plot_speedups(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Speedup against resolution, one line per method, one panel per (arch, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["arch"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (arch, batch) in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if r["arch"] == arch and r["batch"] == batch]
        for method in dict.fromkeys(r["method"] for r in mine):
            points = sorted((r["size"], r["speedup"]) for r in mine if r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set(title=f"{arch}, {batch} image(s), {mine[0]['dtype']}", xlabel="image side (px)", ylabel="speedup")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(rows: Sequence[dict[str, Any]], out_dir: str | Path, command: str = "") -> dict[str, Path]:
    """Write results.json, results.csv, results.md and speedup.png into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"results.{k}" for k in ("json", "csv", "md")}
    paths["png"] = out / "speedup.png"
    meta = dict(command=command, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    paths["json"].write_text(json.dumps(dict(meta, rows=list(rows)), indent=2))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    header = f"Command: `{command}`\n\nDate: {meta['date']}\n\n" if command else ""
    if rows:
        first = rows[0]
        header += f"Device: {first['device']}; torch {first['torch']}, diffusers {first['diffusers']}, "
        header += f"commit {first['commit']}\n\n"
    targets = "\n## Targets\n\n" + "\n".join(target_lines(rows)) + "\n" if rows else ""
    paths["md"].write_text(header + markdown_table(rows) + targets)
    if rows:
        plot_speedups(rows, paths["png"])
    return paths
