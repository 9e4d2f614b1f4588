"""The schedulers `--scheduler` names, and the checks around them before any work: a scheduler
of the model's kind (flow matching or noise prediction), built from the model's own config, and
the step counts it takes."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import diffusers

from .loading import GenerationError, read_config
from .quiet import no_config_warning

# Scheduler name -> (diffusers class name, extra config). Looked up by name when used: older
# diffusers releases lack some (LCMScheduler arrived in 0.22, the flow-matching ones in 0.28-0.29).
# The flow-matching ones (`FLOW_SCHEDULERS`) are for flow-matching models (SD 3 / 3.5) only, the
# others for noise-prediction models (SD 1.x, 2.x, XL, PixArt) only: see `check_scheduler_fits`.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
}
FLOW_SCHEDULERS = ("flow-euler", "flow-heun")


def is_flow_matching(class_name: str, config: Mapping[str, Any]) -> bool:
    """Whether a scheduler (its class name and config) samples a flow-matching model (SD 3)."""
    flow_config = config.get("prediction_type") == "flow_prediction" or bool(config.get("use_flow_sigmas"))
    return class_name.startswith("FlowMatch") or flow_config


def check_scheduler_fits(name: str, class_name: str, config: Mapping[str, Any]) -> None:
    """Refuse a scheduler name of the other kind than the model's own scheduler (`class_name`,
    `config`): a flow-matching model (SD 3) takes `FLOW_SCHEDULERS` only, the others (SD 1.x, 2.x,
    XL, PixArt) the rest. Built from the other kind's config, a scheduler would run but sample
    nonsense.

    Raises:
        GenerationError: naming the scheduler names that fit.
    """
    flow = is_flow_matching(class_name, config)
    if flow == (name in FLOW_SCHEDULERS):
        return
    fits = ", ".join(n for n in SCHEDULERS if (n in FLOW_SCHEDULERS) == flow)
    if flow:
        what = f"is for noise-prediction models (SD 1.x, 2.x, XL, PixArt); this model's {class_name} does flow matching"
    else:
        what = f"is for flow-matching models (SD 3 / 3.5, Flux); this model's {class_name} does not do flow matching"
    raise GenerationError(
        f"scheduler {name!r} {what}: use one of {fits}, or leave out --scheduler to keep the model's own."
    )


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


def _flow_shift(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """The shift a flow-matching scheduler built from `config` keeps: Wan's models come with a UniPC
    scheduler whose sigmas are shifted by `flow_shift` (3.0 at 480p), which FlowMatch schedulers
    call `shift` (default 1.0: no shift at all)."""
    if cls.__name__.startswith("FlowMatch") and "flow_shift" in config and "shift" not in config:
        return {"shift": config["flow_shift"]}
    return {}


def set_scheduler(pipe: Any, name: str | None) -> None:
    """Replace the pipeline's scheduler by name, keeping the model's noise schedule (and its flow
    shift, `_flow_shift`).

    Raises:
        GenerationError: an unknown name, or one that does not fit the model (`check_scheduler_fits`).
    """
    if name is not None:
        cls, extra = _scheduler_class(name)
        check_scheduler_fits(name, type(pipe.scheduler).__name__, pipe.scheduler.config)
        with no_config_warning():
            pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra, **_flow_shift(cls, pipe.scheduler.config))


def model_scheduler(model: str, name: str | None = None) -> Any | None:
    """The scheduler that `load_pipeline(model)` and `set_scheduler(pipe, name)` give, built from
    the model's scheduler config alone, without its weights; None when that config cannot be read
    without downloading (neither a local folder nor in the hub cache).

    Raises:
        GenerationError: an unknown scheduler name, or one that does not fit the model, as
            `set_scheduler`.
    """
    config = read_config(diffusers.DDIMScheduler, model, "scheduler")  # a scheduler reads scheduler_config.json
    if config is None:
        return None
    if name is not None:
        cls, extra = _scheduler_class(name)
        check_scheduler_fits(name, str(config.get("_class_name")), config)
        with no_config_warning():
            return cls.from_config(config, **extra, **_flow_shift(cls, config))
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
        with no_config_warning():  # a scheduler made from another class's config keeps its attributes
            trial = type(scheduler).from_config(scheduler.config)
        # Flux's flow matching shifts by the image size (`mu`), which the pipeline computes: any
        # shift takes the same step counts.
        dynamic = getattr(trial.config, "use_dynamic_shifting", False)
        shift = {"mu": 1.0} if dynamic and "mu" in inspect.signature(trial.set_timesteps).parameters else {}
        try:
            trial.set_timesteps(count, **shift)
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
