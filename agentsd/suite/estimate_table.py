"""The prior estimate of every scenario against a budget, as `gpu_suite.py --estimate` prints it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .budget import Budget
from .estimate import priors
from .scenarios import SCENARIOS


def estimates(names: Sequence[str], tiny: bool, budget_s: float) -> list[dict[str, Any]]:
    """Every scenario's prior estimate in the order given, the model cache followed along, with
    the running total against `budget_s`."""
    budget = Budget(budget_s, priors(tiny))
    rows, total, built = [], 0.0, None
    for name in names:
        scenario = SCENARIOS[name]
        cost = scenario.cost(tiny, built)
        seconds = budget.estimate(cost)
        total += seconds
        built = scenario.model(tiny) or built
        tflop = cost.get("flop", 0.0) / 1e12
        memory = scenario.memory(tiny) / 2**30 if scenario.memory else None
        rows.append(dict(scenario=name, about=scenario.about, tflop=tflop, calls=int(cost.get("call", 0)),
                         seconds=seconds, total=total, fits=total <= budget_s, memory_gib=memory))  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], budget_s: float) -> str:
    """The estimates as a Markdown table, the running total checked against the budget."""
    lines = ["| scenario | measures | TFLOP timed | model calls | prior s | running total s | within the budget | "
             "peak GiB (where estimated) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        tflop = f"{row['tflop']:,.0f}" if row["tflop"] >= 1 else ""
        calls = str(row["calls"]) if row["calls"] else ""
        fits = "yes" if row["fits"] else "no"
        memory = "" if row["memory_gib"] is None else f"{row['memory_gib']:.1f}"
        cells = [row["scenario"], row["about"], tflop, calls, f"{row['seconds']:.0f}", f"{row['total']:.0f}", fits,
                 memory]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    total = rows[-1]["total"] if rows else 0.0
    lines.append("")
    lines.append(f"Total {total:.0f} s by the priors against a budget of {budget_s:.0f} s; a run measures its rates "
                 "and re-estimates each scenario before it starts.")  # fmt: skip
    return "\n".join(lines) + "\n"
