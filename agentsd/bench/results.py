"""The benchmark's rows: their fields and run information, the rows of a scenario from its
timings, the speed targets read off them, and the files they are written to (JSON, CSV,
Markdown, a plot)."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..core.config import AgentSDConfig
from .methods import CEILING_OF
from .transformer_models import ALL_TRANSFORMERS

COMPILE_SUFFIX = "+compile"
# Every row of every result file carries these: where, with what and when it was measured.
RUN_FIELDS = ("device", "torch", "diffusers", "commit", "date")
FIELDS = (
    "arch", "blocks", "size", "batch", "dtype", "device", "torch", "diffusers", "commit", "date", "method", "preset",
    "median_ms", "p10_ms", "p90_ms", "peak_mb", "speedup", "ceiling_fraction", "saved_fraction", "repeats",
    "agentsd_acted", "agentsd_exact_reason",
)  # fmt: skip
# blocks: the depth of a diffusion transformer built at its first blocks only (None: the whole
# model). agentsd_acted: for an agentsd method, whether some patched layer ran agent attention or
# token merging in its timed calls (None for the others); agentsd_exact_reason: why not, when it
# did not.


def arch_label(arch: str, blocks: int | None = None) -> str:
    """An architecture as the tables and target lines name it: `sd35-medium, 2 blocks` for a
    truncated transformer, `flux-dev, 1+2 blocks` for Flux (double + single stream)."""
    if blocks is None:
        return arch
    spec = ALL_TRANSFORMERS.get(arch)
    return f"{arch}, {spec.depth_label(blocks) if spec else f'{blocks} blocks'}"


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
        row = dict(row, arch=arch_label(row["arch"], row.get("blocks")))
        cells = [
            "" if row[c] is None else (f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])) for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The speed targets the rows are read against (see `target_checks`).
CEILING_TARGET = 0.9  # fraction of the ceiling's speedup reached in the agent phase
TOMESD_TARGET = 1.3  # agentsd's speed over ToMe for SD at the same ratio
TARGETS_FROM = 1024  # the two targets above apply from this image side up
DEFAULT_AGENTSD = ("agentsd-agent", "agentsd-tome", "agentsd-schedule")
# Speedups of a whole model's step over the baseline: (arch, image side) -> (method, minimum)s.
# Judged on whole models only: a transformer cut to its first blocks has other shares.
SPEEDUP_TARGETS: dict[tuple[str, int], tuple[tuple[str, float], ...]] = {
    ("sd15", 1024): (("agentsd-agent", 1.7),),
    ("sd15", 2048): (("agentsd-agent", 4.0), ("highres", 5.0)),
    ("sdxl", 1024): (("agentsd-schedule", 1.15),),
    ("sdxl", 2048): (("agentsd-schedule", 1.8),),
    ("sd35-medium", 1024): (("agentsd-agent", 1.3),),
    ("sd35-medium", 2048): (("agentsd-agent", 2.0),),
    ("flux-dev", 1024): (("agentsd-agent", 1.3),),
    ("flux-dev", 2048): (("agentsd-agent", 2.0),),
}
# What the target lines say of the UNet-only methods on a diffusion transformer.
NOT_FOR_TRANSFORMERS = "tomesd, xformers: UNet methods, not run on diffusion transformers"
LABELS = {"agentsd-agent": "agent phase", "agentsd-tome": "ToMe phase", "agentsd-schedule": "schedule"}


@dataclass(frozen=True)
class Check:
    """One target read off the rows of one scenario.

    Args:
        arch, size, batch: the scenario.
        name: what is checked (`never slower`, `ceiling`, `over tomesd`, or `speedup <method>`;
            unjudged notes: `did not act`, `not run`).
        text: the check as `target_lines` prints it.
        met: whether the target is met; None where no target applies (shown for information).
        blocks: the scenario's depth, for a truncated transformer (None: the whole model).
    """

    arch: str
    size: int
    batch: int
    name: str
    text: str
    met: bool | None
    blocks: int | None = None


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


def _verdict(met: bool | None, applies_from: int | None = None) -> str:
    if met is None:
        return f" from {applies_from} px" if applies_from else ""
    return ": met" if met else ": missed"


def _idle_check(arch: str, size: int, batch: int, by: dict[str, dict[str, Any]]) -> tuple[Check | None, set[str]]:
    """The rows of agentsd methods in which no layer acted (see `FIELDS`), and a check saying so:
    such a row times the baseline's attention, so no never-slower or ceiling verdict is read off it."""
    idle = {m: r for m, r in by.items() if r.get("agentsd_acted") is False}
    if not idle:
        return None, set()
    reasons = [r["agentsd_exact_reason"] for r in idle.values() if r.get("agentsd_exact_reason")]
    reason = reasons[0] if reasons else "every patched layer ran exact attention"
    defaults = {m for m in by if m.removesuffix(COMPILE_SUFFIX) in DEFAULT_AGENTSD}
    where = "at this size" if defaults <= set(idle) else f"in {', '.join(idle)}"
    text = f"agentsd did not act {where}: {reason} (no never-slower or ceiling verdict for {', '.join(idle)})"
    return Check(arch, size, batch, "did not act", text, None), set(idle)


