"""The pipeline scenarios: the paper's table columns for a whole generation on this device.

Seconds per image and GB per extra image of a full 50-step DDIM SD 1.5 generation (text
encoder, UNet with classifier-free guidance, VAE decode) at 512 px (`pipeline-512`; and
`pipeline-1024`, not in the default order), for the
baseline, ToMe for SD at r = 0.5 and agentsd (the paper preset) at r = 0.1, 0.4 and 0.5,
next to the paper's RTX 4090 figures. The pipeline is a real `StableDiffusionPipeline`
built from the published SD 1.5 component configs with random weights (nothing is
downloaded; speed does not depend on the weights) and a byte-level stand-in tokenizer
(tokenizing costs nothing next to the rest). The generation and the memory measurement are
`agentsd compare`'s own: `generate_runs` (methods interleaved, a warm-up call each, CUDA
synchronized around every call) and `memory_per_image` (peak-memory growth from a batch of
1 to a batch of 2).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..bench.benchmark import ARCHITECTURES
from ..cli.compare import imagenet_prompts, memory_per_image
from ..cli.comparison import MethodSpec, parse_method
from ..cli.generation import GenerationError, GenerationSettings, ImageJob, generate_runs, prepare_folder
from .common import Outcome, PartContext, markdown_rows, stamp_rows, write_part

logger = logging.getLogger(__name__)

# The published configs of SD 1.5's other components (its vae/ and text_encoder/ folders;
# the text encoder is CLIP ViT-L/14's) and its scheduler, here DDIM.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
CLIP_VIT_L14_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
METHODS = ("baseline", "tomesd:0.5", "paper:ratio=0.1", "paper:ratio=0.4", "paper:ratio=0.5")
# The paper's table (SD 1.5, 512 px, 50 PLMS steps, RTX 4090): seconds and GB per image.
PAPER_RTX4090 = {
    "baseline": (2.62, 3.13),
    "tomesd:0.5": (1.53, 1.47),
    "paper:ratio=0.1": (1.97, 1.77),
    "paper:ratio=0.4": (1.54, 1.55),
    "paper:ratio=0.5": (1.42, 1.21),
}
PAPER_SIZE = 512
FIELDS = ("arch", "size", "steps", "scheduler", "dtype", "method", "ratio", "images", "seconds_per_image", "speedup",
          "gb_per_image", "paper_seconds_per_image", "paper_speedup", "paper_gb_per_image")  # fmt: skip


@dataclass(frozen=True)
class PipelinePlan:
    """One image size: `images` images per method, `steps` denoising steps each."""

    size: int
    images: int
    steps: int = 50


# By the image side of the scenario.
PLANS = {512: PipelinePlan(512, 5), 1024: PipelinePlan(1024, 3)}
# The tiny pipeline's VAE downsamples 4x: 64 px is a 16x16 latent (256 tokens).
TINY_PLANS = {512: PipelinePlan(64, 1, steps=3), 1024: PipelinePlan(96, 1, steps=3)}


def plan(size: int, tiny: bool) -> PipelinePlan:
    """The plan of the scenario at `size` px (its tiny stand-in in --tiny mode)."""
    return (TINY_PLANS if tiny else PLANS)[size]


def sd15_pipeline(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A `StableDiffusionPipeline` with SD 1.5's published architecture and random weights,
    built on `device`.

    Args:
        device, dtype: where the pipeline lives and its dtype.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..testing import tiny_tokenizer

    with torch.device(device):  # the weights are drawn there (fast on a GPU)
        models = dict(
            vae=AutoencoderKL(**SD_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT)),
            unet=UNet2DConditionModel(**ARCHITECTURES["sd15"]),
        )
    pipe = StableDiffusionPipeline(
        **models,
        tokenizer=tiny_tokenizer(),
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(dtype=dtype)


def method_specs(names: tuple[str, ...] = METHODS) -> list[MethodSpec]:
    """The methods that can run here (tomesd is left out when it is not installed)."""
    specs = []
    for name in names:
        try:
            specs.append(parse_method(name))
        except GenerationError as err:
            logger.warning("left out %s: %s", name, err)
    return specs


def run_plan(pipe: Any, plan: PipelinePlan, specs: list[MethodSpec], workdir: Path) -> list[dict[str, Any]]:
    """Seconds per image (mean over `plan.images`) and GB per extra image of every method at
    one size; the images go to `workdir` (they are not kept)."""
    settings = GenerationSettings(model="sd15 (random weights)", width=plan.size, height=plan.size, steps=plan.steps)
    prompts = imagenet_prompts(1)[: plan.images]
    jobs = [ImageJob(i, prompt, i) for i, prompt in enumerate(prompts)]
    runs = [spec.run(prepare_folder(workdir / f"{plan.size}" / spec.folder_name)) for spec in specs]
    generate_runs(pipe, jobs, runs, settings, progress=False, warmup=True)
    rows = []
    for spec, method_run in zip(specs, runs, strict=True):
        paper = PAPER_RTX4090.get(spec.name) if plan.size == PAPER_SIZE else None
        rows.append(dict(
            arch="sd15", size=plan.size, steps=plan.steps, scheduler=type(pipe.scheduler).__name__,
            dtype=str(pipe.unet.dtype).replace("torch.", ""), method=spec.name, ratio=spec.ratio,
            images=len(method_run.seconds), seconds_per_image=round(method_run.seconds_per_image, 4),
            gb_per_image=memory_per_image(pipe, method_run, settings, prompts[0]),
            paper_seconds_per_image=paper[0] if paper else None, paper_gb_per_image=paper[1] if paper else None,
        ))  # fmt: skip
    base = next(r for r in rows if r["method"] == "baseline")
    for row in rows:
        row["speedup"] = round(base["seconds_per_image"] / row["seconds_per_image"], 4)
        paper_seconds = row["paper_seconds_per_image"]
        row["paper_speedup"] = round(PAPER_RTX4090["baseline"][0] / paper_seconds, 4) if paper_seconds else None
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Seconds and GB per image by method, one bar per size, the paper's RTX 4090 beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups: dict[str, dict[str, tuple[float | None, float | None]]] = {}
    for r in rows:
        groups.setdefault(f"{r['size']} px", {})[r["method"]] = (r["seconds_per_image"], r["gb_per_image"])
    groups[f"paper, RTX 4090, {PAPER_SIZE} px"] = PAPER_RTX4090
    width = 0.8 / len(groups)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, (ax, label) in enumerate(zip(axes, ("s/image", "GB/image"), strict=True)):
        for i, (name, values) in enumerate(groups.items()):
            bars = [(j + i * width, values[m][k]) for j, m in enumerate(methods) if values.get(m, (None,) * 2)[k]]
            ax.bar([x for x, _ in bars], [y for _, y in bars], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods, rotation=20, fontsize=7)
        ax.set(ylabel=label, title=f"{label}, whole generation")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_size(size: int, context: PartContext) -> Outcome:
    """Build the pipeline, time every method at one size, add the rows to the part's and
    rewrite its files."""
    from ..testing import tiny_pipeline

    start = time.perf_counter()
    if context.tiny:
        pipe = tiny_pipeline("sd15").to(context.device, context.dtype)
    else:
        pipe = sd15_pipeline(context.device, context.dtype)
    build_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    rows = context.rows.setdefault("pipeline", [])
    with tempfile.TemporaryDirectory() as workdir:
        new = stamp_rows(run_plan(pipe, plan(size, context.tiny), method_specs(), Path(workdir)), context.device)
    rows += new
    folder = context.folder("pipeline")
    write_part(folder, rows, FIELDS, markdown_rows(rows, FIELDS), context.command, dict(paper=PAPER_RTX4090))
    plot(rows, folder / "pipeline.png")
    timed = ", ".join(f"{r['method']} {r['seconds_per_image']:.2f}" for r in new)
    headline = f"s/image, {new[0]['steps']} steps at {new[0]['size']} px: {timed}"
    return Outcome(headline=headline, measured={"build:pipeline": build_s})
