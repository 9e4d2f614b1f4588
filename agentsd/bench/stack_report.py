"""What `agentsd bench --cache` reads off its rows (`stack.py`): the targets per scenario
(`stack_checks`, `stack_lines`), the table, and the files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .results import write_tables
from .stack import AGENT, COMPUTED_TARGET, KINDS, NOTE, SHARE_TARGET, STACK_FIELDS
from .targets import Check, arch_label, size_text

COLUMNS = ("arch", "size", "batch", "method", "cache", "step", "skip_fraction", "median_ms", "p10_ms", "p90_ms",
           "peak_mb", "speedup", "over_cache")  # fmt: skip


def _scenarios(rows: Sequence[dict[str, Any]]) -> dict[tuple, dict[tuple[str, str, Any], dict[str, Any]]]:
    """The rows by scenario, then by (method, step, skip fraction)."""
    found: dict[tuple, dict[tuple[str, str, Any], dict[str, Any]]] = {}
    for row in rows:
        key = (row["arch"], row.get("blocks"), row["size"], row.get("width"), row.get("frames"), row["batch"],
               row["cache"])  # fmt: skip
        found.setdefault(key, {})[(row["method"], row["step"], row.get("skip_fraction"))] = row
    return found


def _judged(value: float, target: float) -> str:
    return f"{value:.3f} (target >= {target:g}: {'met' if value >= target else 'missed'})"


def _scenario_checks(key: tuple, by: dict[tuple[str, str, Any], dict[str, Any]]) -> list[Check]:
    """The checks of one scenario (`stack_checks`), its rows by (method, step, skip fraction)."""
    arch, blocks, size, width, frames, batch, cache = key
    checks: list[Check] = []

    def check(name: str, text: str, met: bool | None) -> None:
        checks.append(Check(arch, size, batch, name, f"{cache}: {text}", met, blocks, width, frames))

    agentsd, base = by.get((AGENT, "every", None)), by.get(("baseline", "every", None))
    stack, alone = by.get(("cache+agentsd", "computed", None)), by.get(("cache", "computed", None))
    missing = {kind: [m for m in ("cache", "cache+agentsd") if (m, kind, None) not in by] for kind in KINDS}
    if any(missing.values()):
        said = "; ".join(f"no {kind} call of {', '.join(methods)}" for kind, methods in missing.items() if methods)
        check("not run", f"{said} among the calls timed", None)
    if agentsd is None or base is None or stack is None or alone is None:
        return checks
    if agentsd.get("agentsd_acted") is False or stack.get("agentsd_acted") is False:
        reason = agentsd.get("agentsd_exact_reason") or stack.get("agentsd_exact_reason")
        check("did not act", f"agentsd did not act at this size: {reason} (no verdict)", None)
        return checks
    ratio = agentsd["median_ms"] / stack["median_ms"]
    check("computed step", f"computed step, cache+agentsd vs agentsd alone: {_judged(ratio, COMPUTED_TARGET)}",
          ratio >= COMPUTED_TARGET)  # fmt: skip
    own = base["median_ms"] / agentsd["median_ms"]
    share = (alone["median_ms"] / stack["median_ms"]) / own
    check("over the cache", f"per computed step, the stack over the cache alone {stack['over_cache']:.3f}x, "
          f"agentsd alone over the baseline {own:.3f}x: a share of {_judged(share, SHARE_TARGET)} (the GPU target)",
          share >= SHARE_TARGET)  # fmt: skip
    for (method, step, fraction), row in by.items():
        if method == "cache+agentsd" and step == "mix":
            cached = by[("cache", "mix", fraction)]
            check("mix", f"a step at skip fraction {fraction:g}: the stack {row['speedup']:.3f}x over the baseline, "
                  f"{row['over_cache']:.3f}x over the cache alone ({cached['speedup']:.3f}x over the baseline)",
                  None)  # fmt: skip
    return checks


def stack_checks(rows: Sequence[dict[str, Any]]) -> list[Check]:
    """Per scenario: the computed step of the stack against agentsd's alone (`COMPUTED_TARGET`,
    the CPU target: the cache adds nothing to agentsd's step), the stack's speedup over the cache
    alone per computed step as a share of agentsd's own over the baseline (`SHARE_TARGET`, the
    GPU target), and each skip fraction's step (unjudged); which kinds of call the cache did not
    do in the calls timed (no step at a skip fraction then). No verdict where agentsd did not act."""
    return [check for key, by in _scenarios(rows).items() for check in _scenario_checks(key, by)]


def stack_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """`stack_checks` as lines (`- <scenario>: <cache>: <text>`), then the note on the skip fraction."""
    lines = [f"- {check.scenario}: {check.text}" for check in stack_checks(rows)]
    labels = sorted({row["cache"] for row in rows})
    return lines + [NOTE.format(label=labels[0] if len(labels) == 1 else "NAME")] if rows else lines


def stack_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (times in ms, memory in MB)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        size = row["size"] if row.get("frames") is None else size_text(row["size"], row["width"], row["frames"])
        row = dict(row, arch=arch_label(row["arch"], row.get("blocks")), size=size)
        cells = ["" if row[c] is None else (f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]))
                 for c in COLUMNS]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_stack_results(rows: Sequence[dict[str, Any]], out_dir: str | Path, command: str = "") -> dict[str, Path]:
    """Write results.json, results.csv and results.md (the table, then the target lines) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = "\n## Targets\n\n" + "\n".join(stack_lines(rows)) + "\n" if rows else ""
    return write_tables(out, rows, STACK_FIELDS, stack_table(rows) + targets, command)
