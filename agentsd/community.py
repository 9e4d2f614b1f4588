"""Support for the community pipelines in `pipelines/`: agent attention per `__call__`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .config import AgentSDConfig
from .patch import patched, unpatched
from .presets import load_preset


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
