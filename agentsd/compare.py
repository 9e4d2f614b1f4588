"""Quality comparison: the published FID protocol, resumable and sharded with accelerate.

Images for the baseline and every method are generated with the same prompts and seeds into
`OUT/images/<method>/` (written as they finish, skipped when present, so a rerun resumes),
then scored from the files on disk by the main process:

- FID against a folder of reference images or precomputed statistics (`.npz` with `mu` and
  `sigma`, as pytorch-fid writes them), through torchmetrics' `FrechetInceptionDistance`
  (Inception weights via torch-fidelity, or any feature extractor module);
- fidelity to the baseline image of the same seed: PSNR and SSIM (torchmetrics), LPIPS on
  request;
- CLIP score (torchmetrics, optional);
- seconds per image (mean over the images generated, from their sidecars) and peak memory
  per extra image in a batch, as in the paper.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from .config import AgentSDConfig
from .generation import (
    GenerationError,
    GenerationSettings,
    ImageJob,
    MethodRun,
    call_pipeline,
    generate_runs,
    prepare_folder,
)
from .presets import load_preset

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "A high quality photograph of a {}."
CLASSES_FILE = Path(__file__).parent / "data" / "imagenet_classes.tsv"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
LPIPS_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_URL = f"https://download.pytorch.org/models/{LPIPS_FILE}"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class MetricsError(GenerationError):
    """A metric cannot run here: a package or a weight file is missing; says how to get it."""


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet-1k class names, in class-index order."""
    lines = CLASSES_FILE.read_text().splitlines()
    return [line.split("\t")[1] for line in lines if line and not line.startswith("#")]


def imagenet_prompts(images_per_class: int = 2) -> list[str]:
    """The published protocol: "A high quality photograph of a {class}." for every class,
    `images_per_class` times each (2,000 prompts by default); image k gets seed `seed + k`."""
    return [PROMPT_TEMPLATE.format(name) for name in imagenet_classes() for _ in range(images_per_class)]


@dataclass(frozen=True)
class MethodSpec:
    """A method to compare: the baseline, an agentsd config, or ToMe for SD at a ratio."""

    name: str
    config: AgentSDConfig | None = None
    tomesd_ratio: float | None = None

    @property
    def ratio(self) -> float:
        if self.tomesd_ratio is not None:
            return self.tomesd_ratio
        return 0.0 if self.config is None else self.config.ratio

    @property
    def folder_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.name)

    def run(self, folder: Path) -> MethodRun:
        context = None
        if self.tomesd_ratio is not None:
            ratio = self.tomesd_ratio
            context = lambda pipe: _tomesd_patched(pipe, ratio)  # noqa: E731
        return MethodRun(self.name, self.config, folder, context=context)


@contextmanager
def _tomesd_patched(pipe: Any, ratio: float) -> Iterator[None]:
    import tomesd

    tomesd.apply_patch(pipe, ratio=ratio)
    try:
        yield
    finally:
        tomesd.remove_patch(pipe)


def parse_method(spec: str) -> MethodSpec:
    """`baseline`, `tomesd:RATIO`, or a preset name / YAML path with optional overrides:
    `paper`, `paper:ratio=0.5,agent_ratio=0.9`, `agentsd:ratio=0.5` (defaults + overrides)."""
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


def with_baseline(methods: Sequence[MethodSpec]) -> list[MethodSpec]:
    """`methods` with the baseline first unless already there; refuses repeated methods."""
    methods = list(methods)
    if not any(m.name == "baseline" for m in methods):
        methods.insert(0, MethodSpec("baseline"))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise GenerationError(f"methods must be distinct, got {', '.join(names)}: give each --method once.")
    return methods


def process_state():
    """accelerate's PartialState of this process. Without CUDA it is asked for CPU processes,
    so `accelerate launch --multi_gpu --num_processes N` also shards on a CPU-only machine."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def shard_jobs(jobs: Sequence[ImageJob]) -> list[ImageJob]:
    """This process's share of `jobs` under accelerate (all of them in a single process)."""
    with process_state().split_between_processes(list(jobs)) as mine:
        return list(mine)


# ---------------------------------------------------------------- images on disk