def _scenario_checks(arch: str, size: int, batch: int, by: dict[str, dict[str, Any]]) -> list[Check]:
    idle_check, idle = _idle_check(arch, size, batch, by)
    checks = [idle_check] if idle_check else []
    acting = {m: r for m, r in by.items() if m not in idle}
    if not idle or any(m.removesuffix(COMPILE_SUFFIX) in DEFAULT_AGENTSD for m in acting):
        verdict = _never_slower(acting)
        checks.append(
            Check(arch, size, batch, "never slower", "never slower: " + verdict, not verdict.startswith("NO"))
        )
    applies = size >= TARGETS_FROM
    for suffix in ("", COMPILE_SUFFIX):
        fraction = acting.get("agentsd-agent" + suffix, {}).get("ceiling_fraction")
        if fraction is not None:
            met = fraction >= CEILING_TARGET if applies else None
            text = (f"agent phase{suffix}: {fraction:.1%} of the ceiling's speedup "
                    f"(target {CEILING_TARGET:.0%}{_verdict(met, TARGETS_FROM)})")  # fmt: skip
            products = acting.get("ceiling-products" + suffix)
            if products is not None:
                agent_ms = acting["agentsd-agent" + suffix]["median_ms"]
                text += f"; {products['median_ms'] / agent_ms:.1%} of ceiling-products' (projections kept)"
            checks.append(Check(arch, size, batch, "ceiling" + suffix, text, met))
    if "tomesd" in by:
        tomesd_ms = by["tomesd"]["median_ms"]
        over = {m: tomesd_ms / by[m]["median_ms"] for m in ("agentsd-agent", "agentsd-schedule") if m in acting}
        parts = [f"{LABELS[m]} {x:.2f}x" for m, x in over.items()]
        if parts and "ceiling" in by:  # no self-attention-only method can beat tomesd by more
            parts.append(f"bound (ceiling) {tomesd_ms / by['ceiling']['median_ms']:.2f}x")
        if parts:
            met = over["agentsd-agent"] >= TOMESD_TARGET if applies and "agentsd-agent" in over else None
            text = f"over tomesd: {', '.join(parts)} (target {TOMESD_TARGET}x{_verdict(met, TARGETS_FROM)})"
            checks.append(Check(arch, size, batch, "over tomesd", text, met))
    if arch in ALL_TRANSFORMERS:
        checks.append(Check(arch, size, batch, "not run", NOT_FOR_TRANSFORMERS, None))
    for method, minimum in SPEEDUP_TARGETS.get((arch, size), ()):
        if method in by:
            speedup = by[method]["speedup"]
            reading = ": agentsd did not act" if method in idle else f" {speedup:.2f}x"
            met = speedup >= minimum and method not in idle
            text = f"{LABELS.get(method, method)}{reading} (target {minimum}x{_verdict(met)})"
            checks.append(Check(arch, size, batch, f"speedup {method}", text, met))
    return checks


def target_checks(rows: Sequence[dict[str, Any]]) -> list[Check]:
    """The speed targets read off the rows, scenario by scenario.

    Never slower: every default agentsd row (agent phase, ToMe phase, the schedule; compiled
    too) has a speedup of at least 1 over its own baseline, or is named (`_never_slower`
    tells noise apart). Then the agent phase's fraction of the ceiling's speedup (eager and
    compiled; target `CEILING_TARGET`) and agentsd's speed over tomesd (tomesd time /
    agentsd time, for the agent phase and the schedule; target `TOMESD_TARGET` for the agent
    phase, both targets from `TARGETS_FROM` px up) next to its bound, the ceiling's speed
    over tomesd, and the speedups of `SPEEDUP_TARGETS`, where those rows were run. Medians
    of one run: compare them with the p10/p90 spread in the table.

    Rows in which agentsd did not act (`agentsd_acted` False: e.g. every grid under
    `min_tokens`) time the baseline's attention: no never-slower, ceiling or tomesd reading is
    taken from them, one check says "agentsd did not act" with the reason, and a speedup target
    of such a row is missed.

    A diffusion transformer cut to its first blocks (`blocks` set) is a scenario of its own; the
    `SPEEDUP_TARGETS` are whole models' and are not read off it.
    """
    checks = []
    for arch, blocks, size, batch in dict.fromkeys(_scenario(r) for r in rows):
        by = {r["method"]: r for r in rows if _scenario(r) == (arch, blocks, size, batch)}
        found = _scenario_checks(arch, size, batch, by)
        if blocks is not None:
            found = [replace(c, blocks=blocks) for c in found if not c.name.startswith("speedup ")]
        checks += found
    return checks


def _scenario(row: dict[str, Any]) -> tuple[str, int | None, int, int]:
    return row["arch"], row.get("blocks"), row["size"], row["batch"]


def target_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """`target_checks` as one Markdown list item per scenario."""
    lines: dict[tuple[str, int, int], list[str]] = {}
    for check in target_checks(rows):
        lines.setdefault((arch_label(check.arch, check.blocks), check.size, check.batch), []).append(check.text)
    return [f"- {arch} {size} px x{batch}: " + "; ".join(texts) for (arch, size, batch), texts in lines.items()]


def plot_speedups(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Speedup against resolution, one line per method, one panel per (arch, depth, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((arch_label(r["arch"], r.get("blocks")), r["batch"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (arch, batch) in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if arch_label(r["arch"], r.get("blocks")) == arch and r["batch"] == batch]
        for method in dict.fromkeys(r["method"] for r in mine):
            points = sorted((r["size"], r["speedup"]) for r in mine if r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set(title=f"{arch}, {batch} image(s), {mine[0]['dtype']}", xlabel="image side (px)", ylabel="speedup")
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
