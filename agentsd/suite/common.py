"""What the scenarios of the GPU suite share: their run context, what a scenario returns, and
how a part writes its files."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..bench.results import RUN_FIELDS, run_info, write_tables

# The result folders (parts) the scenarios write, in the order the report shows them; a part
# gathers the rows of its scenarios (`sd15` those of sd15-512, sd15-1024 and sd15-2048).
PART_NAMES = ("sd15", "sdxl", "sd35", "flux", "flux-stack", "wan", "tests", "breakeven", "sd15-highres", "sd15-compile",
              "sd15-compile-ceiling", "tests-compile", "pipeline", "sd21", "context-parallel")  # fmt: skip


def measured_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (what the targets are set for), fp32 on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class PartContext:
    """Where and how the scenarios run.

    Args:
        out: the staging folder; a part writes into `out / <part name>`.
        tiny: tiny architectures and few repeats, for a CPU check in seconds (what CI runs).
        device: the device measured (CUDA for the real scenarios).
        root: the checkout whose `tests/` the tests scenarios run.
        command: the command line, recorded in every part's files.
        models: the model kept between scenarios (`step.ModelCache`).
        rows: every part's rows so far (a part's files are rewritten with all of them).
        seconds_left: the budget left (a subprocess is given no more).
    """

    out: Path
    tiny: bool
    device: torch.device
    root: Path
    command: str = ""
    models: Any = None
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds_left: Callable[[], float] = lambda: math.inf

    @property
    def dtype(self) -> torch.dtype:
        return measured_dtype(self.device)

    def folder(self, part: str) -> Path:
        folder = self.out / part
        folder.mkdir(parents=True, exist_ok=True)
        return folder


@dataclass
class Outcome:
    """What a scenario tells the run besides its files.

    Args:
        headline: its result in a few words (speedups, test counts, the recommendation).
        baseline_ms: its baseline's median ms, for one-step scenarios.
        measured: rates it measured, by cost kind (`budget.py`): seconds per unit.
    """

    headline: str = ""
    baseline_ms: float | None = None
    measured: dict[str, float] = field(default_factory=dict)


def stamp_rows(rows: Sequence[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """The rows with the run fields (device, versions, commit, date) of a run on `device` now."""
    info = run_info(device)
    return [dict(info, **row) for row in rows]


def format_cell(value: Any, digits: int = 3) -> str:
    """A Markdown table cell: empty for None, floats with `digits` decimals, `|` escaped."""
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value).replace("|", "\\|")


def markdown_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """`rows` as a Markdown table of `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_part(
    folder: Path,
    rows: Sequence[dict[str, Any]],
    fields: Sequence[str],
    markdown: str,
    command: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write a part's results.json (with `extra` next to the rows), results.csv (`fields`,
    then the run fields) and results.md (a header with the run, then `markdown`).

    Returns:
        The paths written, by suffix.
    """
    columns = [*fields, *(f for f in RUN_FIELDS if f not in fields)]
    return write_tables(folder, rows, columns, markdown, command, extra, extrasaction="ignore")
