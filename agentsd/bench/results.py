"""The benchmark's rows: their fields and run information, the rows of a scenario from its
timings, and the files they are written to (JSON, CSV, Markdown with the speed targets read off
the rows by `targets.py`, a plot)."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.config import AgentSDConfig
from .methods import CEILING_OF, COMPILE_SUFFIX
from .targets import arch_label, size_text, target_lines

# Every row of every result file carries these: where, with what and when it was measured.
RUN_FIELDS = ("device", "torch", "diffusers", "commit", "date")
FIELDS = (
    "arch", "blocks", "size", "width", "frames", "batch", "dtype", "device", "torch", "diffusers", "commit", "date",
    "method", "preset", "median_ms", "p10_ms", "p90_ms", "peak_mb", "speedup", "ceiling_fraction", "saved_fraction",
    "repeats", "agentsd_acted", "agentsd_exact_reason",
)  # fmt: skip
# blocks: the depth of a diffusion transformer built at its first blocks only (None: the whole
# model). size: an image's side, a video's height; width and frames: a video's width and its
# video frames (4 k + 1; None for images). agentsd_acted: for an agentsd method, whether some
# patched layer ran agent attention or token merging in its timed calls (None for the others);
# agentsd_exact_reason: why not, when it did not.


def git_commit() -> str:
    """The short commit of the checkout agentsd runs from; where git cannot tell (an installed
    wheel, a copy of the checkout without its .git), $AGENTSD_COMMIT, else "unknown"."""
    fallback = os.environ.get("AGENTSD_COMMIT") or "unknown"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or fallback
    except OSError:
        return fallback


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_info(device: torch.device) -> dict[str, str]:
    """The `RUN_FIELDS` of a run on `device` now: its name, torch and diffusers versions, the
    commit and the date."""
    import diffusers

    return dict(
        device=device_name(device),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        commit=git_commit(),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def scenario_rows(
    timings: dict[str, dict[str, Any]], scenario: dict[str, Any], config: AgentSDConfig
) -> list[dict[str, Any]]:
    """Rows of one scenario, with speedups against its baseline and the derived schedule row."""
    median = {m: statistics.median(t["ms"]) for m, t in timings.items()}
    for suffix in ("", COMPILE_SUFFIX):
        agent, tome = median.get("agentsd-agent" + suffix), median.get("agentsd-tome" + suffix)
        if agent is not None and tome is not None:
            median["agentsd-schedule" + suffix] = config.agent_steps * agent + (1 - config.agent_steps) * tome
    rows = []
    for method, ms in median.items():
        # Compiled rows are measured against the compiled baseline and ceiling.
        suffix = COMPILE_SUFFIX if method.endswith(COMPILE_SUFFIX) else ""
        ceiling_name = CEILING_OF.get(method.removesuffix(suffix), "ceiling")
        base, ceiling = median["baseline" + suffix], median.get(ceiling_name + suffix)
        measured = timings.get(method)
        speedup = base / ms
        row = dict(scenario, method=method, median_ms=round(ms, 3))
        row["p10_ms"] = round(_percentile(measured["ms"], 0.1), 3) if measured else None
        row["p90_ms"] = round(_percentile(measured["ms"], 0.9), 3) if measured else None
        row["peak_mb"] = round(measured["peak_mb"], 1) if measured else None
        row["speedup"] = round(speedup, 4)
        if ceiling is not None and base > ceiling:
            row["ceiling_fraction"] = round(speedup / (base / ceiling), 4)
            row["saved_fraction"] = round((base - ms) / (base - ceiling), 4)
        else:
            row["ceiling_fraction"] = row["saved_fraction"] = None
        row["repeats"] = len(measured["ms"]) if measured else None
        parts = [measured] if measured else [timings.get(m + suffix, {}) for m in ("agentsd-agent", "agentsd-tome")]
        acted = [p["acted"] for p in parts if "acted" in p]
        row["agentsd_acted"] = any(acted) if acted else None  # the schedule acts where either phase does
        if acted and not any(acted):
            row["agentsd_exact_reason"] = next(p["exact_reason"] for p in parts if "exact_reason" in p)
        rows.append({k: row.get(k) for k in FIELDS})
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (times in ms, memory in MB)."""
    columns = ("arch", "size", "batch", "method", "median_ms", "p10_ms", "p90_ms", "peak_mb", "speedup",
               "ceiling_fraction", "saved_fraction")  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        size = row["size"] if row.get("frames") is None else size_text(row["size"], row["width"], row["frames"])
        row = dict(row, arch=arch_label(row["arch"], row.get("blocks")), size=size)
        cells = [
            "" if row[c] is None else (f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])) for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_speedups(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Speedup against resolution, one line per method, one panel per (arch, depth, batch); for
    videos against the number of frames, one panel per (arch, depth, height x width, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def panel(row):
        video = f"{row['size']}x{row['width']}" if row.get("frames") is not None else None
        return arch_label(row["arch"], row.get("blocks")), video, row["batch"]

    panels = list(dict.fromkeys(panel(r) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (arch, video, batch) in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if panel(r) == (arch, video, batch)]
        x = "frames" if video else "size"
        for method in dict.fromkeys(r["method"] for r in mine):
            points = sorted((r[x], r["speedup"]) for r in mine if r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        title = f"{arch}, {video} px, {batch} video(s)" if video else f"{arch}, {batch} image(s)"
        xlabel = "video frames" if video else "image side (px)"
        ax.set(title=f"{title}, {mine[0]['dtype']}", xlabel=xlabel, ylabel="speedup")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(
    folder: Path,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    markdown: str,
    command: str = "",
    extra: dict[str, Any] | None = None,
    extrasaction: str = "raise",
) -> dict[str, Path]:
    """Write results.json (command, date, `extra`, then the rows), results.csv (`columns`;
    `extrasaction` as csv.DictWriter's) and results.md (a header naming the command, date,
    device, versions and commit of the run, then `markdown`) into `folder`.

    Returns:
        The paths written, by suffix.
    """
    paths = {k: folder / f"results.{k}" for k in ("json", "csv", "md")}
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    paths["json"].write_text(json.dumps(dict(command=command, date=date, **(extra or {}), rows=list(rows)), indent=2))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction=extrasaction)
        writer.writeheader()
        writer.writerows(rows)
    header = f"Command: `{command}`\n\nDate: {date}\n\n" if command else ""
    if rows:
        first = rows[0]
        header += f"Device: {first['device']}; torch {first['torch']}, diffusers {first['diffusers']}, "
        header += f"commit {first['commit']}\n\n"
    paths["md"].write_text(header + markdown)
    return paths


def write_results(rows: Sequence[dict[str, Any]], out_dir: str | Path, command: str = "") -> dict[str, Path]:
    """Write results.json, results.csv, results.md and speedup.png into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = "\n## Targets\n\n" + "\n".join(target_lines(rows)) + "\n" if rows else ""
    paths = write_tables(out, rows, FIELDS, markdown_table(rows) + targets, command)
    paths["png"] = out / "speedup.png"
    if rows:
        plot_speedups(rows, paths["png"])
    return paths