def image_paths(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def load_uint8(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as a (3, H, W) uint8 tensor, resized (bicubic) to `size` = (W, H) if given."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if size is not None and image.size != size:
            image = image.resize(size, Image.BICUBIC)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _batches(paths: Sequence[Path], batch_size: int, size: tuple[int, int] | None) -> Iterator[torch.Tensor]:
    for start in range(0, len(paths), batch_size):
        yield torch.stack([load_uint8(p, size) for p in paths[start : start + batch_size]])


# ---------------------------------------------------------------- metrics


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def inception_weights_path(given: str | Path | None) -> str | None:
    """The Inception weight file to use, failing at once (not on a hung download) when it is
    neither given, nor cached by torch-fidelity, nor downloadable."""
    if given is not None:
        if not Path(given).is_file():
            raise MetricsError(f"Inception weights {str(given)!r} not found: pass the path of {INCEPTION_FILE}.")
        return str(given)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file() or _reachable("github.com"):
        return None  # torch-fidelity finds or downloads it
    raise MetricsError(
        f"FID needs the Inception weights {INCEPTION_FILE}, which are not cached and cannot be downloaded "
        f"here: fetch {INCEPTION_URL} elsewhere and pass --inception-weights PATH (or put it in {cached.parent})."
    )


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_scoring(
    methods: Sequence[MethodSpec], scoring: ComparisonSettings, device: torch.device | str | None = None
) -> list[str]:
    """Fail now, before any image is generated, if an output the settings ask for cannot be made
    here: a missing package, weight file or reference.

    Args:
        device: where the images are generated; on the CPU, GB per image needs psutil
            (None: assume the CPU).

    Returns:
        The outputs that will be skipped, each with the reason and the fix: without matplotlib
        the `fid_vs_time.png` plot is skipped, while the table and json are still written.

    Raises:
        MetricsError: names what is missing and how to get it (or which option to drop).
    """
    if any(m.name != "baseline" for m in methods) or scoring.reference is not None or scoring.clip_model:
        _torchmetrics()  # PSNR and SSIM to the baseline, FID, CLIP score
    if scoring.reference is not None:
        if not Path(scoring.reference).exists():
            raise MetricsError(
                f"FID reference {str(scoring.reference)!r} does not exist: pass a folder of images or a .npz "
                "of mu and sigma."
            )
        if scoring.feature_extractor is None:
            missing = [name for name in ("torch_fidelity", "torchvision") if not _installed(name)]
            if missing:
                raise MetricsError(
                    f"FID with Inception-v3 needs torch-fidelity and torchvision ({', '.join(missing)} not "
                    "installed): pip install 'agentsd[metrics]', or leave out the FID reference."
                )
            inception_weights_path(scoring.inception_weights)
    if scoring.lpips:
        if not _installed("torchvision"):
            raise MetricsError(
                "LPIPS needs torchvision, which is not installed: pip install torchvision (the build that matches "
                "your torch), or drop --lpips."
            )
        cached = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_FILE
        if not cached.is_file() and not _reachable("download.pytorch.org"):
            raise MetricsError(
                f"LPIPS needs the AlexNet weights {LPIPS_FILE}, which are not cached and cannot be downloaded "
                f"here: fetch {LPIPS_URL} elsewhere and put it in {cached.parent}, or drop --lpips."
            )
    if scoring.clip_model is not None:
        _check_clip_model(scoring.clip_model)
    on_cpu = device is None or torch.device(device).type != "cuda"
    if scoring.measure_memory and on_cpu and not _installed("psutil"):
        raise MetricsError("GB per image on the CPU needs psutil: pip install psutil, or pass --no-memory.")
    if not _installed("matplotlib"):
        return ["fid_vs_time.png (needs matplotlib: pip install matplotlib)"]
    return []


def report_files() -> list[str]:
    """The files `write_report` writes here: the plot only where matplotlib is installed."""
    plot = ["fid_vs_time.png"] if _installed("matplotlib") else []
    return ["results.json", "results.md", *plot, "samples.png"]


def _torchmetrics():
    try:
        import torchmetrics
    except ModuleNotFoundError:
        raise MetricsError("the comparison metrics need torchmetrics: pip install 'agentsd[metrics]'.") from None
    return torchmetrics


def fid_metric(feature_extractor: torch.nn.Module | None = None, inception_weights: str | Path | None = None):
    """A torchmetrics FrechetInceptionDistance on uint8 images, with Inception-v3 (2048
    features) unless another feature extractor module is given."""
    _torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature_extractor is not None:
        return FrechetInceptionDistance(feature=feature_extractor, reset_real_features=False)
    weights = inception_weights_path(inception_weights)
    try:
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights, reset_real_features=False)
    except ModuleNotFoundError as err:
        raise MetricsError(f"FID with Inception needs torch-fidelity (and torchvision): {err}") from None


def load_reference(metric, reference: str | Path, batch_size: int = 32) -> int:
    """Fill the metric's real-image statistics from a folder of images or a `.npz` of
    `mu` and `sigma` (pytorch-fid's format); returns the number of reference images."""
    reference = Path(reference)
    if reference.suffix == ".npz":
        stats = np.load(reference)
        mu, sigma = torch.from_numpy(stats["mu"]).double(), torch.from_numpy(stats["sigma"]).double()
        if mu.shape[0] != metric.real_features_sum.shape[0]:
            raise MetricsError(
                f"{reference} holds {mu.shape[0]}-dim statistics; this feature extractor gives "
                f"{metric.real_features_sum.shape[0]}."
            )
        count = int(stats["num_samples"]) if "num_samples" in stats else 2
        # The metric keeps sums; these give back exactly mu and sigma in its compute().
        metric.real_features_sum = mu * count
        metric.real_features_cov_sum = sigma * (count - 1) + count * torch.outer(mu, mu)
        metric.real_features_num_samples = torch.tensor(count)
        return count
    paths = image_paths(reference)
    if len(paths) < 2:
        raise MetricsError(f"reference {str(reference)!r} must be a folder with 2+ images or a .npz of mu and sigma.")
    for batch in _grouped_by_size(paths, batch_size):
        metric.update(batch, real=True)
    return len(paths)


def _grouped_by_size(paths: Sequence[Path], batch_size: int) -> Iterator[torch.Tensor]:
    groups: dict[tuple[int, int], list[Path]] = {}
    for path in paths:
        with Image.open(path) as image:
            groups.setdefault(image.size, []).append(path)
    for same_size in groups.values():
        yield from _batches(same_size, batch_size, None)


def fid_score(metric, paths: Sequence[Path], batch_size: int = 32) -> float:
    """FID of `paths` against the reference already loaded into `metric` (which keeps it)."""
    metric.reset()
    for batch in _grouped_by_size(paths, batch_size):
        metric.update(batch, real=False)
    return float(metric.compute())


def fidelity_to_baseline(baseline: Sequence[Path], method: Sequence[Path], lpips: bool = False) -> dict[str, float]:
    """Mean PSNR and SSIM (and LPIPS if asked) of each image against the baseline image of the
    same prompt and seed."""
    _torchmetrics()
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnr, ssim, perceptual = [], [], []
    lpips_metric = _lpips_metric() if lpips else None
    for a, b in zip(baseline, method, strict=True):
        x, y = load_uint8(a).float()[None] / 255, load_uint8(b).float()[None] / 255
        psnr.append(float(peak_signal_noise_ratio(y, x, data_range=1.0)))
        ssim.append(float(structural_similarity_index_measure(y, x, data_range=1.0)))
        if lpips_metric is not None:
            perceptual.append(float(lpips_metric(y * 2 - 1, x * 2 - 1)))
    out = {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim))}
    if perceptual:
        out["lpips"] = float(np.mean(perceptual))
    return out


