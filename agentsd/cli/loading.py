"""Loading what a run needs, and checking its settings before any work: the device and dtype, a
pipeline of a family agentsd patches by hub id or folder, its default preset; the seeds the
generator takes, the image size and prompt length the model takes, a config that
patches something, an output folder that can be written."""

from __future__ import annotations

import inspect
import logging
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from ..core.config import AgentSDConfig
from ..families import family, find_model, supported
from ..families import names as family_names
from .compat import dtype_kwargs
from .quiet import held_library_output

logger = logging.getLogger("agentsd.cli.generation")  # the logger these messages always had

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The preset `generate` and `compare` use unless told, by model family (see `default_preset`).
SDXL_PRESET = "sdxl"
# SD 3's pipeline refuses longer prompts (T5's limit there).
SD3_MAX_SEQUENCE_LENGTH = 512
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
        has = "only cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise GenerationError(f"device {requested!r} does not exist: this machine has {has}.")
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
    """Load a pipeline (its class comes from the model) of a family agentsd patches onto `device`.

    Raises:
        GenerationError: the model cannot be found, downloaded or loaded, or holds no model of a
            family agentsd patches (see `agentsd.families`).
    """
    local = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise GenerationError(f"model folder {model!r} does not exist: pass an existing folder or a hub id.")
    try:
        with held_library_output():
            pipe = DiffusionPipeline.from_pretrained(str(local) if looks_local else model, **dtype_kwargs(dtype))
    except Exception as err:  # hub, network, auth and format errors come in many types
        raise GenerationError(
            f"cannot load model {model!r} ({_reason(err)}): check the id, log in with `hf auth login` for a "
            "gated model, or pass a local folder saved with save_pretrained."
        ) from err
    try:
        find_model(pipe)
    except TypeError:
        raise GenerationError(
            f"{model!r} loads as {type(pipe).__name__}, which holds no model agentsd patches: it supports "
            f"{supported()}."
        ) from None
    return pipe.to(device)


