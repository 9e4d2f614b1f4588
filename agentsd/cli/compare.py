"""Quality comparison: the published FID protocol, resumable and sharded with accelerate.

Images for the baseline and every method are generated with the same prompts and seeds into
`OUT/images/<method>/`, written as they finish. A rerun resumes: it reuses the images whose
sidecars say they were made with the same settings, and refuses images made with other settings
(unless asked to make those again), so one table never mixes two runs. Then the main process
scores them from the files on disk:

- FID against a folder of reference images or precomputed statistics (`.npz` with `mu` and
  `sigma`, as pytorch-fid writes them), through torchmetrics' `FrechetInceptionDistance`
  (Inception weights via torch-fidelity, or any feature extractor module);
- fidelity to the baseline image of the same seed: PSNR and SSIM (torchmetrics), LPIPS on
  request;
- CLIP score (torchmetrics, optional);
- seconds per image (mean over the images generated, from their sidecars) and peak memory
  per extra image in a batch, as in the paper.

A video model's videos are made as `generate` makes them (`video`) and scored frame by frame
(`metrics`): the same table per video, no FID (refused) and no FVD (noted in the results).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..api.words import plural
from .comparison import ComparisonSettings, MethodSpec, check_methods, with_baseline
from .generation import (
    GenerationError,
    GenerationSettings,
    ImageJob,
    MethodRun,
    call_pipeline,
    check_run,
    check_stale,
    generate_runs,
    prepare_folder,
    run_record,
)
from .metrics import (  # MetricsError and image_paths: part of this module's interface too
    FVD_NOTE,
    MetricsError,  # noqa: F401
    _installed,
    check_scoring,
    check_video_scoring,
    clip_score,
    fid_metric,
    fid_score,
    fidelity_to_baseline,
    image_paths,  # noqa: F401
    load_reference,
)
from .video import is_video

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "A high quality photograph of a {}."
CLASSES_FILE = Path(__file__).parents[1] / "data" / "imagenet_classes.tsv"


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet-1k class names, in class-index order."""
    lines = CLASSES_FILE.read_text().splitlines()
    return [line.split("\t")[1] for line in lines if line and not line.startswith("#")]


def imagenet_prompts(images_per_class: int = 2) -> list[str]:
    """The published protocol: "A high quality photograph of a {class}." for every class,
    `images_per_class` times each (2,000 prompts by default); image k gets seed `seed + k`."""
    return [PROMPT_TEMPLATE.format(name) for name in imagenet_classes() for _ in range(images_per_class)]


def process_state():
    """accelerate's PartialState of this process. Without CUDA it is asked for CPU processes,
    so `accelerate launch --multi_gpu --num_processes N` also shards on a CPU-only machine."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def shard_jobs(jobs: Sequence[ImageJob]) -> list[ImageJob]:
    """This process's share of `jobs` under accelerate (all of them in a single process)."""
    with process_state().split_between_processes(list(jobs)) as mine:
        return list(mine)


def report_files() -> list[str]:
    """The files `write_report` writes here: the plot only where matplotlib is installed."""
    plot = ["fid_vs_time.png"] if _installed("matplotlib") else []
    return ["results.json", "results.md", *plot, "samples.png"]


def memory_per_image(pipe: Any, run: MethodRun, settings: GenerationSettings, prompt: str) -> float | None:
    """Growth of peak memory (GB) from a batch of 1 to a batch of 2 images, 2 steps each:
    CUDA's max allocated memory; the process RSS growth on the CPU."""
    from ..bench.timing import PeakMemory

    peaks = []
    for count in (1, 2):
        jobs = [ImageJob(0, prompt, k) for k in range(count)]
        with PeakMemory(pipe.device) as memory:
            call_pipeline(pipe, jobs, settings, run, steps=2)
        peaks.append(memory.peak_mb)
    return round((peaks[1] - peaks[0]) / 1024, 4)


# ---------------------------------------------------------------- the comparison


