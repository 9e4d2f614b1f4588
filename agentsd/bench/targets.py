"""The speed targets of `agentsd bench`, read off a run's rows scenario by scenario (`target_checks`,
`target_lines`), and how the rows and lines name a scenario (`arch_label`, `size_text`,
`scenario_label`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .methods import COMPILE_SUFFIX
from .transformer_models import ALL_TRANSFORMERS
from .wan_models import latent_frames


def arch_label(arch: str, blocks: int | None = None) -> str:
    """An architecture as the tables and target lines name it: `sd35-medium, 2 blocks` for a
    truncated transformer, `flux-dev, 1+2 blocks` for Flux (double + single stream)."""
    if blocks is None:
        return arch
    spec = ALL_TRANSFORMERS.get(arch)
    return f"{arch}, {spec.depth_label(blocks) if spec else f'{blocks} blocks'}"


def size_text(size: int, width: int | None = None, frames: int | None = None) -> str:
    """A scenario's size as the tables show it: `512` (px, a square image), or a video's
    `480x832, 17 frames (5 latent)`."""
    if frames is None:
        return str(size)
    return f"{size}x{width}, {frames} frames ({latent_frames(frames)} latent)"


def scenario_label(arch: str, blocks: int | None, size: int, batch: int, width: int | None = None,
                   frames: int | None = None) -> str:  # fmt: skip
    """A scenario as the target lines name it: `sd15 512 px x1`, `wan2.1-1.3b, 1 block 480x832 px,
    17 frames (5 latent) x1`."""
    if frames is None:
        return f"{arch_label(arch, blocks)} {size} px x{batch}"
    return f"{arch_label(arch, blocks)} {size}x{width} px, {frames} frames ({latent_frames(frames)} latent) x{batch}"


# The speed targets the rows are read against (see `target_checks`).
CEILING_TARGET = 0.9  # fraction of the ceiling's speedup reached in the agent phase (images)
TOMESD_TARGET = 1.3  # agentsd's speed over ToMe for SD at the same ratio
TARGETS_FROM = 1024  # the two targets above apply from this image side up
# Videos: the fraction of ceiling-products' speedup reached in the agent phase, at every size (the
# Wan issue's CPU target; the whole-layer ceiling is shown there unjudged).
PRODUCTS_TARGET = 0.95
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
# The same for videos: (arch, height, width, video frames) -> (method, minimum)s. Wan 2.1 1.3B at
# 480p, 81 frames (32,760 tokens), bf16 on a GPU (the GPU suite's wan-480p).
VIDEO_SPEEDUP_TARGETS: dict[tuple[str, int, int, int], tuple[tuple[str, float], ...]] = {
    ("wan2.1-1.3b", 480, 832, 81): (("agentsd-agent", 2.5), ("agentsd-schedule", 2.0)),
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
        width, frames: a video scenario's width and video frames (None for images).
    """

    arch: str
    size: int
    batch: int
    name: str
    text: str
    met: bool | None
    blocks: int | None = None
    width: int | None = None
    frames: int | None = None

    @property
    def scenario(self) -> str:
        """The scenario in words (`scenario_label`)."""
        return scenario_label(self.arch, self.blocks, self.size, self.batch, self.width, self.frames)


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


def _scenario_checks(
    arch: str, size: int, batch: int, by: dict[str, dict[str, Any]], width: int | None = None, frames: int | None = None
) -> list[Check]:
    video = frames is not None
    idle_check, idle = _idle_check(arch, size, batch, by)
    checks = [idle_check] if idle_check else []
    acting = {m: r for m, r in by.items() if m not in idle}
    if not idle or any(m.removesuffix(COMPILE_SUFFIX) in DEFAULT_AGENTSD for m in acting):
        verdict = _never_slower(acting)
        checks.append(
            Check(arch, size, batch, "never slower", "never slower: " + verdict, not verdict.startswith("NO"))
        )
    applies = size >= TARGETS_FROM and not video  # the image targets
    for suffix in ("", COMPILE_SUFFIX):
        fraction = acting.get("agentsd-agent" + suffix, {}).get("ceiling_fraction")
        products = acting.get("ceiling-products" + suffix)
        if fraction is not None:
            met = fraction >= CEILING_TARGET if applies else None
            text = f"agent phase{suffix}: {fraction:.1%} of the ceiling's speedup"
            if not video:
                text += f" (target {CEILING_TARGET:.0%}{_verdict(met, TARGETS_FROM)})"
            if products is not None and not video:
                agent_ms = acting["agentsd-agent" + suffix]["median_ms"]
                text += f"; {products['median_ms'] / agent_ms:.1%} of ceiling-products' (projections kept)"
            checks.append(Check(arch, size, batch, "ceiling" + suffix, text, met))
        if video and products is not None and "agentsd-agent" + suffix in acting:
            share = products["median_ms"] / acting["agentsd-agent" + suffix]["median_ms"]
            text = (
                f"agent phase{suffix}: {share:.1%} of ceiling-products' speedup (the attention products "
                f"free, projections kept; target {PRODUCTS_TARGET:.0%}{_verdict(share >= PRODUCTS_TARGET)})"
            )
            checks.append(Check(arch, size, batch, "products" + suffix, text, share >= PRODUCTS_TARGET))
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
    if video:
        targets = VIDEO_SPEEDUP_TARGETS.get((arch, size, width, frames), ())
    else:
        targets = SPEEDUP_TARGETS.get((arch, size), ())
    for method, minimum in targets:
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

    Videos (`frames` set) have targets of their own: the agent phase's fraction of the
    `ceiling-products` speedup (target `PRODUCTS_TARGET`, where that row was run; the whole-layer
    ceiling's fraction is shown, unjudged) and the whole models' `VIDEO_SPEEDUP_TARGETS`.
    """
    checks = []
    for key in dict.fromkeys(_scenario(r) for r in rows):
        arch, blocks, size, width, frames, batch = key
        by = {r["method"]: r for r in rows if _scenario(r) == key}
        found = [replace(c, width=width, frames=frames) for c in _scenario_checks(arch, size, batch, by, width, frames)]
        if blocks is not None:
            found = [replace(c, blocks=blocks) for c in found if not c.name.startswith("speedup ")]
        checks += found
    return checks


def _scenario(row: dict[str, Any]) -> tuple[str, int | None, int, int | None, int | None, int]:
    return row["arch"], row.get("blocks"), row["size"], row.get("width"), row.get("frames"), row["batch"]


def target_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """`target_checks` as one Markdown list item per scenario."""
    lines: dict[str, list[str]] = {}
    for check in target_checks(rows):
        lines.setdefault(check.scenario, []).append(check.text)
    return [f"- {scenario}: " + "; ".join(texts) for scenario, texts in lines.items()]
