"""Loading what a run needs, and checking its settings before any work: the device and dtype, a
Stable Diffusion pipeline by hub id or folder, its scheduler by name; the step count the
scheduler takes, the seeds the generator takes, a config that patches something, an output
folder that can be written."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from .compat import dtype_kwargs
from .config import AgentSDConfig
from .families import find_model

logger = logging.getLogger("agentsd.generation")  # the logger these messages always had

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
# The seeds torch.Generator.manual_seed takes (negative ones stand for seeds from 2**63 up).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


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


def _scheduler_class(name: str) -> tuple[type, dict[str, Any]]:
    """The diffusers class of the scheduler `name` (of `SCHEDULERS`) and its extra config."""
    if name not in SCHEDULERS:
        raise GenerationError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}.")
    class_name, extra = SCHEDULERS[name]
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise GenerationError(
            f"scheduler {name!r} needs diffusers' {class_name}, which diffusers {diffusers.__version__} does not "
            "have: upgrade diffusers or choose another scheduler."
        )
    return cls, extra


def set_scheduler(pipe: Any, name: str | None) -> None:
    """Replace the pipeline's scheduler by name, keeping the model's noise schedule."""
    if name is not None:
        cls, extra = _scheduler_class(name)
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def model_scheduler(model: str, name: str | None = None) -> Any | None:
    """The scheduler that `load_pipeline(model)` and `set_scheduler(pipe, name)` give, built from
    the model's scheduler config alone, without its weights; None when that config cannot be read
    without downloading (neither a local folder nor in the hub cache).

    Raises:
        GenerationError: an unknown scheduler name, as `set_scheduler`.
    """
    local = Path(model).expanduser()
    try:
        config = diffusers.DDIMScheduler.load_config(
            str(local) if local.is_dir() else model, subfolder="scheduler", local_files_only=True
        )
    except Exception:  # not there without a download; `load_pipeline` says why, if it cannot load either
        return None
    if name is not None:
        cls, extra = _scheduler_class(name)
        return cls.from_config(config, **extra)
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    return cls.from_config(config) if isinstance(cls, type) else None


def check_steps(scheduler: Any, steps: int, flag: str = "--steps") -> None:
    """Refuse a step count `scheduler` refuses, before any work: the pipeline would fail only
    when it sets its timesteps (DDIM takes at most `num_train_timesteps` steps, LCM at most its
    `original_inference_steps`). The message names the largest count it takes.

    Raises:
        GenerationError: naming `flag`, the scheduler and the most steps it takes.
    """

    def takes(count: int) -> bool:
        trial = type(scheduler).from_config(scheduler.config)
        try:
            trial.set_timesteps(count)
        except ValueError:
            return False
        return True

    if takes(steps):
        return
    low, high = 0, steps  # takes(low) (or low == 0), not takes(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if takes(middle) else (low, middle)
    fix = f"use {flag} {low} or fewer" if low else "choose another --scheduler"
    raise GenerationError(f"{flag} {steps} is more than {type(scheduler).__name__} takes with this model: {fix}.")


def check_seeds(first: int, count: int, flag: str = "--seed") -> None:
    """Refuse image seeds `first, ..., first + count - 1` that `torch.Generator.manual_seed`
    refuses (it takes `SEED_MIN` to `SEED_MAX`), before any work.

    Raises:
        GenerationError: naming `flag` and the seeds it may take.
    """
    last = first + count - 1
    if first < SEED_MIN:
        raise GenerationError(
            f"{flag} {first} is below the smallest seed torch.Generator takes ({SEED_MIN}): use e.g. 0."
        )
    if last > SEED_MAX:
        raise GenerationError(
            f"{flag} {first} gives image seeds up to {last} (seed + image index), beyond the largest seed "
            f"torch.Generator takes ({SEED_MAX}): use {flag} {SEED_MAX - count + 1} or less."
        )


def check_config_patches(pipe: Any, config: AgentSDConfig) -> None:
    """Refuse a config that would patch no layer (and so silently run the baseline), or a model
    of no family agentsd patches."""
    try:
        kind, model = find_model(pipe)
    except TypeError as err:
        raise GenerationError(str(err)) from None
    if not kind.layers(model, config):
        why = kind.nothing_patched(model, config)
        fix = " Use --preset sdxl or --max-downsample 2." if "max_downsample=" in why else ""
        fix = " Change --block-range." if "block_range=" in why else fix
        raise GenerationError(f"the agentsd config patches no layer of this model: {why}.{fix}")


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