def run_comparison(
    pipe: Any,
    prompts: Sequence[str],
    methods: Sequence[MethodSpec],
    out_dir: str | Path,
    settings: GenerationSettings,
    scoring: ComparisonSettings | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Generate (this process's shard of) every method's images, then score on the main process;
    under context parallelism (`settings.context_parallel`) every process works on every image.

    Images already in `OUT/images` are reused when their sidecars say they were made with these
    settings (model, scheduler and its config, steps, guidance, size, batch size, device, dtype,
    prompt, seed, method and its config; a video's frames and fps: `output.SETTING_KEYS`). Images
    made with other settings raise `GenerationError` naming the settings that differ, before any
    work, unless `settings.overwrite`, which makes those images again. A video model's videos are
    scored frame by frame; FID is refused for them (`metrics.check_video_scoring`).

    Returns:
        The results (also written to `OUT/results.json`, `results.md`, `fid_vs_time.png`,
        `samples.png`) on the main process; None on the others.
    """
    scoring = scoring or ComparisonSettings()
    methods = with_baseline(methods)
    video = is_video(pipe)
    if video:
        check_video_scoring(scoring)
    state = process_state()
    if state.is_main_process:  # the main process alone scores
        for skipped in check_scoring(methods, scoring, pipe.device):
            logger.warning("%s will be skipped", skipped)
    jobs = [ImageJob(i, prompt, seed + i) for i, prompt in enumerate(prompts)]
    check_methods(pipe, methods)
    check_run(pipe, jobs, settings)
    out = Path(out_dir)
    runs = [m.run(out / "images" / m.folder_name, video=video) for m in methods]
    record = run_record(pipe, settings)
    stale = check_stale(runs, jobs, record, settings.overwrite)
    if settings.writes:
        prepare_folder(out)
    metric = None
    if scoring.reference is not None and state.is_main_process:
        # Built before generating: a missing package, weight file or reference fails now, not hours later.
        metric = fid_metric(scoring.feature_extractor, scoring.inception_weights)
        load_reference(metric, scoring.reference)
    for run in runs if settings.writes else ():
        prepare_folder(run.folder)
    # Under context parallelism every process works on every image (and rank 0 alone writes); else
    # each makes its share of the images.
    mine = jobs if settings.context_parallel else shard_jobs(jobs)
    generate_runs(pipe, mine, runs, settings, progress=progress and state.is_main_process, stale=stale)
    memory = {}
    if scoring.measure_memory and (state.is_main_process or settings.context_parallel):  # the same calls on every rank
        memory = {m.name: memory_per_image(pipe, r, settings, prompts[0]) for m, r in zip(methods, runs, strict=True)}
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    results = score(out, methods, jobs, scoring, memory, metric, suffix=".mp4" if video else ".png")
    results["settings"] = dict(record, seed=seed)  # what every image was made with (checked above)
    if video:
        results.update(frames=record["frames"], fvd=FVD_NOTE)
    results["activity"] = {r.label: r.activity.summary() for r in runs if r.config is not None and r.activity.calls}
    if settings.context_parallel:  # what agentsd did with the shards, from `status`
        results["context_parallel"] = {r.label: r.parallel for r in runs if r.parallel}
    write_report(results, out, scoring.samples)
    return results


def score(
    out: Path,
    methods: Sequence[MethodSpec],
    jobs: Sequence[ImageJob],
    scoring: ComparisonSettings,
    memory: dict[str, float | None],
    metric=None,
    suffix: str = ".png",
) -> dict[str, Any]:
    """Every metric of every method, from the image files and sidecars under `out/images`.

    Args:
        metric: a FID metric holding the reference statistics (see `fid_metric` and
            `load_reference`); None skips FID.
        suffix: the files' (`.mp4`: videos, scored frame by frame).
    """
    folders = {m.name: out / "images" / m.folder_name for m in methods}
    paths = {name: [folder / f"{j.name}{suffix}" for j in jobs] for name, folder in folders.items()}
    missing = [str(p) for ps in paths.values() for p in ps if not p.exists()]
    if missing:
        one = len(missing) == 1
        raise GenerationError(
            f"{plural(len(missing), 'image')} {'is' if one else 'are'} missing (e.g. {missing[0]}): rerun to generate "
            f"{'it' if one else 'them'}."
        )
    rows = []
    for method in methods:
        sidecars = [json.loads(p.with_suffix(".json").read_text()) for p in paths[method.name]]
        row: dict[str, Any] = dict(
            method=method.name,
            ratio=method.ratio,
            images=len(paths[method.name]),
            seconds_per_image=round(float(np.mean([s["seconds"] for s in sidecars])), 4),
            gb_per_image=memory.get(method.name),
            fid=None if metric is None else fid_score(metric, paths[method.name]),
            agentsd_config=None if method.config is None else method.config.to_dict(),
            cache=None if method.cache is None else method.cache.label,
            skip_fraction=_skip_fraction(sidecars) if method.cache is not None else None,
        )
        if method.name != "baseline":
            row.update(fidelity_to_baseline(paths["baseline"], paths[method.name], scoring.lpips))
        if scoring.clip_model is not None:
            row["clip_score"] = clip_score(paths[method.name], [j.prompt for j in jobs], scoring.clip_model)
        rows.append(row)
    base = rows[0]["seconds_per_image"]
    for row in rows:
        row["speedup"] = round(base / row["seconds_per_image"], 4) if row["seconds_per_image"] else None
    return dict(rows=rows, prompts=len(jobs), reference=None if scoring.reference is None else str(scoring.reference))


def _skip_fraction(sidecars: Sequence[dict[str, Any]]) -> float | None:
    """The fraction of the model calls a step cache skipped, over the pipeline calls that made the
    images (their sidecars' `cache_calls`; a batch's call is counted once per image it made)."""
    counts = [sidecar["cache_calls"] for sidecar in sidecars if sidecar.get("cache_calls")]
    calls = sum(count["computed"] + count["skipped"] for count in counts)
    return round(sum(count["skipped"] for count in counts) / calls, 4) if calls else None


def markdown_report(results: dict[str, Any]) -> str:
    """The paper's table layout: method, r, FID, s/image, GB/image, plus the fidelity columns (of
    videos: per video, the fidelity and CLIP columns frame by frame, and why FVD is missing)."""
    unit = "video" if "frames" in results else "image"
    columns = [("method", "method"), ("ratio", "r"), ("fid", "FID"), ("seconds_per_image", f"s/{unit}"),
               ("speedup", "speedup"), ("skip_fraction", "skipped"), ("gb_per_image", f"GB/{unit}"),
               ("psnr", "PSNR"), ("ssim", "SSIM"), ("lpips", "LPIPS"), ("clip_score", "CLIP")]  # fmt: skip
    present = [(k, t) for k, t in columns if any(row.get(k) is not None for row in results["rows"])]
    lines = ["| " + " | ".join(t for _, t in present) + " |", "|" + "---|" * len(present)]
    for row in results["rows"]:
        cells = []
        for key, _ in present:
            value = row.get(key)
            cells.append("" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    head = f"{plural(results['prompts'], 'prompt')}; FID reference: {results['reference']}"
    if unit == "video":
        head = f"{plural(results['prompts'], 'prompt')}, one video each of {results['frames']} frames; {results['fvd']}"
    return head + "\n\n" + "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out: Path, samples: int = 8) -> None:
    """results.json, results.md, fid_vs_time.png (where matplotlib is installed) and samples.png
    into `out`."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_report(results))
    if "fid_vs_time.png" in report_files():
        _plot(results, out / "fid_vs_time.png")
    else:
        logger.warning("fid_vs_time.png skipped: pip install matplotlib")
    _samples_grid(results, out, samples)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    metric = "fid" if any(r["fid"] is not None for r in results["rows"]) else "psnr"
    for row in results["rows"]:
        if row.get(metric) is not None:
            ax.scatter(row["seconds_per_image"], row[metric], s=40)
            ax.annotate(row["method"], (row["seconds_per_image"], row[metric]), fontsize=7)
    ax.set(xlabel="seconds per image", ylabel=metric.upper(), title=f"{metric.upper()} vs time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _samples_grid(results: dict[str, Any], out: Path, samples: int, thumb: int = 256) -> None:
    """Rows: the first `samples` prompts; columns: the methods, in order. Videos: their contact
    sheets, `thumb` high, as wide as their shape says."""
    methods = [r["method"] for r in results["rows"]]
    folders = {m: out / "images" / MethodSpec(m).folder_name for m in methods}
    names = sorted(p.name for p in folders[methods[0]].glob("*.png"))[:samples]
    width = thumb
    if "frames" in results and names:
        with Image.open(folders[methods[0]] / names[0]) as sheet:
            width = max(1, round(thumb * sheet.width / sheet.height))
    grid = Image.new("RGB", (width * len(methods), thumb * len(names)), "white")
    for i, name in enumerate(names):
        for j, method in enumerate(methods):
            with Image.open(folders[method] / name) as image:
                grid.paste(image.convert("RGB").resize((width, thumb)), (j * width, i * thumb))
    grid.save(out / "samples.png")
