"""Step caches by name, for the command line and the bench: `first-block:0.2` is diffusers'
FirstBlockCache at threshold 0.2, `dbcache:0.12` cache-dit's DBCache. A cache skips whole blocks
(or reuses attention outputs) on some model calls; `counting_skips` counts the calls in which it
skipped the attention layers agentsd patches, with or without agentsd on the model.

>>> spec = parse_cache("first-block:0.2")  # doctest: +SKIP
>>> with enabled_cache(pipe, spec, steps=28), counting_skips(pipe) as calls:  # doctest: +SKIP
...     pipe("a photo of a cat")
>>> calls.skip_fraction  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..core.config import AgentSDConfig
from ..families import find_model


@dataclass(frozen=True)
class Cache:
    """A step cache agentsd can put on a pipeline by name.

    Args:
        library: "diffusers" (`transformer.enable_cache`) or "cache-dit" (`cache_dit.enable_cache`).
        number: what the number after the name sets, in words, for help and errors.
        default: that number when none is given (the library's own default).
        build: the library's config for (pipe, family name, number, steps of the run).
        families: the model families it runs on as its library ships it.
        need: why it runs on no other family, for the error.
        integer: the number is a count (a whole number >= 1), not a threshold (> 0).
        config_class: the diffusers config class it needs (absent in older diffusers).
    """

    library: str
    number: str
    default: float
    build: Callable[[Any, str, float, int], Any]
    families: tuple[str, ...] = ("flux", "wan")
    need: str = ""
    integer: bool = False
    config_class: str = ""


def _hooks() -> Any:
    import diffusers.hooks

    return diffusers.hooks


def _timestep(pipe: Any) -> Callable[[], Any]:
    return lambda: pipe.current_timestep


def _dbcache(pipe: Any, value: float) -> Any:
    """cache-dit's DBCache at its defaults, but computing at most all blocks but one of the model's
    first block stack before deciding (8 by default: more than a small model has)."""
    import cache_dit

    model = find_model(pipe)[1]
    stacks = [getattr(model, name, None) for name in ("transformer_blocks", "blocks")]
    blocks = min((len(stack) for stack in stacks if stack is not None), default=9)
    first = min(cache_dit.DBCacheConfig().Fn_compute_blocks, max(blocks - 1, 1))
    return cache_dit.DBCacheConfig(residual_diff_threshold=value, Fn_compute_blocks=first)


# Each builds the library's config from the defaults a user of that library gets, plus what the
# model needs to run at all: TaylorSeer's default patterns hook attention modules named "...attn"
# (Flux's); Wan's are attn1 / attn2, so Wan predicts whole blocks (lite mode). Pyramid Attention
# Broadcast and FasterCache read the timestep through the pipeline; Flux is guidance-distilled, and
# Wan runs guidance as separate model calls, which FasterCache must not split as a batch's halves.
# MagCache needs magnitude ratios calibrated on the model: diffusers ships Flux's.
CACHES: dict[str, Cache] = {
    "first-block": Cache(
        "diffusers", "the threshold of the first block's relative change", 0.05,
        lambda pipe, family, value, steps: _hooks().FirstBlockCacheConfig(threshold=value),
        config_class="FirstBlockCacheConfig",
    ),
    "taylorseer": Cache(
        "diffusers", "the interval between fully computed steps", 5,
        lambda pipe, family, value, steps: _hooks().TaylorSeerCacheConfig(
            cache_interval=int(value), use_lite_mode=family == "wan"
        ),
        integer=True, config_class="TaylorSeerCacheConfig",
    ),
    "mag": Cache(
        "diffusers", "the accumulated magnitude error threshold", 0.06,
        lambda pipe, family, value, steps: _hooks().MagCacheConfig(
            threshold=value, num_inference_steps=steps, mag_ratios=_hooks().mag_cache.FLUX_MAG_RATIOS
        ),
        families=("flux",), need="calibrated magnitude ratios, which diffusers ships for Flux only",
        config_class="MagCacheConfig",
    ),
    "pyramid-attention-broadcast": Cache(
        "diffusers", "the block skip range of spatial attention", 2,
        lambda pipe, family, value, steps: _hooks().PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=int(value), current_timestep_callback=_timestep(pipe)
        ),
        integer=True, config_class="PyramidAttentionBroadcastConfig",
    ),
    "faster": Cache(
        "diffusers", "the block skip range of spatial attention", 2,
        lambda pipe, family, value, steps: _hooks().FasterCacheConfig(
            spatial_attention_block_skip_range=int(value), current_timestep_callback=_timestep(pipe),
            is_guidance_distilled=True,
        ),
        integer=True, config_class="FasterCacheConfig",
    ),
    "sea": Cache(
        "diffusers", "the spectral change threshold", 0.25,
        lambda pipe, family, value, steps: _hooks().SeaCacheConfig(threshold=value),
        families=("wan",), need="a model adapter, which diffusers has for Wan text-to-video (and Cosmos 3)",
        config_class="SeaCacheConfig",
    ),
    "dbcache": Cache(
        "cache-dit", "the residual difference threshold", 0.08,
        lambda pipe, family, value, steps: _dbcache(pipe, value),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class CacheSpec:
    """A named cache at a number (`CACHES[name].number`); `label` is how runs record it."""

    name: str
    value: float

    @property
    def cache(self) -> Cache:
        return CACHES[self.name]

    @property
    def label(self) -> str:
        return f"{self.name}:{self.value:g}"


def available(name: str) -> str | None:
    """None when the cache `name` can run here, else what it needs."""
    cache = CACHES[name]
    if cache.library == "cache-dit":
        return None if importlib.util.find_spec("cache_dit") else "cache-dit: pip install cache-dit"
    if importlib.util.find_spec("diffusers.hooks") is None or not hasattr(_hooks(), cache.config_class):
        return f"a newer diffusers (this one has no {cache.config_class})"
    return None


def cache_names() -> list[str]:
    """The caches that can run with the installed packages (diffusers', and cache-dit's when installed)."""
    return [name for name in CACHES if available(name) is None]


def parse_cache(text: str) -> CacheSpec:
    """`NAME` or `NAME:NUMBER` (`first-block:0.2`, `taylorseer:4`).

    Raises:
        ValueError: an unknown or unavailable name, or a number the cache cannot take, naming the fix.
    """
    name, sep, number = text.partition(":")
    if name not in CACHES:
        raise ValueError(f"unknown cache {name!r}: use one of {', '.join(cache_names()) or '(none installed)'}.")
    missing = available(name)
    if missing is not None:
        raise ValueError(f"cache {name!r} needs {missing}.")
    cache = CACHES[name]
    try:
        value = float(number) if sep else float(cache.default)
    except ValueError:
        raise ValueError(
            f"cache {text!r}: the number after {name}: is {cache.number}, e.g. {name}:{cache.default:g}."
        ) from None
    if cache.integer and (value != int(value) or value < 1):
        raise ValueError(f"cache {text!r}: {cache.number} is a whole number >= 1, e.g. {name}:{cache.default:g}.")
    if not cache.integer and not value > 0:
        raise ValueError(f"cache {text!r}: {cache.number} must be positive, e.g. {name}:{cache.default:g}.")
    return CacheSpec(name, value)


def check_cache(pipe: Any, spec: CacheSpec) -> None:
    """Refuse, before any work, a cache the pipeline's model cannot run.

    Raises:
        ValueError: naming the model and the caches it can run.
    """
    family, model = find_model(pipe)
    cache = spec.cache
    if cache.library == "diffusers" and not hasattr(model, "enable_cache"):
        raise ValueError(
            f"cache {spec.name!r}: this diffusers' {type(model).__name__} has no enable_cache, so no diffusers step "
            "cache runs on it: drop --cache."
        )
    why = family_reason(cache, family.name)
    if why is not None:
        runs = [n for n in cache_names() if family.name in CACHES[n].families and CACHES[n].library == cache.library]
        raise ValueError(
            f"cache {spec.name!r} does not run on {type(model).__name__}: {why}. "
            f"Use one of {', '.join(runs) or 'none'}."
        )


def family_reason(cache: Cache, family: str) -> str | None:
    """Why `cache` does not run on the model family named `family`, in words; None where it does."""
    if family in cache.families:
        return None
    return f"it needs {cache.need}" if cache.need else f"agentsd stacks it on {', '.join(cache.families)} only"


@contextmanager
def enabled_cache(pipe: Any, spec: CacheSpec, steps: int) -> Iterator[None]:
    """`pipe` with the cache on for the block; off again after it, however it ends."""
    check_cache(pipe, spec)
    family, model = find_model(pipe)
    config = spec.cache.build(pipe, family.name, spec.value, steps)
    if spec.cache.library == "cache-dit":
        import cache_dit

        cache_dit.enable_cache(pipe, cache_config=config)
        try:
            yield
        finally:
            cache_dit.disable_cache(pipe)
        return
    model.enable_cache(config)
    try:
        yield
    finally:
        model.disable_cache()


@dataclass
class SkipCount:
    """Model calls in which every counted attention layer ran ("computed"), and those in which a
    cache skipped some ("skipped"); `layers` is how many layers each call counts."""

    computed: int = 0
    skipped: int = 0
    layers: int = 0
    _ran: set[int] = field(default_factory=set, repr=False)

    @property
    def calls(self) -> int:
        return self.computed + self.skipped

    @property
    def skip_fraction(self) -> float | None:
        return self.skipped / self.calls if self.calls else None


@contextmanager
def counting_skips(pipe: Any, config: AgentSDConfig | None = None) -> Iterator[SkipCount]:
    """Count, over the block, the model calls in which a step cache skipped attention layers.

    The layers are those agentsd patches under `config` (default: `AgentSDConfig()`), counted
    whether agentsd is on or not: a layer ran when its projections did. A cache replaces the
    forward of a block or attention module it skips, so their children do not run; the
    projections are children no cache hooks. Eager models only: the hooks go on the
    modules, which a compiled model would have to guard on. The hooks count every call of the
    model during the block, so give the count a model that serves one call at a time (as a
    cached model must anyway: diffusers keeps a cache's state per model)."""
    family, _ = find_model(pipe)
    layers = {
        model: [layer.module for layer in family.layers(model, config or AgentSDConfig()).values()]
        for _, model in family.models_of(pipe)
    }
    count = SkipCount(layers=max(map(len, layers.values()), default=0))
    handles = []

    def start(model, args):
        count._ran.clear()

    def end(model, args, output):
        if len(count._ran) == len(layers[model]):
            count.computed += 1
        else:
            count.skipped += 1

    for model, modules in layers.items():
        handles += [model.register_forward_pre_hook(start), model.register_forward_hook(end)]
        for index, module in enumerate(modules):
            for child in module.children():  # to_q, to_k, ... (peft's LoRA layers too); a ModuleList never runs
                handles.append(child.register_forward_pre_hook(lambda child, args, i=index: count._ran.add(i)))
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()
