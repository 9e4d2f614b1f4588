"""The breakeven scenarios: from which grid size a patched layer beats the SDPA layer here.

One SD 1.5 top-level self-attention layer (320 channels, 8 heads of 40) is timed with its
SDPA processor and with agentsd's processor in each phase of the paper preset, over square
token grids from 8x8 to 128x128, at a CFG batch of 2 (`breakeven-2`: one image) and of 8
(`breakeven-8`: four images); both write the `breakeven` part. Timings
are `torch.utils.benchmark`'s blocked autorange (CUDA synchronized around each block of
calls; the median over the blocks). The per-UNet-call planning (phase, grids, destination
draws) is shared by every patched layer of a call and is not part of a layer's time.

The recommended `min_tokens` is the token count of the smallest grid from which agentsd is
faster than the baseline at every larger grid measured, in both phases and at both batches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.utils import benchmark as torch_benchmark

from ..core.config import AgentSDConfig
from ..processors.self_attention import AgentSDProcessor, AgentSDState
from .common import Outcome, PartContext, markdown_rows, stamp_rows, write_part

logger = logging.getLogger(__name__)

# Timesteps in each phase of the paper preset (progress 1 - t / 1000 below / above 0.4).
PHASES = {"agent": 999, "tome": 100}
FIELDS = ("channels", "heads", "grid", "tokens", "batch", "phase", "mode", "baseline_us", "agentsd_us", "speedup",
          "baseline_iqr_us", "agentsd_iqr_us", "dtype")  # fmt: skip


@dataclass(frozen=True)
class GridPlan:
    """The layer shape, the grids (sides in tokens) and the timing budget; the CFG batch is the
    scenario's."""

    channels: int = 320
    heads: int = 8
    grids: tuple[int, ...] = (8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128)
    min_run_time: float = 0.5  # seconds of calls per timing


PLAN = GridPlan()
TINY_PLAN = GridPlan(channels=64, heads=4, grids=(8, 16), min_run_time=0.01)


def plan(tiny: bool) -> GridPlan:
    return TINY_PLAN if tiny else PLAN


def _timed(call: Any, min_run_time: float) -> torch_benchmark.Measurement:
    timer = torch_benchmark.Timer(stmt="call()", globals=dict(call=call), num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time)


def measure(plan: GridPlan, grid: int, batch: int, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """One row per phase: the baseline's and agentsd's median microseconds per layer call."""
    torch.manual_seed(0)
    attn = Attention(plan.channels, heads=plan.heads, dim_head=plan.channels // plan.heads, out_bias=True)
    attn = attn.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, grid * grid, plan.channels, device=device, dtype=dtype)

    @torch.no_grad()
    def call() -> torch.Tensor:
        return attn(x)

    baseline = _timed(call, plan.min_run_time)
    rows = []
    for phase, timestep in PHASES.items():
        # min_tokens=0: every grid is patched here; finding the floor is what this measures.
        state = AgentSDState(AgentSDConfig(min_tokens=0))
        processor = AgentSDProcessor(AttnProcessor2_0(), state, "layer")
        attn.set_processor(processor)
        state.begin_call(torch.zeros(batch, 4, grid, grid, device=device), torch.tensor(timestep))
        layer_plan = processor.plan(attn, x)
        agentsd = _timed(call, plan.min_run_time)
        attn.set_processor(AttnProcessor2_0())
        rows.append(dict(
            channels=plan.channels, heads=plan.heads, grid=grid, tokens=grid * grid, batch=batch, phase=phase,
            mode=layer_plan.mode if layer_plan is not None else "exact",
            baseline_us=round(baseline.median * 1e6, 2), agentsd_us=round(agentsd.median * 1e6, 2),
            speedup=round(baseline.median / agentsd.median, 4), baseline_iqr_us=round(baseline.iqr * 1e6, 2),
            agentsd_iqr_us=round(agentsd.iqr * 1e6, 2), dtype=str(dtype).replace("torch.", ""),
        ))  # fmt: skip
    return rows


def recommend_min_tokens(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The smallest grid from which agentsd is faster (speedup > 1) at every larger grid
    measured, in every phase and batch; its token count is the recommended `min_tokens`.

    Returns:
        `min_grid` and `min_tokens` (None when agentsd is not faster even at the largest grid)
        and the rule, in words.
    """
    grids = sorted({r["grid"] for r in rows})
    faster = {g: all(r["speedup"] > 1 for r in rows if r["grid"] == g) for g in grids}
    min_grid = None
    for grid in reversed(grids):
        if not faster[grid]:
            break
        min_grid = grid
    return dict(
        min_grid=min_grid,
        min_tokens=None if min_grid is None else min_grid * min_grid,
        rule="the smallest grid from which agentsd is faster at every larger grid measured, both phases and batches",
    )


def plot(rows: Sequence[dict[str, Any]], recommendation: dict[str, Any], path: Path) -> None:
    """Speedup against tokens, one line per phase and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for phase, batch in dict.fromkeys((r["phase"], r["batch"]) for r in rows):
        points = sorted((r["tokens"], r["speedup"]) for r in rows if (r["phase"], r["batch"]) == (phase, batch))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{phase} phase, batch {batch}")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    if recommendation["min_tokens"] is not None:
        ax.axvline(recommendation["min_tokens"], color="red", linestyle="--", label="recommended min_tokens")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="tokens (square grid)", ylabel="speedup over SDPA", title=f"one layer, {rows[0]['dtype']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(folder: Path, rows: list[dict[str, Any]], command: str) -> dict[str, Path]:
    """The part's files for the rows so far, with the recommendation they give."""
    recommendation = recommend_min_tokens(rows)
    grid, tokens = recommendation["min_grid"], recommendation["min_tokens"]
    if tokens is None:
        verdict = "agentsd was not faster at the largest grid measured: no recommendation."
    else:
        verdict = f"Recommended `min_tokens` here: **{tokens}** (a {grid}x{grid} grid): {recommendation['rule']}."
    markdown = markdown_rows(rows, FIELDS) + "\n" + verdict + "\n"
    # With the device and dtype it holds for: the input of a device-aware default.
    advice = dict(recommendation, device=rows[0]["device"], dtype=rows[0]["dtype"])
    paths = write_part(folder, rows, FIELDS, markdown, command, dict(recommendation=advice))
    paths["png"] = folder / "breakeven.png"
    plot(rows, recommendation, paths["png"])
    return paths


def run_batch(batch: int, context: PartContext) -> Outcome:
    """Time every grid at one CFG batch, add the rows to the part's and rewrite its files with
    the recommendation over every batch measured so far."""
    grid_plan = plan(context.tiny)
    rows = context.rows.setdefault("breakeven", [])
    for grid in grid_plan.grids:
        rows += stamp_rows(measure(grid_plan, grid, batch, context.device, context.dtype), context.device)
        logger.info("breakeven: %dx%d tokens, batch %d done", grid, grid, batch)
    write(context.folder("breakeven"), rows, context.command)
    advice = recommend_min_tokens(rows)
    batches = sorted({r["batch"] for r in rows})
    grid = advice["min_grid"]
    found = "none" if grid is None else f"{advice['min_tokens']} ({grid}x{grid})"
    return Outcome(headline=f"recommended min_tokens over the CFG batches {batches}: {found}")
