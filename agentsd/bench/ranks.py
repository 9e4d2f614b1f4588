"""`agentsd bench --context-parallel P`: the benchmark's transformers under diffusers' context
parallelism over P processes, agentsd against diffusers' exact Ulysses or ring attention.

Every rank runs `run_parallel_benchmark` (torchrun starts them; `agentsd.cli.parallel_bench`
starts torchrun when the command is not under it already). Per architecture, size, batch and
mode, the model is built with the same random weights on every rank, then
`enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))` (or `ring_degree=P`): each
rank holds 1 / P of the tokens (Flux's text too). The methods (`PARALLEL_METHODS`): the
baseline, diffusers' own exact attention across the ranks; agentsd's agent phase and ToMe phase,
patched after `enable_parallelism` (what each of its layers then did, agent attention on the
shards, token merging, or a hand-over to diffusers' exact path, comes from `agentsd.status`).

Per method, two things:
- time per forward: warm-up rounds thrown away, then the repeats interleaved across the methods,
  every call started together on every rank (a barrier), timed until its output is gathered; a
  call's time is its slowest rank's, the median of the repeats is reported;
- elements each rank sends, in one more forward with the collectives counted
  (`collectives.CollectiveCounter`): per attention layer and per forward (the layers plus the
  output gather), the largest rank's, next to what the formulas of `traffic.py` give for what
  agentsd did, and the ratio baseline / method.

Where the machine has no accelerator, diffusers needs two shims (`collectives.cpu_shims`): a
device count of 1, and for ring attention a native forward op that returns the log-sum-exp (CPU
ring timings use that shim; diffusers' native backend returns none). On CUDA both modes run the
model's backend, diffusers' active one (`DIFFUSERS_ATTN_BACKEND`), except that ring replaces the
native backend, which cannot serve it, by `_native_cudnn` (fp16 or bf16), which returns the log-sum-exp.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..api.presets import load_preset
from ..api.status import status
from ..core.plans import EXACT
from .benchmark import DEFAULT_PRESETS, build_model, default_sizes, is_video, model_inputs, split_arch
from .collectives import OUTSIDE, CollectiveCounter, cpu_shims
from .methods import method_context
from .results import _percentile, run_info, write_tables
from .targets import arch_label, size_text
from .traffic import EXACT_PLAN, MODES, ShardLayout, shard_layout
from .transformer_models import ALL_TRANSFORMERS, Size, sides
from .wan_models import DEFAULT_FRAMES

PARALLEL_METHODS = ("baseline", "agentsd-agent", "agentsd-tome")
RING_CUDA_BACKEND = "_native_cudnn"  # ring's backend on CUDA where the active one is native: it returns the lse
CPU_RING_NOTE = (
    "CPU ring timing uses a log-sum-exp shim: diffusers' native attention backend returns no log-sum-exp, which "
    "ring attention needs, so on the CPU its forward op runs torch's CPU flash-attention kernel, which returns one."
)
ELEMENTS_NOTE = (
    "Elements: what each rank hands to the collectives (an all-to-all's whole input, an all-gather's own part), the "
    "largest rank's; formula: agentsd/bench/traffic.py for what the method's layers did."
)
PARALLEL_FIELDS = (
    "arch", "blocks", "size", "width", "frames", "batch", "ranks", "mode", "method", "agentsd", "layers",
    "layer_elements", "formula_layer_elements", "layer_ratio", "forward_elements", "formula_forward_elements",
    "forward_ratio", "forward_bytes", "median_ms", "p10_ms", "p90_ms", "speedup", "repeats", "dtype", "device",
    "torch", "diffusers", "commit", "date",
)  # fmt: skip
# layer_elements: elements a rank sends per attention layer (the mean over the layers that sent,
# the largest rank's); forward_elements: per forward, layers and output gather; *_ratio: the
# baseline's over this method's; formula_*: `traffic.py` for what the method's layers did (empty
# where the formulas do not cover it); agentsd: what its layers did (`agentsd.status`).


def has_context_parallelism(arch: str) -> bool:
    """Whether the diffusers model of `arch` (`NAME` or `NAME:K`) has a context-parallel plan (`_cp_plan`)."""
    import diffusers

    spec = ALL_TRANSFORMERS.get(arch.partition(":")[0])
    model_class = getattr(diffusers, spec.model_class, None) if spec else None
    return getattr(model_class, "_cp_plan", None) is not None


def parallel_problem(arch: str, size: Size, frames: int | None, ranks: int, mode: str) -> str | None:
    """Why `arch` at `size` (and `frames`) cannot run over `ranks` ranks in `mode`, or None."""
    name, blocks = split_arch(arch)
    if not has_context_parallelism(name):
        return f"{name} has no context-parallel plan in diffusers (use flux-dev, wan*, tiny-flux or tiny-wan*)"
    heads = ALL_TRANSFORMERS[name].config["num_attention_heads"]
    if mode == "ulysses" and heads % ranks:
        return f"{name}'s {heads} attention heads do not split over {ranks} ranks (Ulysses splits the heads)"
    try:
        shard_layout(arch, size, frames, ranks, load_preset(DEFAULT_PRESETS[name]))
    except ValueError as err:
        return str(err).rstrip(".")
    return None


def run_parallel_benchmark(
    archs: Sequence[str],
    sizes: Sequence[Size] | None = None,
    frames: Sequence[int] | None = None,
    batches: Sequence[int] = (1,),
    modes: Sequence[str] = MODES,
    methods: Sequence[str] = PARALLEL_METHODS,
    preset: str | None = None,
    repeats: int = 3,
    warmup: int = 1,
    dtype: torch.dtype | None = None,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run on every rank of the process group (initialized here, gloo on the CPU and NCCL on CUDA,
    unless it is already); see the module docstring. On CUDA each rank runs on the GPU of its
    local rank (`LOCAL_RANK`).

    Args:
        archs, sizes, frames, batches: the scenarios, as `benchmark.run_benchmark` takes them (None:
            each architecture's default sizes, 81 video frames); every combination in every mode.
        modes: `ulysses`, `ring`.
        methods: of `PARALLEL_METHODS`; the baseline always runs (the ratios are against it).
        preset: the agentsd preset; default each architecture's.
        repeats, warmup: timed and discarded rounds per method (warmup 0: one untimed plain call).
        dtype: default fp16 on CUDA, fp32 on the CPU.
        on_rows: called on rank 0 with each scenario's rows as soon as they are made.

    Returns:
        On rank 0 the rows (`PARALLEL_FIELDS`), elsewhere [].
    """
    owned = not dist.is_initialized()
    cuda = torch.cuda.is_available()  # diffusers builds its device mesh on the accelerator when there is one
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if owned:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = dtype or (torch.float16 if cuda else torch.float32)
    chosen = ["baseline", *(m for m in methods if m != "baseline")]
    rows: list[dict[str, Any]] = []
    try:
        with contextlib.nullcontext() if cuda else cpu_shims():
            for arch in archs:
                for size in sizes or default_sizes(arch):
                    for count in (frames or [DEFAULT_FRAMES]) if is_video(arch) else [None]:
                        for batch in batches:
                            for mode in modes:
                                scenario = (arch, size, count, batch, mode)
                                new = _scenario(scenario, chosen, preset, repeats, warmup, device, dtype)
                                rows += new
                                if new and on_rows is not None:
                                    on_rows(new)
    finally:
        if owned:
            dist.destroy_process_group()
    return rows


