"""What `agentsd compare` compares and how it scores: the methods (`--method`: the baseline, an
agentsd preset with overrides, ToMe for SD at a ratio) and the scoring settings. Shared by the
comparison (`compare.py`), its scores (`metrics.py`) and the GPU suite."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..api.caches import CacheSpec
from ..api.presets import load_preset
from ..core.config import AgentSDConfig
from ..families import find_model
from .generation import GenerationError, MethodRun, check_pipeline_cache


@dataclass(frozen=True)
class MethodSpec:
    """A method to compare: the baseline, an agentsd config, or ToMe for SD at a ratio; any of
    them under a step cache (`cache`)."""

    name: str
    config: AgentSDConfig | None = None
    tomesd_ratio: float | None = None
    cache: CacheSpec | None = None

    @property
    def ratio(self) -> float:
        if self.tomesd_ratio is not None:
            return self.tomesd_ratio
        return 0.0 if self.config is None else self.config.ratio

    @property
    def folder_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.name)

    def run(self, folder: Path, video: bool = False) -> MethodRun:
        """Its `MethodRun` into `folder` (of videos, for a video model)."""
        context = None
        if self.tomesd_ratio is not None:
            ratio = self.tomesd_ratio
            context = lambda pipe: _tomesd_patched(pipe, ratio)  # noqa: E731
        return MethodRun(self.name, self.config, folder, context=context, video=video, cache=self.cache)


@contextmanager
def _tomesd_patched(pipe: Any, ratio: float) -> Iterator[None]:
    import tomesd

    tomesd.apply_patch(pipe, ratio=ratio)
    try:
        yield
    finally:
        tomesd.remove_patch(pipe)


def parse_method(spec: str, cache: CacheSpec | None = None) -> MethodSpec:
    """`baseline`, `tomesd:RATIO`, or a preset name / YAML path with optional overrides:
    `paper`, `paper:ratio=0.5,agent_ratio=0.9`, `agentsd:ratio=0.5` (defaults + overrides);
    `cache` (the baseline under the step cache `cache`, from --cache) and `cache+METHOD` (METHOD
    under it: `cache+agentsd`, `cache+flux:ratio=0.5`)."""
    if spec == "cache" or spec.startswith("cache+"):
        if cache is None:
            raise GenerationError(f"method {spec!r} runs under a step cache: name it with --cache NAME[:NUMBER].")
        inner = MethodSpec(spec) if spec == "cache" else parse_method(spec.removeprefix("cache+"))
        if inner.name == "baseline" and spec != "cache":
            raise GenerationError(f"method {spec!r}: the baseline under the cache is the method 'cache'.")
        return dataclasses.replace(inner, name=spec, cache=cache)
    if spec == "baseline":
        return MethodSpec(spec)
    head, _, tail = spec.partition(":")
    if head == "tomesd":
        try:
            ratio = float(tail)
        except ValueError:
            raise GenerationError(f"method {spec!r}: write tomesd:RATIO, e.g. tomesd:0.5.") from None
        if not 0.0 <= ratio < 1.0:
            raise GenerationError(f"method {spec!r}: the ToMe ratio must be in [0, 1), e.g. tomesd:0.5.")
        try:
            import tomesd  # noqa: F401
        except ImportError:
            raise GenerationError(f"method {spec!r} needs ToMe for SD: pip install tomesd.") from None
        return MethodSpec(spec, tomesd_ratio=ratio)
    config = AgentSDConfig() if head == "agentsd" else load_preset(head)
    overrides = {}
    for item in filter(None, tail.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise GenerationError(f"method {spec!r}: overrides are field=value, e.g. paper:ratio=0.5.")
        overrides[key.strip()] = yaml.safe_load(value.strip())
    try:
        return MethodSpec(spec, config=config.replace(**overrides))
    except TypeError as err:
        raise GenerationError(f"method {spec!r}: {err}") from None


def check_methods(pipe: Any, methods: Sequence[MethodSpec]) -> None:
    """Refuse a method the pipeline's model cannot run: ToMe for SD (`tomesd:RATIO`) patches
    Stable Diffusion UNets only, not SD 3's or PixArt's transformers; a step cache runs on the
    models `api.caches.check_cache` lets through."""
    kind, model = find_model(pipe)
    for method in methods:
        if method.cache is not None:
            check_pipeline_cache(pipe, method.cache)
        if method.tomesd_ratio is not None and kind.name != "unet":
            raise GenerationError(
                f"method {method.name!r}: ToMe for SD patches Stable Diffusion UNets only, and this model is a "
                f"{type(model).__name__}: drop it."
            )


def with_baseline(methods: Sequence[MethodSpec]) -> list[MethodSpec]:
    """`methods` with the baseline first unless already there.

    Refuses repeated methods, and methods whose names map to the same image folder (`x/a.yaml`
    and `x_a.yaml` both give `x_a.yaml`; folders are compared ignoring case, as some file
    systems do), which would share their images and scores."""
    methods = list(methods)
    if not any(m.name == "baseline" for m in methods):
        methods.insert(0, MethodSpec("baseline"))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise GenerationError(f"methods must be distinct, got {', '.join(names)}: give each --method once.")
    folders: dict[str, MethodSpec] = {}
    for method in methods:
        other = folders.setdefault(method.folder_name.casefold(), method)
        if other is not method:
            raise GenerationError(
                f"methods {other.name!r} and {method.name!r} would share the image folder images/{method.folder_name}: "
                "rename or move one of their preset files (folder names keep letters, digits and _.=- only)."
            )
    return methods


@dataclass
class ComparisonSettings:
    """What scoring needs besides the images."""

    reference: str | Path | None = None
    feature_extractor: torch.nn.Module | None = None
    inception_weights: str | Path | None = None
    clip_model: str | Path | None = None
    lpips: bool = False
    measure_memory: bool = True
    samples: int = 8
