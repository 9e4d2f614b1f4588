"""Text-to-image (and text-to-video) with and without agent attention, written to disk as images
finish.

The library side of `agentsd generate`: generating a set of (prompt, seed) images into a
folder with their parameters embedded, never overwriting unless asked, keeping every finished
image when interrupted. Loading the pipeline and the checks before any work are in `loading`;
a video model's videos are written as `video` says (an MP4, a contact sheet, the sidecar).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Collection, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import __version__
from ..api.caches import CacheSpec, check_cache, counting_skips
from ..api.status import recording_phases, status
from ..api.words import plural
from ..core.config import AgentSDConfig
from ..families import find_model
from .jobs import (  # re-exported: `generation` has been their home
    GenerationSettings,
    ImageJob,
    MethodRun,
    plan_jobs,  # noqa: F401
    speedup,  # noqa: F401
)
from .loading import (  # re-exported: `generation` has been their home
    DEFAULT_MODEL,  # noqa: F401
    DTYPES,  # noqa: F401
    GenerationError,
    call_options,
    check_config_patches,
    check_max_sequence_length,
    check_seeds,
    check_size,
    guidance_scale,
    load_pipeline,  # noqa: F401
    prepare_folder,
    prompt_length,
    resolve_device,  # noqa: F401
    resolve_dtype,  # noqa: F401
)
from .output import atomic_write, read_sidecar, save_image, setting_differences, side_by_side, stale_message
from .pipeline_checks import check_flux_scheduler, check_pipeline, true_cfg_scale
from .schedulers import SCHEDULERS, check_steps, set_scheduler  # noqa: F401 (re-exported)
from .step_phases import step_phases
from .video import call_defaults, is_video, save_video, video_record, write_video_pair

logger = logging.getLogger(__name__)

BASELINE, AGENTSD = "baseline", "agentsd"


def check_run(pipe: Any, jobs: Sequence[ImageJob], settings: GenerationSettings) -> None:
    """Refuse, before any work, what would fail mid-run or make other images than asked: a step
    count the pipeline's scheduler refuses, image seeds the generator refuses, a size or prompt
    length the model refuses, an image-conditioned pipeline, a negative prompt without effect."""
    family = find_model(pipe)[0].name
    check_pipeline(pipe, settings)
    check_flux_scheduler(pipe.scheduler, family, "scheduler")
    check_steps(pipe.scheduler, settings.steps, "steps")
    check_size(pipe, settings.width, settings.height)
    check_max_sequence_length(settings.max_sequence_length, family, "max_sequence_length")
    if jobs:
        seeds = [job.seed for job in jobs]
        check_seeds(min(seeds), max(seeds) - min(seeds) + 1, "seed")


def call_pipeline(
    pipe: Any, jobs: Sequence[ImageJob], settings: GenerationSettings, run: MethodRun, steps: int, track: bool = False
):
    """The images of `jobs` (one generator per image, seeded by its job) run as `run` says; with
    `track`, what agentsd did in the call is added to `run.activity`, and `run.phases` is the
    phase of each of its scheduler steps (`steps.step_phases`: a step may be more than one model
    call). The pipeline's own options are set as `loading.call_options` says (PixArt runs the size
    asked for, and the prompt as written)."""
    kwargs = dict(
        prompt=[j.prompt for j in jobs],
        num_inference_steps=steps,
        guidance_scale=guidance_scale(pipe, settings.guidance),
        width=settings.width,
        height=settings.height,
        generator=[torch.Generator().manual_seed(j.seed) for j in jobs],
        **call_options(pipe, settings.max_sequence_length),
    )
    if settings.negative_prompt is not None:
        kwargs["negative_prompt"] = [settings.negative_prompt] * len(jobs)
    if settings.true_cfg_scale is not None:
        kwargs["true_cfg_scale"] = settings.true_cfg_scale
    if run.video:  # each video a list of PIL frames
        kwargs.update(output_type="pil", **({"num_frames": settings.frames} if settings.frames else {}))
    count = track and run.cache is not None
    track = track and run.config is not None
    with run.enter(pipe, steps), recording_phases(pipe) if track else nullcontext() as phases:
        with counting_skips(pipe, run.config) if count else nullcontext() as calls:
            output = pipe(**kwargs)
        images = output.frames if run.video else output.images
        if track:
            report = status(pipe)
            run.activity += report.activity
            run.phases, run.parallel = step_phases(phases, pipe.scheduler, steps), report.parallel
    if count:
        run.latest_cache_calls = dict(computed=calls.computed, skipped=calls.skipped)
        run.cache_calls.update(run.latest_cache_calls)
    return images


def run_record(pipe: Any, settings: GenerationSettings, scheduler_name: str | None = None) -> dict[str, Any]:
    """What every image of a run records about how it was made (its sidecar adds the image's own
    fields, see `image_record`): the model, the scheduler (its name and config), steps, guidance
    (and Flux's true-CFG scale; None for the others), size, negative prompt, batch size, the T5
    prompt length (SD 3 / 3.5, PixArt and Flux; None for the others), device type, dtype, the
    context-parallel layout (mode and degree; None in one process) and the agentsd version; a
    video's also its frame count and rate (`video.video_record`)."""
    _, model = find_model(pipe)
    if is_video(pipe):  # Wan's pipelines name their default size
        width, height = call_defaults(pipe)["width"], call_defaults(pipe)["height"]
    else:  # Flux pipelines keep theirs (`default_sample_size`, in latents); their transformer has no `sample_size`
        side = getattr(pipe, "default_sample_size", None) or model.config.sample_size
        width = height = side * pipe.vae_scale_factor
    record = dict(
        model=settings.model,
        scheduler=scheduler_name or type(pipe.scheduler).__name__,
        scheduler_config=scheduler_record(pipe.scheduler),
        steps=settings.steps,
        guidance=guidance_scale(pipe, settings.guidance),
        true_cfg_scale=true_cfg_scale(pipe, settings.true_cfg_scale),
        width=settings.width or width,
        height=settings.height or height,
        negative_prompt=settings.negative_prompt,
        batch_size=settings.batch_size,
        max_sequence_length=prompt_length(pipe, settings.max_sequence_length),
        device=pipe.device.type,
        dtype=str(model.dtype).replace("torch.", ""),
        context_parallel=None if settings.context_parallel is None else settings.context_parallel.record(),
        agentsd_version=__version__,
    )
    return record | (video_record(pipe, settings.frames, settings.fps) if is_video(pipe) else {})


def scheduler_record(scheduler: Any) -> dict[str, Any]:
    """The scheduler's public config as JSON reads it back (arrays as lists, such as
    `trained_betas`): what a sidecar records and is compared with."""
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    return json.loads(json.dumps(config, default=lambda value: getattr(value, "tolist", lambda: str(value))()))


def image_record(record: dict[str, Any], run: MethodRun, job: ImageJob) -> dict[str, Any]:
    """The run's `record` with what is the image's own: its prompt, seed and method."""
    config = None if run.config is None else run.config.to_dict()
    return dict(record, prompt=job.prompt, prompt_index=job.prompt_index, seed=job.seed, method=run.label,
                agentsd_config=config, cache=None if run.cache is None else run.cache.label)  # fmt: skip


def stale_images(runs: Sequence[MethodRun], jobs: Sequence[ImageJob], record: dict[str, Any]) -> dict[Path, list[str]]:
    """The existing images (or videos) of `runs` made with other settings than `record` (a
    `run_record`) says, each with how its sidecar differs (`output.setting_differences`). An output
    exists once its sidecar is written: another kind of model's output has the same file names."""
    stale = {}
    for run in runs:
        for job in jobs:
            path = run.path(job)
            if path.exists() or path.with_suffix(".json").exists():
                differences = setting_differences(read_sidecar(path), image_record(record, run, job))
                if differences:
                    stale[path] = differences
    return stale


def check_stale(
    runs: Sequence[MethodRun], jobs: Sequence[ImageJob], record: dict[str, Any], overwrite: bool
) -> dict[Path, list[str]]:
    """The existing images of `runs` made with other settings (`stale_images`), so that a rerun
    never mixes them with its own: refused unless `overwrite`.

    Raises:
        GenerationError: naming the settings that differ (`output.stale_message`).
    """
    stale = stale_images(runs, jobs, record)
    if stale and not overwrite:
        folder = Path(os.path.commonpath([run.folder for run in runs]))
        raise GenerationError(stale_message(stale, folder))
    return stale


def check_pipeline_cache(pipe: Any, cache: CacheSpec) -> None:
    """Refuse, before any work, a step cache the pipeline's model cannot run (`api.caches.check_cache`)."""
    try:
        check_cache(pipe, cache)
    except ValueError as err:
        raise GenerationError(str(err)) from None


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
    cache: CacheSpec | None = None,
) -> list[MethodRun]:
    """Generate `jobs` into `out_dir`, image files appearing as their batch finishes.

    Args:
        pipe: a loaded pipeline of a family agentsd patches (SD 1.x, 2.x, XL, 3 / 3.5, PixArt).
        jobs: the images to make (see `plan_jobs`).
        out_dir: agentsd images go here (baseline images too when `config` is None);
            with `compare`, baseline images go to `baseline/` and side-by-side pairs
            (baseline left) to `compare/`.
        settings: what all images share.
        config: the agent-attention config, or None for the baseline alone.
        compare: also run the baseline with the same seeds, batch by batch, for timing.
        scheduler_name: recorded in the metadata.
        progress: show a progress bar over images.
        cache: a step cache every run makes its images under (`api.caches`), the baseline's too.

    Returns:
        One `MethodRun` per method with its seconds per image and the files written.
        Existing images made with these settings are skipped (listed in `skipped`) unless
        `settings.overwrite`, which makes every existing image again.

    Raises:
        GenerationError: before any work, for existing images made with other settings, unless
            `settings.overwrite` (`check_stale`).
    """
    check_run(pipe, jobs, settings)
    if cache is not None:
        check_pipeline_cache(pipe, cache)
    out, video = Path(out_dir), is_video(pipe)
    if config is None:
        runs = [MethodRun(BASELINE, None, out, video=video, cache=cache)]
    else:
        check_config_patches(pipe, config)
        runs = [MethodRun(AGENTSD, config, out, video=video, cache=cache)]
        if compare:
            runs.insert(0, MethodRun(BASELINE, None, out / BASELINE, video=video, cache=cache))
    check_stale(runs, jobs, run_record(pipe, settings, scheduler_name), settings.overwrite)
    for run in runs if settings.writes else ():
        prepare_folder(run.folder)
    compare_dir = prepare_folder(out / "compare") if compare and config is not None and settings.writes else None
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
    stale: Collection[Path] | None = None,
) -> list[MethodRun]:
    """Generate `jobs` for every method of `runs`, batch by batch, methods interleaved.

    Args:
        compare_dir: if given, side-by-side pairs of the first two runs go there, made from the
            image files as each batch finishes (one image may come from an interrupted run), and
            first for the images both runs have from earlier runs but no pair.
        warmup: run one 1-step call per method first, so no method pays first-call costs.
        stale: existing images to replace, found to be made with other settings (see
            `stale_images`); the other existing images are skipped, whatever `settings.overwrite`.
            None: every existing image is skipped, unless `settings.overwrite`.

    Under context parallelism every process makes the same calls and rank 0 alone writes
    (`settings.writes`): the others pass no `compare_dir`.
    """
    from tqdm.auto import tqdm

    runs = list(runs)
    replace = set() if stale is None else set(stale)
    pending: dict[str, set[ImageJob]] = {}
    for run in runs:
        pending[run.label] = set()
        for job in jobs:
            path = run.path(job)
            if path.exists() and (path not in replace if stale is not None else not settings.overwrite):
                run.skipped.append(path)
            else:
                pending[run.label].add(job)
    skipped = sum(len(r.skipped) for r in runs)
    if skipped:
        note = "pass --overwrite to replace them" if stale is None else "made with the same settings"
        logger.warning("skipping %s (%s)", plural(skipped, f"existing {runs[0].noun}"), note)
    todo = [job for job in jobs if any(job in pending[r.label] for r in runs)]
    if compare_dir is not None:
        waiting = set(todo)
        for job in jobs:
            if job not in waiting and not (compare_dir / runs[0].path(job).name).exists():
                _write_pair(compare_dir, runs[0], runs[1], job)
    if warmup and todo:
        for run in runs:
            call_pipeline(pipe, todo[:1], settings, run, steps=1)

    base_meta = run_record(pipe, settings, scheduler_name)
    unit = "video" if runs[0].video else "img"
    total = sum(len(v) for v in pending.values())
    bar = tqdm(total=total, desc=f"{runs[0].noun}s", unit=unit, disable=not (progress and settings.writes))
    for start in range(0, len(todo), settings.batch_size):
        batch = todo[start : start + settings.batch_size]
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
                meta = dict(image_record(base_meta, run, job), agentsd_phases=run.phases or None)
                meta["seconds"] = round(per_image, 4)
                if run.parallel:
                    meta["agentsd_context_parallel"] = run.parallel
                if run.latest_cache_calls is not None:  # of the pipeline call that made it (its whole batch)
                    meta["cache_calls"] = run.latest_cache_calls
                path = run.path(job)
                if settings.writes:
                    (save_video if run.video else save_image)(image, path, meta)
                    run.written.append(path)
                run.seconds[job] = per_image
                bar.update(1)
        if compare_dir is not None:
            for job in batch:
                _write_pair(compare_dir, runs[0], runs[1], job)
    bar.close()
    for run in runs:
        if run.config is not None and run.activity.calls and not run.activity.ran_agent_attention:
            logger.warning("no layer ran agent attention in the %s run: %s", run.label, run.activity.summary())
    return runs


def _write_pair(compare_dir: Path, left: MethodRun, right: MethodRun, job: ImageJob) -> None:
    """The side-by-side pair of `job`'s images (or videos: `video.write_video_pair`) in `left` and
    `right` (read from their files), when both exist."""
    paths = [run.path(job) for run in (left, right)]
    if not all(path.exists() for path in paths):
        return
    if left.video:
        write_video_pair(*paths, compare_dir / paths[0].name)
    else:
        with Image.open(paths[0]) as first, Image.open(paths[1]) as second:
            pair = side_by_side(first, second)
        atomic_write(compare_dir / f"{job.name}.png", lambda f: pair.save(f, format="PNG"))
