"""The diffusion transformers `agentsd bench` builds: SD 3.5 Medium and Large, PixArt-Sigma.

Each is built from its published diffusers config (the hub repository's
`transformer/config.json`) with random weights, and called as its pipeline calls it in one
denoising step with classifier-free guidance: the latent, the timestep (one per sample), and
text embeddings of the published lengths (SD 3 / 3.5: 77 CLIP + 256 T5 tokens of width 4096
and a pooled 2048; PixArt-Sigma: 300 T5 tokens of width 4096 with their attention mask).

`blocks=K` builds the first K transformer blocks of the model at its real widths (the large
models do not fit a 24 GB machine in fp32): the step then measures speed per block, not the
whole model's (embeddings and the output layer weigh more in it). The blocks are the published
model's first K as they are there: SD 3.5 Medium's dual-attention blocks are its first 13,
so the first min(K, 13) are dual, and every truncated SD 3 block keeps its text stream (only
the model's last block drops it, `context_pre_only`).

The tiny stand-ins (`tiny-sd35`, `tiny-pixart`) are the same configs at toy widths, for tests.
The diffusers classes are looked up when a model is built: this module imports on a diffusers
without SD 3 or PixArt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# SD 3 / 3.5 pipelines: the CLIP-L and CLIP-G embeddings (77 tokens, zero-padded from 2048 to
# T5's 4096 channels) followed by T5's 256 (`max_sequence_length` default); pooled: 768 + 1280.
SD3_TEXT_TOKENS = 77 + 256
# PixArt-Sigma's pipeline pads every prompt to `max_sequence_length=300` T5 tokens.
PIXART_TEXT_TOKENS = 300
BENCH_TIMESTEP = 500  # any timestep: the benchmark's agentsd methods fix their phase


@dataclass(frozen=True)
class Transformer:
    """A diffusion transformer the benchmark builds.

    Args:
        model_class: the diffusers class name.
        family: agentsd's family of it (`agentsd.families`): `sd3` or `pixart`.
        config: the class's keyword arguments (the published config).
        text_tokens: the encoder tokens its pipeline passes per prompt.
    """

    model_class: str
    family: str
    config: dict[str, Any] = field(default_factory=dict)
    text_tokens: int = 0

    @property
    def depth(self) -> int:
        return self.config["num_layers"]


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
TRANSFORMERS = {"sd35-medium": SD35_MEDIUM, "sd35-large": SD35_LARGE, "pixart-sigma": PIXART_SIGMA}
# The same configs at toy widths (2 blocks, 2 heads of 8; SD 3.5's first block dual), real text lengths.
TINY_SD3 = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, joint_attention_dim=32,
                caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=64,
                dual_attention_layers=(0,))  # fmt: skip
TINY_PIXART = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                   caption_channels=32)  # fmt: skip
TINY_TRANSFORMERS = {
    "tiny-sd35": Transformer("SD3Transformer2DModel", "sd3", dict(SD35_MEDIUM.config, **TINY_SD3), SD3_TEXT_TOKENS),
    "tiny-pixart": Transformer("PixArtTransformer2DModel", "pixart", dict(PIXART_SIGMA.config, **TINY_PIXART),
                               PIXART_TEXT_TOKENS),
}  # fmt: skip
ALL_TRANSFORMERS = {**TRANSFORMERS, **TINY_TRANSFORMERS}


def transformer_config(arch: str, blocks: int | None = None) -> dict[str, Any]:
    """The config of `arch` at its first `blocks` blocks (None: all of them).

    Raises:
        ValueError: for `blocks` outside 1 to the model's depth.
    """
    spec = ALL_TRANSFORMERS[arch]
    config = dict(spec.config)
    if blocks is None:
        return config
    if not 1 <= blocks <= spec.depth:
        raise ValueError(f"{arch} has {spec.depth} transformer blocks: --blocks {blocks} must be 1 to {spec.depth}.")
    config["num_layers"] = blocks
    if "dual_attention_layers" in config:
        config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < blocks)
    return config


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
    model: torch.nn.Module, size: int, images: int, timestep_device: torch.device | str | None = None
) -> tuple[tuple, dict[str, Any]]:
    """The transformer's (args, kwargs) for one CFG step of `images` images of `size` x `size`
    pixels, all keywords as the pipelines pass them.

    Args:
        model: an SD3Transformer2DModel or PixArtTransformer2DModel.
        timestep_device: where the timesteps are made (default: the model's device).
    """
    from .families import find_model

    config, device, dtype = model.config, model.device, model.dtype
    side = size // 8
    if size % 8 or side % config.patch_size:
        raise ValueError(f"size {size} is not a multiple of {8 * config.patch_size} (the VAE's 8 x the patch side).")
    batch = 2 * images
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    timestep_device = device if timestep_device is None else timestep_device
    latent = randn(batch, config.in_channels, side, side)
    if find_model(model)[0].name == "sd3":
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
