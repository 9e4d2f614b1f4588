"""The diffusion transformers `agentsd bench` builds: SD 3.5 Medium and Large, PixArt-Sigma,
Flux.1-dev, and the Wan video transformers (Wan 2.1 1.3B and 14B, Wan 2.2 5B: their configs,
sizes and inputs in `wan_models.py`).

Each is built from its published diffusers config (the hub repository's
`transformer/config.json`) with random weights, and called as its pipeline calls it in one
denoising step: the latent, the timestep (one per sample), and text embeddings of the
published lengths (SD 3 / 3.5: 77 CLIP + 256 T5 tokens of width 4096 and a pooled 2048;
PixArt-Sigma: 300 T5 tokens of width 4096 with their attention mask; Flux.1-dev: 512 T5 tokens
of width 4096, a pooled CLIP 768, the image and text position ids and the guidance scale). SD 3
and PixArt run a classifier-free-guidance batch (2 per image); Flux.1-dev is guidance-distilled
(the scale is an input, `guidance`): its pipeline runs one sample per image.

`blocks=K` builds the first K transformer blocks of the model at its real widths (the large
models do not fit a 24 GB machine in fp32): the step then measures speed per block, not the
whole model's (embeddings and the output layer weigh more in it). The blocks are the published
model's first K as they are there: SD 3.5 Medium's dual-attention blocks are its first 13,
so the first min(K, 13) are dual, and every truncated SD 3 block keeps its text stream (only
the model's last block drops it, `context_pre_only`). Flux.1-dev has two kinds of blocks, 19
double-stream then 38 single-stream: K is counted in double-stream blocks and each brings the
model's share of single-stream ones, so `blocks=K` builds the first K double-stream and the
first 2K single-stream blocks (the model's 1 : 2 mix; K = 19 is the whole model), named
`K+2K blocks` in the rows.

The tiny stand-ins (`tiny-sd35`, `tiny-pixart`, `tiny-flux`, `tiny-wan`, `tiny-wan22`) are the
same configs at toy widths, for tests. The diffusers classes are looked up when a model is built: this module
imports on a diffusers without SD 3, PixArt or Flux.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import wan_models

# SD 3 / 3.5 pipelines: the CLIP-L and CLIP-G embeddings (77 tokens, zero-padded from 2048 to
# T5's 4096 channels) followed by T5's 256 (`max_sequence_length` default); pooled: 768 + 1280.
SD3_TEXT_TOKENS = 77 + 256
# PixArt-Sigma's pipeline pads every prompt to `max_sequence_length=300` T5 tokens.
PIXART_TEXT_TOKENS = 300
# FluxPipeline (FLUX.1-dev): `max_sequence_length=512` T5 tokens; `guidance_scale=3.5`, passed to
# the guidance-distilled transformer as `guidance`, one value per sample.
FLUX_TEXT_TOKENS = 512
FLUX_GUIDANCE = 3.5
# Any timestep: the benchmark's agentsd methods fix their phase (`agent_steps` 1 or 0). Flux
# pipelines pass it as t / 1000 (sigma), which the transformer and agentsd multiply by 1000.
BENCH_TIMESTEP = 500


@dataclass(frozen=True)
class Transformer:
    """A diffusion transformer the benchmark builds.

    Args:
        model_class: the diffusers class name.
        family: agentsd's family of it (`agentsd.families`): `sd3`, `pixart`, `flux` or `wan`.
        config: the class's keyword arguments (the published config).
        text_tokens: the encoder tokens its pipeline passes per prompt.
        singles_per_block: Flux: the single-stream blocks each of the first K double-stream
            blocks brings to a model cut at K (`num_single_layers / num_layers`); 0: one kind of block.
    """

    model_class: str
    family: str
    config: dict[str, Any] = field(default_factory=dict)
    text_tokens: int = 0
    singles_per_block: int = 0

    @property
    def video(self) -> bool:
        """Whether it makes videos (sizes `HxW` and a frame count, `wan_models`)."""
        return self.family == "wan"

    @property
    def depth(self) -> int:
        """The K of the whole model: its blocks (Flux: its double-stream blocks)."""
        return self.config["num_layers"]

    def depth_label(self, blocks: int) -> str:
        """The depth as rows name it: `2 blocks`; Flux: `2+4 blocks` (double + single stream)."""
        if self.singles_per_block:
            return f"{blocks}+{self.singles_per_block * blocks} blocks"
        return f"{blocks} block{'s' if blocks > 1 else ''}"

    def depth_unit(self) -> str:
        """What K counts, for messages."""
        if self.singles_per_block:
            return f"double-stream blocks (K of them bring {self.singles_per_block}K single-stream ones)"
        return "transformer blocks"


# stabilityai/stable-diffusion-3.5-medium, transformer/config.json.
SD35_MEDIUM = Transformer(
    "SD3Transformer2DModel",
    "sd3",
    dict(
        sample_size=128,  # 1024 px / 8 (the VAE)
        patch_size=2,
        in_channels=16,  # SD 3's 16-channel VAE latent
        out_channels=16,
        num_layers=24,
        num_attention_heads=24,
        attention_head_dim=64,  # 24 x 64 = 1536 wide
        joint_attention_dim=4096,  # T5-XXL's width (the CLIP embeddings are zero-padded to it)
        caption_projection_dim=1536,  # the text stream at the model's width
        pooled_projection_dim=2048,  # CLIP-L 768 + CLIP-G 1280 pooled
        pos_embed_max_size=384,  # positional table of 384 x 384 patches
        qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)),  # MMDiT-X: blocks 0-12 add an image-only attn2
    ),
    SD3_TEXT_TOKENS,
)
# stabilityai/stable-diffusion-3.5-large, transformer/config.json: no dual attention.
SD35_LARGE = Transformer(
    "SD3Transformer2DModel",
    "sd3",
    dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=38,
        num_attention_heads=38,
        attention_head_dim=64,  # 38 x 64 = 2432 wide
        joint_attention_dim=4096,
        caption_projection_dim=2432,
        pooled_projection_dim=2048,
        pos_embed_max_size=192,  # up to 192 x 192 patches: 3072 px
        qk_norm="rms_norm",
    ),
    SD3_TEXT_TOKENS,
)
# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json. Its interpolation_scale (2)
# is the class default for sample_size 128 and does not change the cost.
PIXART_SIGMA = Transformer(
    "PixArtTransformer2DModel",
    "pixart",
    dict(
        sample_size=128,  # 1024 px / 8
        patch_size=2,
        in_channels=4,  # the SD VAE's 4 latent channels
        out_channels=8,  # learned sigma: noise and variance, 4 channels each
        num_layers=28,
        num_attention_heads=16,
        attention_head_dim=72,  # 16 x 72 = 1152 wide
        cross_attention_dim=1152,
        caption_channels=4096,  # T5-XXL's width, projected to 1152
        norm_type="ada_norm_single",
        use_additional_conditions=False,  # Sigma: no resolution / aspect-ratio embedding
    ),
    PIXART_TEXT_TOKENS,
)
# black-forest-labs/FLUX.1-dev, transformer/config.json (the same numbers as diffusers' Flux
# docs and `FluxTransformer2DModel`'s defaults, but `guidance_embeds`, which FLUX.1-schnell lacks).
FLUX_DEV = Transformer(
    "FluxTransformer2DModel",
    "flux",
    dict(
        patch_size=1,  # the pipeline packs 2x2 latent patches itself: 1 token per packed patch
        in_channels=64,  # 16 VAE latent channels x the 2x2 packed patch
        num_layers=19,  # double-stream blocks (image and text, each with its own weights)
        num_single_layers=38,  # single-stream blocks ([text; image] as one sequence)
        attention_head_dim=128,
        num_attention_heads=24,  # 24 x 128 = 3072 wide
        joint_attention_dim=4096,  # T5-XXL's width
        pooled_projection_dim=768,  # CLIP-L's pooled output
        guidance_embeds=True,  # guidance-distilled: the guidance scale is an input
        axes_dims_rope=(16, 56, 56),  # rotary dims of the (stream, row, column) ids, summing to 128
    ),
    FLUX_TEXT_TOKENS,
    singles_per_block=2,  # 38 / 19
)
WAN_TRANSFORMERS = {
    "wan2.1-1.3b": Transformer("WanTransformer3DModel", "wan", wan_models.WAN21_1_3B, wan_models.WAN_TEXT_TOKENS),
    "wan2.1-14b": Transformer("WanTransformer3DModel", "wan", wan_models.WAN21_14B, wan_models.WAN_TEXT_TOKENS),
    "wan2.2-5b": Transformer("WanTransformer3DModel", "wan", wan_models.WAN22_5B, wan_models.WAN_TEXT_TOKENS),
}
TRANSFORMERS = {"sd35-medium": SD35_MEDIUM, "sd35-large": SD35_LARGE, "pixart-sigma": PIXART_SIGMA,
                "flux-dev": FLUX_DEV, **WAN_TRANSFORMERS}  # fmt: skip
# The same configs at toy widths (2 blocks, 2 heads of 8; SD 3.5's first block dual), real text lengths.
TINY_SD3 = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, joint_attention_dim=32,
                caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=64,
                dual_attention_layers=(0,))  # fmt: skip
TINY_PIXART = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                   caption_channels=32)  # fmt: skip
# Flux at 2 double + 4 single blocks (the 1 : 2 mix), 2 heads of 16 (rotary dims 4 + 6 + 6).
TINY_FLUX = dict(num_layers=2, num_single_layers=4, num_attention_heads=2, attention_head_dim=16,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))  # fmt: skip
TINY_TRANSFORMERS = {
    "tiny-sd35": Transformer("SD3Transformer2DModel", "sd3", dict(SD35_MEDIUM.config, **TINY_SD3), SD3_TEXT_TOKENS),
    "tiny-pixart": Transformer("PixArtTransformer2DModel", "pixart", dict(PIXART_SIGMA.config, **TINY_PIXART),
                               PIXART_TEXT_TOKENS),
    "tiny-flux": Transformer("FluxTransformer2DModel", "flux", dict(FLUX_DEV.config, **TINY_FLUX), FLUX_TEXT_TOKENS,
                             singles_per_block=2),
    "tiny-wan": Transformer("WanTransformer3DModel", "wan", wan_models.TINY_WAN, wan_models.WAN_TEXT_TOKENS),
    "tiny-wan22": Transformer("WanTransformer3DModel", "wan", wan_models.TINY_WAN22, wan_models.WAN_TEXT_TOKENS),
}  # fmt: skip
ALL_TRANSFORMERS = {**TRANSFORMERS, **TINY_TRANSFORMERS}
# An image side (a square) or a video's (height, width).
Size = int | tuple[int, int]


def transformer_config(arch: str, blocks: int | None = None) -> dict[str, Any]:
    """The config of `arch` at its first `blocks` blocks (None: all of them; Flux: `blocks`
    double-stream and `2 x blocks` single-stream blocks).

    Raises:
        ValueError: for `blocks` outside 1 to the model's depth.
    """
    spec = ALL_TRANSFORMERS[arch]
    config = dict(spec.config)
    if blocks is None:
        return config
    if not 1 <= blocks <= spec.depth:
        raise ValueError(f"{arch} has {spec.depth} {spec.depth_unit()}: --blocks {blocks} must be 1 to {spec.depth}.")
    config["num_layers"] = blocks
    if spec.singles_per_block:
        config["num_single_layers"] = spec.singles_per_block * blocks
    if "dual_attention_layers" in config:
        config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < blocks)
    return config


def sides(size: Size) -> tuple[int, int]:
    """(height, width) of a size: one side (a square) or (height, width)."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def size_problem(arch: str, size: Size) -> str | None:
    """Why the transformer `arch` (`NAME` or `NAME:K`) cannot take `size` (one side of a square, or
    (height, width)), or None. Images: squares whose sides are whole 2x2 patches of the VAE's 8x
    latent (multiples of 16), within SD 3's positional table (`largest_size`); videos: any
    height and width of whole tokens (`wan_models.size_problem`)."""
    name = arch.partition(":")[0]
    spec = ALL_TRANSFORMERS[name]
    height, width = sides(size)
    if spec.video:
        return wan_models.size_problem(name, spec.config, height, width)
    if height != width:
        return f"{name} takes square images: give one side, e.g. 1024 (HxW sizes are for the video transformers)"
    size = height
    if size % 16:
        below = size - size % 16
        fits = f"{below} or {below + 16}" if below else "16"
        return f"{name} takes multiples of 16 (whole 2x2 patches of the VAE's 8x latent): use e.g. {fits}"
    largest = largest_size(name)
    if largest is not None and size > largest:
        side = largest // 16
        return f"{name} takes sizes up to {largest} px (its positional table covers {side}x{side} patches)"
    return None