def _reason(err: Exception) -> str:
    """The first sentence of `err`, without its asides in parentheses (the hub nests them), so that
    it reads inside a parenthesis of its own; at most 200 characters."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    while (shorter := re.sub(r"\s*\([^()]*\)", "", text)) != text:
        text = shorter
    text = text.replace("(", "").replace(")", "").split(". ")[0].rstrip(".")
    return text if len(text) <= 200 else text[:197] + "..."


def default_preset(pipe: Any) -> str:
    """The preset for this pipeline's model when none is named: `paper` for SD 1.x / 2.x, `sdxl`
    for SDXL (a UNet with SDXL's text-time embedding), `sd3` for SD 3 / 3.5, `pixart` for PixArt."""
    kind, model = find_model(pipe)
    return _preset_of(kind.name, model.config)


def _preset_of(family_name: str, model_config: Mapping[str, Any]) -> str:
    if family_name == "unet" and model_config.get("addition_embed_type") == "text_time":
        return SDXL_PRESET
    return family(family_name).preset


def read_config(reader: type, model: str, subfolder: str | None = None) -> dict[str, Any] | None:
    """The config file `reader` (a diffusers ConfigMixin class) reads from `model` (a hub id or
    folder), in `subfolder`, without downloading: None when it cannot (not there, not cached),
    with what the hub client logged and warned on the way dropped (`quiet.held_library_output`)."""
    local = Path(model).expanduser()
    try:
        with held_library_output():
            return reader.load_config(str(local) if local.is_dir() else model, subfolder=subfolder,
                                      local_files_only=True)  # fmt: skip
    except Exception:  # not there (or not without a download); loading says why, if it cannot load either
        return None


def _model_config(model: str) -> tuple[str, dict[str, Any]] | None:
    """The family name and model config of a hub id or folder, read from its config files alone
    (no weights); None when they cannot be read without downloading."""
    for name in family_names():
        kind = family(name)
        config = read_config(UNet2DConditionModel, model, kind.attribute)  # any ConfigMixin reads a config.json
        if config is not None and config.get("_class_name") == kind.model_class:
            return name, config
    return None


def model_default_preset(model: str) -> str | None:
    """`default_preset` of the pipeline `load_pipeline(model)` gives, from the model's config files
    alone; None when they cannot be read without downloading or name no family agentsd patches."""
    found = _model_config(model)
    return None if found is None else _preset_of(*found)


def model_family(model: str) -> str | None:
    """The family name (`unet`, `sd3`, `pixart`) of a hub id or folder from its config files
    alone; None when they cannot be read without downloading or name no family agentsd patches."""
    found = _model_config(model)
    return None if found is None else found[0]


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


def check_size(pipe: Any, width: int | None, height: int | None) -> None:
    """Refuse an image size the model cannot take: a diffusion transformer's latent must be whole
    patches, so its sides are multiples of the VAE's factor times the patch side (16 for SD 3,
    PixArt and Wan, whose patches are frames x rows x columns); a UNet takes multiples of the VAE's
    factor (8), as `GenerationSettings` checks.

    Raises:
        GenerationError: naming the side, the multiple and the nearest size below that fits.
    """
    _, model = find_model(pipe)
    patch = model.config.get("patch_size") or 1
    patch = patch[-1] if isinstance(patch, list | tuple) else patch  # Wan's (1, 2, 2)
    scale = getattr(pipe, "vae_scale_factor", None) or pipe.vae_scale_factor_spatial  # Wan's: spatial and temporal
    multiple = scale * patch
    for name, value in (("width", width), ("height", height)):
        if value is not None and value % multiple:
            fits = value - value % multiple or multiple
            raise GenerationError(
                f"{name} {value} is not a multiple of {multiple}, which {type(model).__name__} needs (the VAE's "
                f"{scale}x times its {patch}x{patch} patches): use e.g. {fits}."
            )


def check_max_sequence_length(value: int | None, family_name: str | None, flag: str = "--max-sequence-length") -> None:
    """Refuse a prompt length in T5 tokens that the model family's pipelines do not take: UNet
    pipelines have no T5 encoder, SD 3's and Flux's refuse more than 512 (`family_name` None: only
    the sign is checked).

    Raises:
        GenerationError: naming `flag` and what to pass instead.
    """
    if value is None:
        return
    if value < 1:
        raise GenerationError(f"{flag} {value} must be positive: use e.g. 256.")
    if family_name == "unet":
        raise GenerationError(
            f"{flag} sets the T5 prompt length of SD 3 / 3.5, PixArt and Flux; this Stable Diffusion UNet model's "
            "pipeline has no T5 encoder (its CLIP prompts are 77 tokens): leave it out."
        )
    if family_name in ("sd3", "flux") and value > SD3_MAX_SEQUENCE_LENGTH:
        model = "SD 3" if family_name == "sd3" else "Flux"
        raise GenerationError(
            f"{flag} {value} is more than {model}'s pipeline takes: use {SD3_MAX_SEQUENCE_LENGTH} or fewer."
        )


def call_options(pipe: Any, max_sequence_length: int | None = None) -> dict[str, Any]:
    """The call arguments a pipeline needs beyond the prompt, steps, guidance, size and generators,
    as far as its `__call__` takes them: `max_sequence_length` when given (SD 3 / 3.5, PixArt),
    `use_resolution_binning=False` (PixArt would otherwise run the nearest size of its aspect-ratio
    bins, 256 px and up, and resize the image to the size asked for: the size asked for is what
    runs) and `clean_caption=False` (PixArt's caption cleaning needs beautifulsoup4 and ftfy: the
    prompt is used as written)."""
    takes = inspect.signature(pipe.__call__).parameters
    options: dict[str, Any] = dict(use_resolution_binning=False, clean_caption=False)
    if max_sequence_length is not None:
        options["max_sequence_length"] = max_sequence_length
    return {name: value for name, value in options.items() if name in takes}


def guidance_scale(pipe: Any, value: float | None = None) -> float:
    """The guidance scale a call runs with: `value`, else the pipeline's own default (SD 1.x / 2.x
    7.5, SDXL 5.0, SD 3 7.0, PixArt 4.5, Flux.1-dev's distilled guidance 3.5)."""
    if value is not None:
        return value
    parameter = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    default = None if parameter is None else parameter.default
    return float(default) if isinstance(default, int | float) else 7.5


def prompt_length(pipe: Any, max_sequence_length: int | None = None) -> int | None:
    """The T5 prompt length a call runs with: `max_sequence_length`, else the pipeline's default;
    None for a pipeline without one (SD 1.x, 2.x, XL)."""
    parameter = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    if parameter is None:
        return None
    return max_sequence_length if max_sequence_length is not None else parameter.default


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
