"""Text-to-image with and without agent attention, written to disk as images finish.

The library side of `agentsd generate`: loading a pipeline by hub id or folder, choosing a
scheduler, and generating a set of (prompt, seed) images into a folder with their
parameters embedded, never overwriting unless asked, keeping every finished image when
interrupted.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from . import __version__
from .compat import dtype_kwargs
from .config import AgentSDConfig
from .output import atomic_write, save_image, side_by_side
from .patch import attention_layers, patched
from .status import Activity, recording_phases, status

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Scheduler name -> (diffusers class name, extra config). Looked up by name when used: older
# diffusers releases lack some (LCMScheduler arrived in 0.22).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BASELINE, AGENTSD = "baseline", "agentsd"


class GenerationError(Exception):
    """A problem with the user's input or environment; the message names it and the fix."""


def resolve_device(requested: str = "auto", fallback: bool = True) -> torch.device:
    """The device named by `requested` (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`).

    `auto` picks CUDA when present. A CUDA request without CUDA falls back to the CPU with a
    warning, or raises with `fallback=False`.

    Raises:
        GenerationError: an unknown device, a CUDA index this machine does not have, or CUDA
            (without `fallback`) or MPS requested where it is not available.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise GenerationError(f"unknown device {requested!r}: use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        if not fallback:
            raise GenerationError(f"device {requested!r}: CUDA is not available here: use --device cpu or auto.")
        logger.warning("CUDA is not available: running on the CPU in fp32 (slow).")
        return torch.device("cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise GenerationError(f"device {requested!r} does not exist: this machine has cuda:0 to cuda:{count - 1}.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GenerationError(f"device {requested!r}: MPS is not available here: use --device cpu or auto.")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA and fp32 on the CPU unless named."""
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise GenerationError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Any:
    """Load a Stable Diffusion pipeline (its class comes from the model) onto `device`.

    Raises:
        GenerationError: the model cannot be found, downloaded or loaded, or has no UNet.
    """
    local = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise GenerationError(f"model folder {model!r} does not exist: pass an existing folder or a hub id.")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(local) if looks_local else model, **dtype_kwargs(dtype))
    except Exception as err:  # hub, network, auth and format errors come in many types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GenerationError(
            f"cannot load model {model!r} ({reason[:200]}): check the id, log in with `hf auth login` for a "
            "gated model, or pass a local folder saved with save_pretrained."
        ) from err
    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise GenerationError(
            f"{model!r} loads as {type(pipe).__name__}, which has no Stable Diffusion UNet: agentsd supports "
            "SD 1.x, 2.x and SDXL models."
        )
    return pipe.to(device)


def set_scheduler(pipe: Any, name: str | None) -> None:
    """Replace the pipeline's scheduler by name, keeping the model's noise schedule."""
    if name is None:
        return
    if name not in SCHEDULERS:
        raise GenerationError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}.")
    class_name, extra = SCHEDULERS[name]
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise GenerationError(
            f"scheduler {name!r} needs diffusers' {class_name}, which diffusers {diffusers.__version__} does not "
            "have: upgrade diffusers or choose another scheduler."
        )
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def check_config_patches(pipe: Any, config: AgentSDConfig) -> None:
    """Refuse a config that would patch no layer (and so silently run the baseline)."""
    if not attention_layers(pipe.unet, config.max_downsample):
        raise GenerationError(
            f"the agentsd config patches no layer of this UNet: it has no self-attention at downsample <= "
            f"{config.max_downsample} (SDXL has none at 1). Use --preset sdxl or --max-downsample 2."
        )


@dataclass(frozen=True)
class ImageJob:
    """One image to make: a prompt and a seed; `name` is its file stem."""

    prompt_index: int
    prompt: str
    seed: int

    @property
    def name(self) -> str:
        return f"p{self.prompt_index:04d}_s{self.seed}"


def plan_jobs(prompts: Sequence[str], num_images: int, seed: int) -> list[ImageJob]:
    """`num_images` per prompt with seeds `seed, seed + 1, ...` (the same seeds for every prompt)."""
    return [ImageJob(i, p, seed + k) for i, p in enumerate(prompts) for k in range(num_images)]