def largest_size(arch: str) -> int | None:
    """The largest image side the transformer `arch` takes: SD 3's positional table covers
    `pos_embed_max_size` patches a side (SD 3.5 Medium 6144 px, Large 3072, tiny-sd35 1024); None:
    no bound (PixArt and Flux compute their positions for any grid)."""
    config = ALL_TRANSFORMERS[arch].config
    patches = config.get("pos_embed_max_size")
    return None if patches is None else patches * config["patch_size"] * 8


def build_transformer(
    arch: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, blocks: int | None = None
) -> torch.nn.Module:
    """A random-weight transformer of `arch` (its first `blocks` blocks), built on `device`.

    A truncated SD 3 model is built one block deeper and that block dropped: SD 3 makes its last
    block `context_pre_only` (no text output), which the first K blocks of the real model are not.
    """
    import diffusers

    spec = ALL_TRANSFORMERS[arch]
    model_class = getattr(diffusers, spec.model_class, None)
    if model_class is None:
        raise ValueError(f"{arch} needs diffusers' {spec.model_class}, which diffusers {diffusers.__version__} lacks.")
    config = transformer_config(arch, blocks)
    deeper = spec.family == "sd3" and blocks is not None and blocks < spec.depth
    with torch.device(device):
        model = model_class(**dict(config, num_layers=blocks + 1) if deeper else config)
    if deeper:
        del model.transformer_blocks[blocks]
        model.register_to_config(num_layers=blocks)
    # nn.Module.to, not diffusers' override (see benchmark.build_unet).
    return torch.nn.Module.to(model, dtype=dtype).eval()


