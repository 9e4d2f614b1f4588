"""The scores of `agentsd compare`, on image files: FID (torchmetrics' FrechetInceptionDistance,
Inception-v3 weights through torch-fidelity, or any feature extractor), PSNR / SSIM / LPIPS to the
baseline image of the same seed, the CLIP score; and `check_scoring`, which finds what a chosen
set of outputs lacks here (packages, weight files, a reference) before any image is generated.

Videos (MP4 files) are scored frame by frame, every decoded frame a sample: PSNR / SSIM / LPIPS to
the same frame of the baseline video, the CLIP score of each frame against the video's prompt. FVD,
the video counterpart of FID, is not computed (`FVD_NOTE`), and FID is refused for videos."""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .generation import GenerationError
from .video import read_frames

if TYPE_CHECKING:
    from .comparison import ComparisonSettings, MethodSpec

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
LPIPS_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_URL = f"https://download.pytorch.org/models/{LPIPS_FILE}"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FVD_NOTE = (
    "FVD is not computed: it needs the weights of a pretrained I3D video network, which agentsd does not download "
    "or ship; the videos are scored frame by frame"
)


class MetricsError(GenerationError):
    """A metric cannot run here: a package or a weight file is missing; says how to get it."""


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


def load_frames(path: Path) -> list[torch.Tensor]:
    """The frames of an image (one) or video file (each decoded frame) as (3, H, W) uint8 tensors."""
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        return [load_uint8(path)]
    return [torch.from_numpy(frame.copy()).permute(2, 0, 1) for frame in read_frames(path)]


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


def check_video_scoring(scoring: ComparisonSettings) -> None:
    """Refuse, for a video model, a score that cannot be given to videos: FID against
    `--reference` (over single frames it would not measure motion; FVD is not computed, `FVD_NOTE`).

    Raises:
        MetricsError: naming the option to drop.
    """
    if scoring.reference is not None:
        raise MetricsError(
            "this model makes videos: FID against --reference compares images, and its video counterpart, FVD, "
            "needs I3D weights that agentsd does not download: leave out --reference (videos are scored frame by "
            "frame: PSNR, SSIM, LPIPS, CLIP score)."
        )


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


def fidelity_to_baseline(baseline: Sequence[Path], method: Sequence[Path], lpips: bool = False) -> dict[str, Any]:
    """Mean PSNR and SSIM (and LPIPS if asked) of each image against the baseline image of the
    same prompt and seed; of videos, of each frame against the same frame of the baseline video,
    the mean over every frame of every video, and under `per_frame` each score's mean over the
    videos, frame by frame (how fidelity runs through a video)."""
    _torchmetrics()
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    scores: dict[str, list[list[float]]] = {"psnr": [], "ssim": [], "lpips": []}  # per file, per frame
    lpips_metric = _lpips_metric() if lpips else None
    for a, b in zip(baseline, method, strict=True):
        for name in scores:
            scores[name].append([])
        for x, y in zip(load_frames(a), load_frames(b), strict=True):
            x, y = x.float()[None] / 255, y.float()[None] / 255
            scores["psnr"][-1].append(float(peak_signal_noise_ratio(y, x, data_range=1.0)))
            scores["ssim"][-1].append(float(structural_similarity_index_measure(y, x, data_range=1.0)))
            if lpips_metric is not None:
                scores["lpips"][-1].append(float(lpips_metric(y * 2 - 1, x * 2 - 1)))
    scores = {name: files for name, files in scores.items() if any(files)}
    out: dict[str, Any] = {
        name: float(np.mean([s for frames in files for s in frames])) for name, files in scores.items()
    }
    if any(len(frames) > 1 for frames in scores["psnr"]):
        out["per_frame"] = {name: np.mean(files, axis=0).tolist() for name, files in scores.items()}
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
    """Mean CLIP score of images against their prompts (torchmetrics CLIPScore); of videos, of
    every frame against its video's prompt."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    _check_clip_model(model)
    metric = CLIPScore(model_name_or_path=str(model))
    images, texts = [], []
    for path, prompt in zip(paths, prompts, strict=True):
        for frame in load_frames(path):
            images.append(frame)
            texts.append(prompt)
            if len(images) == batch_size:
                metric.update(images, texts)
                images, texts = [], []
    if images:
        metric.update(images, texts)
    return float(metric.compute())