def _lpips_metric():
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type="alex")
    except (ModuleNotFoundError, OSError, RuntimeError) as err:
        raise MetricsError(
            f"LPIPS needs torchvision and the AlexNet weights ({LPIPS_FILE} in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}): {err}"
        ) from None


def _check_clip_model(model: str | Path) -> None:
    if not Path(model).is_dir() and not _reachable("huggingface.co"):
        raise MetricsError(f"CLIP model {str(model)!r} is not a local folder and the hub is unreachable: "
                           "pass --clip-model with a folder saved by CLIPModel.save_pretrained.")  # fmt: skip


def clip_score(paths: Sequence[Path], prompts: Sequence[str], model: str | Path, batch_size: int = 16) -> float:
    """Mean CLIP score of images against their prompts (torchmetrics CLIPScore)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    _check_clip_model(model)
    metric = CLIPScore(model_name_or_path=str(model))
    for start in range(0, len(paths), batch_size):
        images = [load_uint8(p) for p in paths[start : start + batch_size]]
        metric.update(images, list(prompts[start : start + batch_size]))
    return float(metric.compute())


def memory_per_image(pipe: Any, run: MethodRun, settings: GenerationSettings, prompt: str) -> float | None:
    """Growth of peak memory (GB) from a batch of 1 to a batch of 2 images, 2 steps each:
    CUDA's max allocated memory; the process RSS growth on the CPU."""
    from .benchmark import PeakMemory

    peaks = []
    for count in (1, 2):
        jobs = [ImageJob(0, prompt, k) for k in range(count)]
        with PeakMemory(pipe.device) as memory:
            call_pipeline(pipe, jobs, settings, run, steps=2)
        peaks.append(memory.peak_mb)
    return round((peaks[1] - peaks[0]) / 1024, 4)