def _scenario(
    scenario: tuple, methods: list[str], preset: str | None, repeats: int, warmup: int, device: torch.device,
    dtype: torch.dtype,
) -> list[dict[str, Any]]:  # fmt: skip
    """One architecture, size, frame count, batch and mode: every method timed and counted."""
    from diffusers import ContextParallelConfig

    arch, size, frames, batch, mode = scenario
    name, blocks = split_arch(arch)
    ranks = dist.get_world_size()
    config = load_preset(preset or DEFAULT_PRESETS[name])
    torch.manual_seed(0)  # the same weights on every rank
    model = build_model(arch, device, dtype)
    if mode == "ring" and device.type == "cuda" and _active_backend() == "native":
        model.set_attention_backend(RING_CUDA_BACKEND)
    model.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": ranks}))
    args, kwargs = model_inputs(model, size, batch, frames=frames)
    inputs = args, dict(kwargs, return_dict=False)  # diffusers' output gather takes tensors, not an output class
    times = _time(model, inputs, methods, config, repeats, warmup, device)
    counts = {method: _count(model, inputs, method, config) for method in methods}
    del model
    everyone = [None] * ranks
    dist.all_gather_object(everyone, (times, counts))
    if dist.get_rank() != 0:
        return []
    layout = shard_layout(arch, size, frames, ranks, config, batch)
    height, width = sides(size)
    common = dict(run_info(device), dtype=str(dtype).replace("torch.", ""), arch=name, blocks=blocks, size=height,
                  width=width if frames else None, frames=frames, batch=batch, ranks=ranks, mode=mode)  # fmt: skip
    rows = [dict(common, **_measured(method, everyone, layout, mode, repeats)) for method in methods]
    base = rows[0]
    for row in rows:
        row["speedup"] = round(base["median_ms"] / row["median_ms"], 4)
        for kind in ("layer", "forward"):
            sent = row[f"{kind}_elements"]
            row[f"{kind}_ratio"] = round(base[f"{kind}_elements"] / sent, 3) if sent else None
    return [{k: row.get(k) for k in PARALLEL_FIELDS} for row in rows]


