"""The model of `agentsd generate` and `agentsd compare`: what the command line refuses before
loading it (from the model's config files, where they can be read without downloading), loading
it into an output folder that a failure leaves as it was, and what only the loaded pipeline tells."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from .args import UsageError

EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def no_empty_folder_on_error(folder: Path) -> Iterator[None]:
    """On an error inside, remove the folders on the way to `folder` that this block created,
    if they are still empty: a failed start leaves the user's files as they were."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for path in created:
            try:
                path.rmdir()
            except OSError:
                break
        raise


def check_model_settings(args: argparse.Namespace, settings, images: int) -> None:
    """Before loading the model: the seeds of `images` images from --seed; and, where the model's
    config files can be read without loading it, --scheduler and --steps for its scheduler,
    --max-sequence-length for its family, what its pipeline takes (`pipeline_checks`) and whether
    its model can be split under --context-parallel (`parallel`)."""
    from . import loading, parallel, pipeline_checks, schedulers

    loading.check_seeds(args.seed, images)
    pipeline = pipeline_checks.model_pipeline_class(args.model)
    if pipeline is not None:
        pipeline_checks.check_pipeline(pipeline, settings)
    family = loading.model_family(args.model)
    parallel.check_family(family, settings.context_parallel)
    loading.check_max_sequence_length(args.max_sequence_length, family)
    scheduler = schedulers.model_scheduler(args.model, args.scheduler)
    if scheduler is not None:
        pipeline_checks.check_flux_scheduler(scheduler, family)
        schedulers.check_steps(scheduler, args.steps)


def default_preset(args: argparse.Namespace, pipe=None) -> str:
    """The preset of the model's family (`loading.default_preset`): of the loaded `pipe`, else
    read from the model's config files (`paper` where they cannot be read without downloading)."""
    from . import loading

    if pipe is not None:
        return loading.default_preset(pipe)
    return loading.model_default_preset(args.model) or "paper"


def load_pipeline(args: argparse.Namespace, settings, dtype, device, out: Path, configs_for):
    """Create `out` (writable), then load --model on `device` in `dtype` with --scheduler and
    refuse what only the loaded model tells (sizes, --max-sequence-length, --scheduler and
    --steps, what the pipeline takes, the configs `configs_for(pipe)` gives that patch nothing,
    what --context-parallel cannot split, a --cache the model cannot run), then enable context
    parallelism if asked: on an error (or Ctrl-C) the folder is removed again if this made it.
    Under context parallelism rank 0 alone makes the folder. Returns the pipeline and those configs."""
    from ..families import find_model
    from . import loading, parallel, pipeline_checks, schedulers
    from .generation import check_pipeline_cache

    with no_empty_folder_on_error(out):
        if settings.writes:
            loading.prepare_folder(out)
        pipe = loading.load_pipeline(args.model, dtype, device)
        pipeline_checks.check_pipeline(pipe, settings)
        family = find_model(pipe)[0].name
        loading.check_size(pipe, args.width, args.height)
        loading.check_max_sequence_length(args.max_sequence_length, family)
        schedulers.set_scheduler(pipe, args.scheduler)
        pipeline_checks.check_flux_scheduler(pipe.scheduler, family)
        configs = configs_for(pipe)
        for config in filter(None, configs):
            loading.check_config_patches(pipe, config)
        schedulers.check_steps(pipe.scheduler, args.steps)
        if getattr(args, "cache", None) is not None:
            check_pipeline_cache(pipe, cache_spec(args))
        parallel.check_pipeline(pipe, settings.context_parallel, settings)
        parallel.enable(pipe, settings.context_parallel)
    return pipe, configs


def check_backend(config, device, method: str | None = None) -> None:
    """Refuse an attention backend that cannot run on `device` (xformers missing, or not CUDA)."""
    from ..core.attention import check_backend

    if config is None:
        return
    try:
        check_backend(config.attention_backend, device)
    except ValueError as err:
        raise UsageError(f"method {method!r}: {err}" if method else str(err)) from None


def check_positive(flag: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise UsageError(f"{flag} {value} must be {'positive' if minimum == 1 else f'>= {minimum}'}.")


def cache_spec(args: argparse.Namespace):
    """The step cache of --cache (`api.caches.CacheSpec`), or None."""
    from ..api.caches import parse_cache

    if getattr(args, "cache", None) is None:
        return None
    try:
        return parse_cache(args.cache)
    except ValueError as err:
        raise UsageError(f"--cache {args.cache}: {err}") from None