def transformer_inputs(
    model: torch.nn.Module,
    size: Size,
    images: int,
    timestep_device: torch.device | str | None = None,
    frames: int | None = None,
) -> tuple[tuple, dict[str, Any]]:
    """The transformer's (args, kwargs) for one step of `images` images of `size` x `size`
    pixels, all keywords as the pipelines pass them: a CFG batch (2 x images) for SD 3 and
    PixArt, one sample per image for Flux.1-dev (guidance-distilled); for Wan, one of the step's
    two calls on `images` videos of `size` (height, width) and `frames` frames (default
    `wan_models.DEFAULT_FRAMES`), see `wan_models.wan_inputs`.

    Args:
        model: an SD3Transformer2DModel, PixArtTransformer2DModel, FluxTransformer2DModel or
            WanTransformer3DModel.
        timestep_device: where the timesteps are made (default: the model's device); Flux's
            position ids too, which agentsd reads on the host.
    """
    from ..families import find_model

    config, device, dtype = model.config, model.device, model.dtype
    family = find_model(model)[0].name
    timestep_device = device if timestep_device is None else timestep_device
    if family == "wan":
        height, width = sides(size)
        frames = wan_models.DEFAULT_FRAMES if frames is None else frames
        return wan_models.wan_inputs(model, height, width, frames, images, timestep_device)
    height, width = sides(size)
    if height != width:
        raise ValueError(f"size {height}x{width}: {type(model).__name__} takes square images here.")
    size = height
    if family == "flux":
        return _flux_inputs(config, device, dtype, size, images, timestep_device)
    side = size // 8
    if size % 8 or side % config.patch_size:
        raise ValueError(f"size {size} is not a multiple of {8 * config.patch_size} (the VAE's 8 x the patch side).")
    batch = 2 * images
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    latent = randn(batch, config.in_channels, side, side)
    if family == "sd3":
        return (), dict(
            hidden_states=latent,
            encoder_hidden_states=randn(batch, SD3_TEXT_TOKENS, config.joint_attention_dim),
            pooled_projections=randn(batch, config.pooled_projection_dim),
            timestep=torch.full((batch,), float(BENCH_TIMESTEP), device=timestep_device),
        )
    return (), dict(
        hidden_states=latent,
        encoder_hidden_states=randn(batch, PIXART_TEXT_TOKENS, config.caption_channels),
        encoder_attention_mask=torch.ones(batch, PIXART_TEXT_TOKENS, device=device, dtype=dtype),
        timestep=torch.full((batch,), BENCH_TIMESTEP, dtype=torch.long, device=timestep_device),
        added_cond_kwargs=dict(resolution=None, aspect_ratio=None),
    )