def _active_backend() -> str:
    """The backend diffusers' dispatcher runs for a model that names none (`DIFFUSERS_ATTN_BACKEND`, else native)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    name = _AttentionBackendRegistry.get_active_backend()[0]
    return str(getattr(name, "value", name))


def _measured(method: str, everyone: list, layout: ShardLayout, mode: str, repeats: int) -> dict[str, Any]:
    """A method's fields from every rank's (times, counts): the slowest rank's time per call, the
    largest rank's counts, and the formulas for what its layers did (rank 0's status)."""
    per_call = [max(times[method][i] for times, _ in everyone) for i in range(repeats)]
    counted = [counts[method] for _, counts in everyone]
    action = counted[0]["action"]
    plan = EXACT_PLAN if action == EXACT else layout.plan(method)
    known = action is not None and plan.action == action
    return dict(
        method=method,
        agentsd=counted[0]["summary"],
        layers=max(len(c["layers"]) for c in counted),
        layer_elements=round(max(sum(c["layers"]) / max(len(c["layers"]), 1) for c in counted)),
        forward_elements=max(sum(c["layers"]) + c["outside"] for c in counted),
        forward_bytes=max(c["bytes"] for c in counted),
        formula_layer_elements=layout.layer_elements(mode, plan) if known else None,
        formula_forward_elements=layout.forward_elements(mode, plan) if known else None,
        median_ms=round(statistics.median(per_call), 3),
        p10_ms=round(_percentile(per_call, 0.1), 3),
        p90_ms=round(_percentile(per_call, 0.9), 3),
        repeats=repeats,
    )


def _call(model: torch.nn.Module, inputs: tuple[tuple, dict[str, Any]], device: torch.device) -> None:
    """One forward, until its output is gathered on this rank."""
    args, kwargs = inputs
    output = model(*args, **kwargs)
    for tensor in output if isinstance(output, (tuple, list)) else [output]:
        if hasattr(tensor, "wait"):  # the output gather's AsyncCollectiveTensor
            tensor.wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(model, inputs, methods, config, repeats: int, warmup: int, device) -> dict[str, list[float]]:
    """This rank's milliseconds of every repeat per method, interleaved, each call started on every rank at once."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    with torch.no_grad():
        if warmup == 0:  # the cold start is charged to no method
            _call(model, inputs, device)
        for round_index in range(warmup + repeats):
            for method in methods:
                with method_context(method, model, config):
                    dist.barrier()
                    start = time.perf_counter()
                    _call(model, inputs, device)
                    elapsed = (time.perf_counter() - start) * 1000
                if round_index >= warmup:
                    times[method].append(elapsed)
    return times


def _count(model, inputs, method: str, config) -> dict[str, Any]:
    """What this rank sends in one forward of `method`, and what agentsd's layers did in it."""
    counter = CollectiveCounter(model)
    with torch.no_grad(), method_context(method, model, config):
        dist.barrier()
        with counter.counting():
            _call(model, inputs, device=next(model.parameters()).device)
        action, summary = _agentsd_action(model) if method != "baseline" else (EXACT, "")
    layers = counter.layers()
    return dict(layers=list(layers.values()), outside=counter.elements[OUTSIDE], bytes=sum(counter.bytes.values()),
                action=action, summary=summary)  # fmt: skip


def _agentsd_action(model: torch.nn.Module) -> tuple[str | None, str]:
    """(what every patched layer did, or None when they differ; in words, with why a layer ran exact attention)."""
    layers = status(model).layers
    modes = Counter(str(layer.mode) for layer in layers)
    words = ", ".join(f"{mode} x{count}" for mode, count in modes.items())
    reasons = sorted({layer.reason for layer in layers if layer.mode == EXACT and layer.reason})
    if reasons:
        words += f" ({'; '.join(reasons)})"
    return (next(iter(modes)) if len(modes) == 1 else None), words


def parallel_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as Markdown: counts in elements per rank, times in ms."""
    columns = ("arch", "size", "mode", "method", "agentsd", "layers", "layer_elements", "formula_layer_elements",
               "layer_ratio", "forward_elements", "formula_forward_elements", "forward_ratio", "median_ms", "p10_ms",
               "p90_ms", "speedup")  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        shown = dict(row, arch=arch_label(row["arch"], row["blocks"]),
                     size=size_text(row["size"], row["width"], row["frames"]))  # fmt: skip
        cells = []
        for column in columns:
            value = shown[column]
            if isinstance(value, float):
                cells.append(f"{value:.2f}x" if column.endswith(("ratio", "speedup")) else f"{value:.1f}")
            elif isinstance(value, int) and column.endswith("elements"):
                cells.append(f"{value:,}")
            else:
                cells.append("" if value is None else str(value).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_parallel_results(rows: Sequence[dict[str, Any]], out: str | Path, command: str = "") -> dict[str, Path]:
    """Write results.json, results.csv and results.md (the table and its notes) into `out`."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    notes = [f"Ranks: {rows[0]['ranks']} processes (torch.distributed.run)." if rows else ""]
    if any(r["mode"] == "ring" and r["device"].startswith("cpu") for r in rows):
        notes.append(CPU_RING_NOTE)
    notes.append(ELEMENTS_NOTE)
    markdown = parallel_markdown(rows) + "\n" + "\n\n".join(n for n in notes if n) + "\n"
    return write_tables(folder, rows, PARALLEL_FIELDS, markdown, command, extra=dict(notes=notes))