@dataclass
class GenerationSettings:
    """What every image of a run shares."""

    model: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int = 50
    guidance: float = 7.5
    batch_size: int = 1
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                raise GenerationError(f"{name} {value} is not a positive multiple of 8: use e.g. 512 or 768.")
        if self.steps <= 0:
            raise GenerationError(f"steps {self.steps} must be positive: use e.g. 50.")
        if self.batch_size <= 0:
            raise GenerationError(f"batch size {self.batch_size} must be positive.")


@dataclass
class MethodRun:
    """One method of a run: its label, how the pipeline runs (an agentsd config, or any
    `context(pipe)` such as another accelerator's patch), its folder and its timings."""

    label: str
    config: AgentSDConfig | None
    folder: Path
    context: Callable[[Any], AbstractContextManager] | None = None
    seconds: list[float] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    activity: Activity = field(default_factory=Activity)
    phases: list[str] = field(default_factory=list)  # of each UNet call (step) of the latest pipeline call

    @property
    def seconds_per_image(self) -> float | None:
        return sum(self.seconds) / len(self.seconds) if self.seconds else None

    def enter(self, pipe: Any) -> AbstractContextManager:
        """The context the pipeline runs in: `context`, else patched by `config` (None: as is)."""
        if self.context is not None:
            return self.context(pipe)
        return nullcontext() if self.config is None else patched(pipe, self.config)


