"""`--context-parallel ulysses|ring` for `generate` and `compare`: every image's (or video's) tokens
split over the processes of a distributed launch with diffusers' context parallelism.

Launched as `torchrun --nproc_per_node P -m agentsd generate ... --context-parallel ulysses` (or
`accelerate launch`), every process loads the pipeline, runs the same pipeline calls with the same
seeds and holds 1/P of each model call's tokens; the degree is the launch's world size P (the
one layout that uses every process the launch started). What is refused, before any work and with
the fix: no distributed launch, a diffusers without context parallelism, a model without a
context-parallel plan (`_cp_plan`), heads or tokens that do not split into P equal parts, and ring
attention on an attention backend that returns no log-sum-exp. Rank 0 alone writes files and
prints; the process group is made here only if the launcher (or accelerate) has not made it, and
then destroyed at the end (`owned_process_group`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..families import family, find_model, names
from .loading import GenerationError, prompt_length, resolve_device
from .video import call_defaults

MODES = ("ulysses", "ring")
LAUNCH = "torchrun --nproc_per_node P -m agentsd"


@dataclass(frozen=True)
class Layout:
    """How a run splits its tokens: `mode` (ulysses or ring) over `degree` processes (the world
    size); `rank` and `local_rank` are this process's. `record()` is what sidecars and `compare`'s
    settings say (and a resumed run compares)."""

    mode: str
    degree: int
    rank: int = 0
    local_rank: int = 0

    @property
    def writes(self) -> bool:
        """Whether this process writes the files and prints the results: rank 0 alone."""
        return self.rank == 0

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, "degree": self.degree}


def launch(mode: str | None) -> Layout | None:
    """The layout of `--context-parallel MODE` in this launch (None without the flag), read from the
    launcher's environment (WORLD_SIZE, RANK, LOCAL_RANK). On every rank but 0 the logs keep only
    errors, and the libraries show no progress bars: rank 0 reports.

    Raises:
        GenerationError: not a distributed launch of 2 or more processes; a diffusers without
            context parallelism.
    """
    if mode is None:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise GenerationError(
            f"--context-parallel {mode} splits each image's tokens over the processes of a distributed launch, and "
            f"this is a single process: launch P >= 2 of them with `{LAUNCH} ...` (or `accelerate launch "
            "--num_processes P -m agentsd ...`); the degree is P."
        )
    import diffusers

    if getattr(diffusers, "ContextParallelConfig", None) is None:
        raise GenerationError(
            f"--context-parallel needs diffusers' context parallelism (ContextParallelConfig, diffusers 0.36 and "
            f"later), and this is diffusers {diffusers.__version__}: pip install -U diffusers."
        )
    layout = Layout(mode, world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))
    if not layout.writes:
        _quiet()
    return layout


def rank_device(requested: str) -> torch.device:
    """This process's device under context parallelism: its own GPU, cuda:LOCAL_RANK, for `auto`
    and `cuda` where CUDA is; else the CPU (gloo).

    Raises:
        GenerationError: a GPU named by index (each process takes its own), MPS, or fewer GPUs
            than the processes launched on this machine.
    """
    device = resolve_device(requested)
    if device.type == "cpu":
        return device
    if device.type != "cuda" or device.index is not None:
        raise GenerationError(
            f"--device {requested} with --context-parallel: each process takes its own GPU (cuda:LOCAL_RANK), or "
            "all of them the CPU: use --device auto, cuda or cpu."
        )
    local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= count:
        raise GenerationError(
            f"process {local_rank} of this machine would take cuda:{local_rank}, and it has {count} GPUs: launch at "
            f"most {count} processes per machine (--nproc_per_node {count})."
        )
    return torch.device("cuda", local_rank)


def _quiet() -> None:
    """Only errors from the logs, no Python warnings, and no progress bars from diffusers and
    transformers."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    logging.getLogger().setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def _supporting_families() -> str:
    import diffusers

    plans = [family(n) for n in names() if getattr(getattr(diffusers, family(n).model_class, None), "_cp_plan", None)]
    return " and ".join(kind.models for kind in plans)


def check_model_class(model_class: type | None, layout: Layout | None) -> None:
    """Refuse a model whose diffusers class has no context-parallel plan (`_cp_plan`): its tokens
    cannot be split (SD 1.x / 2.x / XL UNets, SD 3, PixArt)."""
    if layout is None or model_class is None or getattr(model_class, "_cp_plan", None) is not None:
        return
    import diffusers

    raise GenerationError(
        f"--context-parallel: {model_class.__name__} has no context-parallel plan in diffusers {diffusers.__version__} "
        f"(`_cp_plan`), so its tokens cannot be split over processes; of the models agentsd patches, "
        f"{_supporting_families()} have one. Drop --context-parallel (`compare` without it splits the prompts "
        "between the processes instead)."
    )


def check_family(name: str | None, layout: Layout | None) -> None:
    """`check_model_class` of a family's model, named as the model's config files name it (None:
    they could not be read without downloading; the loaded model is checked then)."""
    if name is not None and layout is not None:
        import diffusers

        check_model_class(getattr(diffusers, family(name).model_class, None), layout)


