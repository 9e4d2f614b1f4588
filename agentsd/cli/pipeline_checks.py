"""What `generate` and `compare` ask of a model's pipeline, checked before any work: that it makes
images (or videos) from text alone, that a negative prompt would change the images, that what a
video needs is there (and video flags go to video models only), and that a Flux pipeline's
scheduler takes the sigmas the pipeline sets.

The checks read the pipeline's class, so they run before the model is loaded where its
`model_index.json` can be read without downloading (`model_pipeline_class`), and on the loaded
pipeline otherwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Protocol

import diffusers

from .loading import GenerationError, guidance_scale, read_config
from .video import check_video_extra, is_video

# Call arguments that make a pipeline image-conditioned (img2img, inpainting, Flux Fill, Kontext,
# ControlNet, Wan's image- and video-to-video): it needs an input image or video, which `generate`
# and `compare` do not have.
IMAGE_INPUTS = ("image", "mask_image", "control_image", "video")


def model_pipeline_class(model: str) -> type | None:
    """The pipeline class `DiffusionPipeline.from_pretrained(model)` gives, from the model's
    `model_index.json` alone; None when that cannot be read without downloading, or names no
    pipeline of this diffusers."""
    config = read_config(diffusers.DiffusionPipeline, model)  # a pipeline reads model_index.json
    found = getattr(diffusers, str(config.get("_class_name")), None) if config is not None else None
    return found if isinstance(found, type) else None


def _parameters(pipeline: Any) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(pipeline.__call__).parameters


def _name(pipeline: Any) -> str:
    return (pipeline if isinstance(pipeline, type) else type(pipeline)).__name__


def true_cfg_scale(pipeline: Any, value: float | None = None) -> float | None:
    """The true-CFG scale a call of `pipeline` (a pipeline or its class) runs with: `value`, else
    the pipeline's default (Flux: 1.0, no true CFG); None for a pipeline without true CFG."""
    parameter = _parameters(pipeline).get("true_cfg_scale")
    if parameter is None:
        return None
    return value if value is not None else float(parameter.default)


class Request(Protocol):
    """What the checks read of a run's settings (`jobs.GenerationSettings` has it)."""

    model: str
    negative_prompt: str | None
    guidance: float | None
    true_cfg_scale: float | None
    frames: int | None
    fps: int | None


def check_pipeline(pipeline: Any, settings: Request) -> None:
    """Refuse what `pipeline` (a pipeline or its class) cannot do with `settings`: make images from
    text alone (`check_text_to_image`), use the negative prompt (`check_negative_prompt`), write its
    videos or use the video flags (`check_video`)."""
    check_text_to_image(pipeline, settings.model)
    check_negative_prompt(pipeline, settings.negative_prompt, settings.guidance, settings.true_cfg_scale)
    check_video(pipeline, settings.frames, settings.fps)


def check_video(pipeline: Any, frames: int | None, fps: int | None) -> None:
    """A video pipeline needs the MP4 writer (`video.check_video_extra`); an image pipeline is
    refused a frame count or rate, which would change nothing.

    Raises:
        GenerationError: naming what is missing and how to get it, or the flag to leave out.
    """
    if is_video(pipeline):
        check_video_extra()
        return
    for flag, value in (("--frames", frames), ("--fps", fps)):
        if value is not None:
            raise GenerationError(f"{flag} is for video models (Wan); this model's {_name(pipeline)} makes images: "
                                  "leave it out.")  # fmt: skip


def check_text_to_image(pipeline: Any, model: str) -> None:
    """Refuse an image-conditioned pipeline (one whose call takes an input image): called with a
    prompt alone, it fails inside diffusers.

    Raises:
        GenerationError: naming the pipeline class and the fix.
    """
    inputs = [name for name in IMAGE_INPUTS if name in _parameters(pipeline)]
    if inputs:
        video = is_video(pipeline) or "video" in inputs
        what = "videos from an input image or video" if video else "images from an input image"
        raise GenerationError(
            f"model {model!r} loads as {_name(pipeline)}, which makes {what} (its {', '.join(inputs)}), not from "
            "text alone: generate and compare need a text-to-image model or a text-to-video model (e.g. FLUX.1-dev, "
            "not FLUX.1-Fill-dev; Wan2.1-T2V, not Wan2.1-I2V); this one agentsd patches from Python "
            "(agentsd.patch(pipe))."
        )


def check_negative_prompt(
    pipeline: Any, negative_prompt: str | None, guidance: float | None, true_cfg: float | None
) -> None:
    """Refuse a negative prompt that would not change the images, yet be recorded as if it did:
    Flux's pipelines use it only with true classifier-free guidance (`true_cfg_scale` > 1), the
    others only with classifier-free guidance (guidance > 1); and a true-CFG scale on a pipeline
    without true CFG, or without a negative prompt (diffusers then runs without it).

    Raises:
        GenerationError: naming the flags and the fix.
    """
    takes, name = _parameters(pipeline), _name(pipeline)
    if true_cfg is not None:
        if "true_cfg_scale" not in takes:
            raise GenerationError(
                f"--true-cfg-scale sets Flux's true classifier-free guidance, which this model's {name} does not "
                "have: leave it out."
            )
        if true_cfg <= 1 or negative_prompt is None:
            raise GenerationError(
                f"--true-cfg-scale {true_cfg} does nothing: true CFG runs with a scale above 1 and a --negative-prompt"
                " (each step then runs the transformer twice): give both, or leave --true-cfg-scale out."
            )
    if negative_prompt is None:
        return
    if "negative_prompt" not in takes:
        raise GenerationError(f"--negative-prompt: this model's {name} takes no negative prompt: leave it out.")
    if "true_cfg_scale" in takes and true_cfg is None:
        raise GenerationError(
            f"--negative-prompt does nothing on {name} without true classifier-free guidance (Flux.1's guidance is "
            "distilled, with no negative branch): add --true-cfg-scale above 1 (e.g. 4; each step then runs the "
            "transformer twice), or leave --negative-prompt out."
        )
    scale = guidance_scale(pipeline, guidance)
    if "true_cfg_scale" not in takes and scale <= 1:
        raise GenerationError(
            f"--negative-prompt does nothing with guidance {scale:g}: classifier-free guidance, which uses it, runs "
            "above 1: raise --guidance, or leave --negative-prompt out."
        )


def check_flux_scheduler(scheduler: Any, family_name: str | None, flag: str = "--scheduler") -> None:
    """Refuse, for a Flux model (`family_name`), a scheduler that cannot take the shifted sigmas
    its pipelines set (`set_timesteps(sigmas=..., mu=...)`): FlowMatchHeun, for one.

    Raises:
        GenerationError: naming the scheduler and the fix.
    """
    if family_name != "flux":
        return
    takes = inspect.signature(scheduler.set_timesteps).parameters
    if "sigmas" not in takes or "mu" not in takes:
        raise GenerationError(
            f"{flag}: {type(scheduler).__name__} cannot run Flux, whose pipelines set their own shifted sigmas: "
            "use flow-euler, or leave out --scheduler to keep the model's own."
        )