def prepare_folder(folder: Path) -> Path:
    """Create `folder` and make sure files can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".agentsd-write-test"):
            pass
    except OSError as err:
        raise GenerationError(
            f"cannot write to output folder {str(folder)!r} ({err.strerror or err}): choose another --out."
        ) from None
    return folder


def call_pipeline(
    pipe: Any, jobs: Sequence[ImageJob], settings: GenerationSettings, run: MethodRun, steps: int, track: bool = False
):
    """The images of `jobs` (one generator per image, seeded by its job) run as `run` says; with
    `track`, what agentsd did in the call is added to `run.activity`, and `run.phases` is the
    phase of each of its UNet calls."""
    kwargs = dict(
        prompt=[j.prompt for j in jobs],
        num_inference_steps=steps,
        guidance_scale=settings.guidance,
        width=settings.width,
        height=settings.height,
        generator=[torch.Generator().manual_seed(j.seed) for j in jobs],
    )
    if settings.negative_prompt is not None:
        kwargs["negative_prompt"] = [settings.negative_prompt] * len(jobs)
    track = track and run.config is not None
    with run.enter(pipe), recording_phases(pipe) if track else nullcontext() as phases:
        images = pipe(**kwargs).images
        if track:
            run.activity += status(pipe).activity
            run.phases = list(phases)
    return images


def _sync(pipe: Any) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)


def generate(
    pipe: Any,
    jobs: Sequence[ImageJob],
    out_dir: str | Path,
    settings: GenerationSettings,
    config: AgentSDConfig | None,
    compare: bool = False,
    scheduler_name: str | None = None,
    progress: bool = True,
) -> list[MethodRun]:
    """Generate `jobs` into `out_dir`, image files appearing as their batch finishes.

    Args:
        pipe: a loaded Stable Diffusion pipeline (SD 1.x, 2.x, XL).
        jobs: the images to make (see `plan_jobs`).
        out_dir: agentsd images go here (baseline images too when `config` is None);
            with `compare`, baseline images go to `baseline/` and side-by-side pairs
            (baseline left) to `compare/`.
        settings: what all images share.
        config: the agent-attention config, or None for the baseline alone.
        compare: also run the baseline with the same seeds, batch by batch, for timing.
        scheduler_name: recorded in the metadata.
        progress: show a progress bar over images.

    Returns:
        One `MethodRun` per method with its seconds per image and the files written.
        Existing files are skipped (listed in `skipped`) unless `settings.overwrite`.
    """

    out = prepare_folder(Path(out_dir))
    if config is None:
        runs = [MethodRun(BASELINE, None, out)]
    else:
        check_config_patches(pipe, config)
        runs = [MethodRun(AGENTSD, config, out)]
        if compare:
            runs.insert(0, MethodRun(BASELINE, None, prepare_folder(out / BASELINE)))
    compare_dir = prepare_folder(out / "compare") if compare and config is not None else None
    return generate_runs(pipe, jobs, runs, settings, compare_dir, scheduler_name, progress, warmup=compare)


def generate_runs(
    pipe: Any,
    jobs: Sequence[ImageJob],
    runs: Sequence[MethodRun],
    settings: GenerationSettings,
    compare_dir: Path | None = None,
    scheduler_name: str | None = None,
    progress: bool = True,
    warmup: bool = False,
) -> list[MethodRun]:
    """Generate `jobs` for every method of `runs`, batch by batch, methods interleaved.

    Args:
        compare_dir: if given, side-by-side pairs of the first two runs go there.
        warmup: run one 1-step call per method first, so no method pays first-call costs.
    """
    from tqdm.auto import tqdm

    runs = list(runs)

    pending: dict[str, set[ImageJob]] = {}
    for run in runs:
        pending[run.label] = set()
        for job in jobs:
            path = run.folder / f"{job.name}.png"
            if path.exists() and not settings.overwrite:
                run.skipped.append(path)
            else:
                pending[run.label].add(job)
    if any(run.skipped for run in runs):
        logger.warning(
            "skipping %d existing images (pass --overwrite to replace them)", sum(len(r.skipped) for r in runs)
        )
    todo = [job for job in jobs if any(job in pending[r.label] for r in runs)]
    if warmup and todo:
        for run in runs:
            call_pipeline(pipe, todo[:1], settings, run, steps=1)

    base_meta = dict(
        model=settings.model,
        scheduler=scheduler_name or type(pipe.scheduler).__name__,
        steps=settings.steps,
        guidance=settings.guidance,
        width=settings.width or pipe.unet.config.sample_size * pipe.vae_scale_factor,
        height=settings.height or pipe.unet.config.sample_size * pipe.vae_scale_factor,
        negative_prompt=settings.negative_prompt,
        dtype=str(pipe.unet.dtype).replace("torch.", ""),
        agentsd_version=__version__,
    )
    bar = tqdm(total=sum(len(v) for v in pending.values()), desc="images", unit="img", disable=not progress)
    for start in range(0, len(todo), settings.batch_size):
        batch = todo[start : start + settings.batch_size]
        produced = {}
        for run in runs:
            mine = [j for j in batch if j in pending[run.label]]
            if not mine:
                continue
            _sync(pipe)
            begin = time.perf_counter()
            images = call_pipeline(pipe, mine, settings, run, settings.steps, track=True)
            _sync(pipe)
            per_image = (time.perf_counter() - begin) / len(mine)
            for job, image in zip(mine, images, strict=True):
                meta = dict(
                    base_meta,
                    prompt=job.prompt,
                    prompt_index=job.prompt_index,
                    seed=job.seed,
                    method=run.label,
                    agentsd_config=None if run.config is None else run.config.to_dict(),
                    agentsd_phases=run.phases or None,
                    seconds=round(per_image, 4),
                )
                path = run.folder / f"{job.name}.png"
                save_image(image, path, meta)
                run.written.append(path)
                run.seconds.append(per_image)
                produced[(run.label, job)] = image
                bar.update(1)
        if compare_dir is not None:
            left, right = runs[0].label, runs[1].label
            for job in batch:
                if (left, job) in produced and (right, job) in produced:
                    pair = side_by_side(produced[(left, job)], produced[(right, job)])
                    atomic_write(compare_dir / f"{job.name}.png", lambda f, im=pair: im.save(f, format="PNG"))
    bar.close()
    for run in runs:
        if run.config is not None and run.activity.calls and not run.activity.ran_agent_attention:
            logger.warning("no layer ran agent attention in the %s run: %s", run.label, run.activity.summary())
    return runs
