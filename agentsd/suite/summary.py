"""What a suite run did, scenario by scenario: `suite.json` (read by the report) and
`summary.md` (the headline table, then every scenario's status, and what was skipped and why)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .common import format_cell, markdown_rows

SUITE_JSON = "suite.json"


@dataclass
class Record:
    """One scenario of a run.

    Args:
        name, part, about: the scenario (`scenarios.Scenario`).
        status: pending, running, done, failed, skipped, cut short (by a signal while it ran) or
            not reached (a signal stopped the run before it).
        estimate_s: its estimate when it was considered; elapsed_s: how long it ran.
        reason: why it was skipped, failed or cut short.
        headline: its result in a few words; baseline_ms: a one-step scenario's baseline.
    """

    name: str
    part: str
    about: str
    status: str = "pending"
    estimate_s: float | None = None
    elapsed_s: float | None = None
    reason: str = ""
    headline: str = ""
    baseline_ms: float | None = None


@dataclass
class RunInfo:
    """The run: its command, device and versions, the budget, and its state in words."""

    command: str
    budget_s: float
    run: dict[str, str] = field(default_factory=dict)  # results.run_info: device, torch, diffusers, commit, date
    state: str = "starting"
    used_s: float = 0.0
    rates: dict[str, float] = field(default_factory=dict)


def suite_json(info: RunInfo, records: Sequence[Record]) -> str:
    return json.dumps(dict(asdict(info), scenarios=[asdict(r) for r in records]), indent=2)


def scenario_table(scenarios: Sequence[dict[str, Any]]) -> str:
    """Every scenario's status, estimate, time and reason (from `suite.json`'s records)."""
    columns = ("scenario", "status", "estimated s", "took s", "why skipped, failed or cut short")
    cells = [
        (r["name"], r["status"], _seconds(r["estimate_s"]), _seconds(r["elapsed_s"]), r["reason"]) for r in scenarios
    ]
    rows = [dict(zip(columns, row, strict=True)) for row in cells]
    return markdown_rows(rows, columns)


def _seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:.0f}"


def summary_markdown(info: RunInfo, records: Sequence[Record]) -> str:
    counts = {s: sum(r.status == s for r in records) for s in ("done", "skipped", "failed", "cut short")}
    done = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none run yet"
    run = info.run
    lines = [
        f"# agentsd GPU suite: {run.get('device', '?')}",
        "",
        f"- State: {info.state}; {info.used_s:.0f} s used of the {info.budget_s:.0f} s budget; scenarios: {done}.",
        f"- Command: `{info.command}`",
        f"- torch {run.get('torch', '?')}, diffusers {run.get('diffusers', '?')}, commit {run.get('commit', '?')}, "
        f"started {run.get('date', '?')}.",
        "- Every part's files are in results.tar.gz; `python scripts/gpu_suite.py --report <this folder>` unpacks "
        "them and writes the docs.",
        "",
        "## Headline",
        "",
        "| scenario | baseline ms | speedups (one step) or result |",
        "|---|---|---|",
    ]
    for r in records:
        if r.status == "done":
            lines.append(f"| {r.name} | {format_cell(r.baseline_ms, 1)} | {format_cell(r.headline)} |")
    lines += ["", "## Scenarios", "", scenario_table([asdict(r) for r in records]).rstrip()]
    skipped = [r for r in records if r.status in ("skipped", "failed", "cut short", "not reached")]
    if skipped:
        lines += ["", "## Skipped, failed or cut short, and why", ""]
        lines += [f"- {r.name} ({r.status}): {r.reason}" for r in skipped]
    return "\n".join(lines) + "\n"
