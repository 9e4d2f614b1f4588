"""The community pipelines in `pipelines/` (shipped as `agentsd.pipelines`): where they are, and
their agent attention per `__call__`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..core.config import AgentSDConfig
from .patch import patched, unpatched
from .presets import load_preset

# Name -> file in `pipelines/`. The file names differ because diffusers caches a local custom
# pipeline under its file name.
COMMUNITY_PIPELINES = {"sd": "agentsd_sd.py", "sdxl": "agentsd_sdxl.py", "sd3": "agentsd_sd3.py"}


def _pipeline_dir() -> Path:
    """`pipelines/` of a source checkout, or its copy inside an installed wheel."""
    here = Path(__file__).resolve().parents[1]  # the package: agentsd/api/community.py
    for folder in (here / "pipelines", here.parent / "pipelines"):
        if (folder / COMMUNITY_PIPELINES["sd"]).is_file():
            return folder
    raise FileNotFoundError(f"agentsd's community pipeline folder is missing next to {here}: reinstall agentsd.")


def community_pipeline(name: str = "sd") -> str:
    """The path of a community pipeline file, for diffusers' `custom_pipeline`.

    Args:
        name: `"sd"` (SD 1.x / 2.x, default preset `paper`), `"sdxl"` (default preset `sdxl`) or
            `"sd3"` (SD 3 / 3.5, default preset `sd3`; needs diffusers 0.29 or newer).

    Raises:
        ValueError: for another name.

    Example:
        >>> pipe = DiffusionPipeline.from_pretrained(  # doctest: +SKIP
        ...     model, custom_pipeline=agentsd.community_pipeline("sd"), trust_remote_code=True
        ... )
        >>> image = pipe("a photo of a cat", agentsd_config="paper").images[0]  # doctest: +SKIP
    """
    if name not in COMMUNITY_PIPELINES:
        names = ", ".join(map(repr, COMMUNITY_PIPELINES))
        raise ValueError(f"unknown community pipeline {name!r}: use one of {names}.")
    return str(_pipeline_dir() / COMMUNITY_PIPELINES[name])


def resolve_config(value: AgentSDConfig | Mapping | str | Path | bool | None, default: str) -> AgentSDConfig | None:
    """An `agentsd_config` argument as a config; None means the baseline.

    Args:
        value: an `AgentSDConfig`, a mapping of its fields, a preset name or YAML path,
            None or True for the `default` preset, False for the baseline.
        default: the preset used when `value` is None or True.
    """
    if value is None or value is True:
        return load_preset(default)
    if value is False:
        return None
    if isinstance(value, AgentSDConfig):
        return value
    if isinstance(value, Mapping):
        return AgentSDConfig().replace(**value)
    if isinstance(value, (str, Path)):
        return load_preset(value)
    raise TypeError(
        f"agentsd_config={value!r} is not supported: pass an AgentSDConfig, a dict of its fields, "
        "a preset name or YAML path, or False for the baseline."
    )


def call_with_agentsd(pipe: Any, call: Callable[..., Any], agentsd_config: Any, default: str, *args, **kwargs) -> Any:
    """Run `call(*args, **kwargs)` with `pipe` patched by `agentsd_config`, or without agentsd
    (the baseline) when it resolves to None; either way the pipeline's own patch, if it had
    one, is back afterwards."""
    config = resolve_config(agentsd_config, default)
    with patched(pipe, config) if config is not None else unpatched(pipe):
        return call(*args, **kwargs)