# ---------------------------------------------------------------- the comparison


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
    """Generate (this process's shard of) every method's images, then score on the main process.

    Returns:
        The results (also written to `OUT/results.json`, `results.md`, `fid_vs_time.png`,
        `samples.png`) on the main process; None on the others.
    """
    scoring = scoring or ComparisonSettings()
    methods = with_baseline(methods)
    state = process_state()
    if state.is_main_process:  # the main process alone scores
        for skipped in check_scoring(methods, scoring, pipe.device):
            logger.warning("%s will be skipped", skipped)
    out = prepare_folder(Path(out_dir))
    metric = None
    if scoring.reference is not None and state.is_main_process:
        # Built before generating: a missing package, weight file or reference fails now, not hours later.
        metric = fid_metric(scoring.feature_extractor, scoring.inception_weights)
        load_reference(metric, scoring.reference)
    jobs = [ImageJob(i, prompt, seed + i) for i, prompt in enumerate(prompts)]
    runs = [m.run(prepare_folder(out / "images" / m.folder_name)) for m in methods]
    generate_runs(pipe, shard_jobs(jobs), runs, settings, progress=progress and state.is_main_process)
    memory = {}
    if scoring.measure_memory and state.is_main_process:
        memory = {m.name: memory_per_image(pipe, r, settings, prompts[0]) for m, r in zip(methods, runs, strict=True)}
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    results = score(out, methods, jobs, scoring, memory, metric)
    results["activity"] = {r.label: r.activity.summary() for r in runs if r.config is not None and r.activity.calls}
    write_report(results, out, scoring.samples)
    return results


def score(
    out: Path,
    methods: Sequence[MethodSpec],
    jobs: Sequence[ImageJob],
    scoring: ComparisonSettings,
    memory: dict[str, float | None],
    metric=None,
) -> dict[str, Any]:
    """Every metric of every method, from the image files and sidecars under `out/images`.

    Args:
        metric: a FID metric holding the reference statistics (see `fid_metric` and
            `load_reference`); None skips FID.
    """
    folders = {m.name: out / "images" / m.folder_name for m in methods}
    paths = {name: [folder / f"{j.name}.png" for j in jobs] for name, folder in folders.items()}
    missing = [str(p) for ps in paths.values() for p in ps if not p.exists()]
    if missing:
        raise GenerationError(f"{len(missing)} images are missing (e.g. {missing[0]}): rerun to generate them.")
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


def markdown_report(results: dict[str, Any]) -> str:
    """The paper's table layout: method, r, FID, s/image, GB/image, plus the fidelity columns."""
    columns = [("method", "method"), ("ratio", "r"), ("fid", "FID"), ("seconds_per_image", "s/image"),
               ("speedup", "speedup"), ("gb_per_image", "GB/image"), ("psnr", "PSNR"), ("ssim", "SSIM"),
               ("lpips", "LPIPS"), ("clip_score", "CLIP")]  # fmt: skip
    present = [(k, t) for k, t in columns if any(row.get(k) is not None for row in results["rows"])]
    lines = ["| " + " | ".join(t for _, t in present) + " |", "|" + "---|" * len(present)]
    for row in results["rows"]:
        cells = []
        for key, _ in present:
            value = row.get(key)
            cells.append("" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return f"{results['prompts']} prompts; FID reference: {results['reference']}\n\n" + "\n".join(lines) + "\n"


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
    """Rows: the first `samples` prompts; columns: the methods, in order."""
    methods = [r["method"] for r in results["rows"]]
    folders = {m: out / "images" / MethodSpec(m).folder_name for m in methods}
    names = sorted(p.name for p in folders[methods[0]].glob("*.png"))[:samples]
    grid = Image.new("RGB", (thumb * len(methods), thumb * len(names)), "white")
    for i, name in enumerate(names):
        for j, method in enumerate(methods):
            with Image.open(folders[method] / name) as image:
                grid.paste(image.convert("RGB").resize((thumb, thumb)), (j * thumb, i * thumb))
    grid.save(out / "samples.png")