def _flux_inputs(
    config: Any, device: torch.device, dtype: torch.dtype, size: int, images: int, ids_device: Any
) -> tuple[tuple, dict[str, Any]]:
    """What FluxPipeline passes its transformer in one step (`FluxPipeline.__call__`): the
    packed latents, one token per 2x2 patch of the 8x latent, (B, (H/16) (W/16), 64); the T5
    states and the pooled CLIP; `t / 1000`; `img_ids` (stream 0, row, column) over the packed
    grid and `txt_ids` zeros, both without a batch dimension; the guidance scale in float32."""
    if size % 16:
        raise ValueError(f"size {size} is not a multiple of 16 (the VAE's 8 x Flux's 2x2 packed patch).")
    side = size // 16
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    kwargs = dict(
        hidden_states=randn(images, side * side, config.in_channels),
        encoder_hidden_states=randn(images, FLUX_TEXT_TOKENS, config.joint_attention_dim),
        pooled_projections=randn(images, config.pooled_projection_dim),
        timestep=torch.full((images,), BENCH_TIMESTEP / 1000, device=ids_device, dtype=dtype),
        img_ids=img_ids.to(device=ids_device, dtype=dtype),
        txt_ids=torch.zeros(FLUX_TEXT_TOKENS, 3, device=ids_device, dtype=dtype),
    )
    if config.guidance_embeds:
        kwargs["guidance"] = torch.full((images,), FLUX_GUIDANCE, device=device, dtype=torch.float32)
    return (), kwargs