def _token_counts(pipe: Any, model: Any, settings: Any) -> dict[str, int]:
    """The lengths diffusers splits over the ranks in one call of `pipe` with `settings`, where cheap
    to read off the pipeline: Wan's video tokens; Flux's image and text tokens."""
    kind = find_model(pipe)[0].name
    if kind == "wan":
        defaults = call_defaults(pipe)
        frames = settings.frames or defaults["num_frames"]
        height, width = settings.height or defaults["height"], settings.width or defaults["width"]
        t, h, w = model.config.patch_size
        latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
        side = pipe.vae_scale_factor_spatial
        grid = (latent_frames // t, height // side // h, width // side // w)
        return {f"video tokens ({' x '.join(map(str, grid))})": grid[0] * grid[1] * grid[2]}
    if kind == "flux":
        side = pipe.vae_scale_factor * 2  # Flux packs 2 x 2 latent patches into a token
        default = pipe.default_sample_size * pipe.vae_scale_factor
        grid = ((settings.height or default) // side, (settings.width or default) // side)
        return {f"image tokens ({grid[0]} x {grid[1]})": grid[0] * grid[1],
                "text tokens (--max-sequence-length)": prompt_length(pipe, settings.max_sequence_length)}  # fmt: skip
    return {}


def _backend_without_lse(model: Any) -> str | None:
    """The attention backend of `model` when it returns no log-sum-exp, which ring attention needs
    to merge the ranks' partial outputs; None when it does. Asked of the backend itself, with a
    one-token call on the model's device and dtype: diffusers' backends refuse `return_lse` with a
    ValueError naming it (any other failure is left for the run to report)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry, dispatch_attention_fn

    processors = (getattr(m, "processor", None) for m in model.modules())
    backend = next((p._attention_backend for p in processors if hasattr(p, "_attention_backend")), None)
    backend = backend or _AttentionBackendRegistry.get_active_backend()[0]
    query = torch.zeros(1, 1, 1, 8, device=model.device, dtype=model.dtype)
    try:
        dispatch_attention_fn(query, query, query, attention_kwargs={"return_lse": True}, backend=backend)
    except Exception as err:
        if isinstance(err, ValueError) and "return_lse" in str(err):
            return getattr(backend, "value", str(backend))
    return None


def check_pipeline(pipe: Any, layout: Layout | None, settings: Any) -> None:
    """Refuse, before any work, what diffusers' context parallelism cannot run with `layout` on the
    loaded `pipe` (every denoiser: Wan 2.2 A14B's two experts): no `_cp_plan`; under Ulysses, heads
    that do not split into `degree` parts; token counts that do not; ring on a backend without
    log-sum-exp."""
    if layout is None:
        return
    degree = layout.degree
    for _, model in find_model(pipe)[0].models_of(pipe):
        check_model_class(type(model), layout)
        heads = model.config.get("num_attention_heads")
        if layout.mode == "ulysses" and heads and heads % degree:
            raise GenerationError(
                f"--context-parallel ulysses over {degree} processes gives each a share of the {heads} attention "
                f"heads of {type(model).__name__}, and {heads} do not split into {degree}: launch a number of "
                "processes that divides them, or use --context-parallel ring."
            )
        for what, count in _token_counts(pipe, model, settings).items():
            if count % degree:
                raise GenerationError(
                    f"--context-parallel over {degree} processes: the {count} {what} of a call at this size do not "
                    f"split into {degree} equal parts, which diffusers needs: choose a size (--width, --height, "
                    "--frames, --max-sequence-length) or a number of processes that does."
                )
        if layout.mode == "ring" and (backend := _backend_without_lse(model)):
            raise GenerationError(
                f"--context-parallel ring merges the ranks' partial attention by its log-sum-exp, which the "
                f"attention backend {backend!r} does not return (diffusers' native one never does, so ring cannot run "
                "on a CPU): on CUDA choose one that does with the DIFFUSERS_ATTN_BACKEND variable (_native_cudnn, "
                "flash; fp16 or bf16), or use --context-parallel ulysses."
            )


def enable(pipe: Any, layout: Layout | None) -> None:
    """Make the process group if the launcher has not (NCCL on GPUs, gloo on the CPU) and call
    `enable_parallelism` on every denoiser of `pipe` (Wan 2.2 A14B's `transformer` and
    `transformer_2`) with a `ContextParallelConfig` of `layout`. Rank 0 alone shows progress bars.

    Raises:
        GenerationError: a diffusers that cannot place the ranks on this machine's devices.
    """
    if layout is None:
        return
    import diffusers
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    device = pipe.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not layout.writes:
        pipe.set_progress_bar_config(disable=True)
    for _, model in find_model(pipe)[0].models_of(pipe):
        try:
            model.enable_parallelism(config=ContextParallelConfig(**{f"{layout.mode}_degree": layout.degree}))
        except ZeroDivisionError:  # `rank % torch.accelerator.device_count()`, 0 without an accelerator
            raise GenerationError(
                f"diffusers {diffusers.__version__} places each process on accelerator `rank % "
                "torch.accelerator.device_count()`, and this machine has none: --context-parallel needs GPUs here."
            ) from None


@contextlib.contextmanager
def owned_process_group(layout: Layout | None) -> Iterator[None]:
    """Destroy at the end of the block the process group that `enable` made inside it; one the
    launcher or accelerate made (before the block) is theirs, and left."""
    import torch.distributed as dist

    owned = layout is not None and dist.is_available() and not dist.is_initialized()
    try:
        yield
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
