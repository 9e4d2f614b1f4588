"""What the parts of the GPU suite share: their run context and how a part writes its files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..results import RUN_FIELDS, run_info, write_tables

# The parts, in the order `all` runs them; each writes into a folder of its name.
PART_NAMES = ("tests", "sd15", "sd15-compile", "sd15-compile-ceiling", "sdxl", "pipeline", "breakeven")


@dataclass(frozen=True)
class PartContext:
    """Where and how a part runs.

    Args:
        out: the suite's output folder; a part writes into `out / <part name>`.
        tiny: tiny architectures and few repeats, for a CPU check in seconds (what CI runs).
        device: the device measured (CUDA for the real parts).
        root: the checkout whose `tests/` the `tests` part runs.
        command: the command line, recorded in every part's files.
    """

    out: Path
    tiny: bool
    device: torch.device
    root: Path
    command: str = ""

    @property
    def dtype(self) -> torch.dtype:
        """fp16 on CUDA (what the targets are set for), fp32 on the CPU."""
        return torch.float16 if self.device.type == "cuda" else torch.float32

    def folder(self, part: str) -> Path:
        folder = self.out / part
        folder.mkdir(parents=True, exist_ok=True)
        return folder


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
