"""The UNets `agentsd bench` builds: SD 1.5, SD 2.1 and SDXL from their published configs with
random weights, and their inputs in one denoising step (a classifier-free-guidance batch, as
the pipelines pass them)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

from .transformer_models import BENCH_TIMESTEP

# The published UNet configs (diffusers format) of the architectures benchmarked.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        sample_size=64,
    ),
    "sd21": dict(
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
        sample_size=96,
    ),
    "sdxl": dict(
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        sample_size=128,
    ),
}
# The tiny architectures (agentsd.testing) stand in for the real ones in tests.
TINY_ARCHITECTURES = {"tiny": "sd15", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
LATENT_FACTOR = 8  # image pixels per latent pixel in every SD VAE


def build_unet(arch: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A random-weight UNet of `arch`, built on `device` (so its weights are drawn there).

    Args:
        arch: `sd15`, `sd21`, `sdxl`, or one of `TINY_ARCHITECTURES` for tests.
        device, dtype: where the UNet lives and its dtype.
    """
    if arch not in ARCHITECTURES and arch not in TINY_ARCHITECTURES:
        known = ", ".join([*ARCHITECTURES, *TINY_ARCHITECTURES])
        raise ValueError(f"unknown architecture {arch!r}: use one of {known}.")
    with torch.device(device):
        if arch in TINY_ARCHITECTURES:
            from ..testing import tiny_unet

            unet = tiny_unet(TINY_ARCHITECTURES[arch])
        else:
            unet = UNet2DConditionModel(**ARCHITECTURES[arch])
    # nn.Module.to, not diffusers' override: that one warns about modules to keep in fp32, which
    # matters for loaded weights only (a random-weight UNet has none to keep).
    return torch.nn.Module.to(unet, dtype=dtype).eval()


def unet_inputs(
    unet: UNet2DConditionModel, size: int, images: int, timestep_device: torch.device | str | None = None
) -> tuple[tuple, dict[str, Any]]:
    """The UNet's (args, kwargs) for one CFG step of `images` images of `size` x `size` pixels,
    passed as the pipelines pass them (sample and timestep positional); the timestep made on
    `timestep_device` (default: the UNet's device)."""
    if size % LATENT_FACTOR:
        raise ValueError(f"size {size} is not a multiple of {LATENT_FACTOR}.")
    batch, side = 2 * images, size // LATENT_FACTOR
    generator = torch.Generator().manual_seed(0)
    config, device, dtype = unet.config, unet.device, unet.dtype

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    timestep = torch.tensor(BENCH_TIMESTEP, device=device if timestep_device is None else timestep_device)
    args = (randn(batch, config.in_channels, side, side), timestep)
    kwargs: dict[str, Any] = dict(encoder_hidden_states=randn(batch, 77, config.cross_attention_dim))
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=dtype, device=device).repeat(batch, 1)
        kwargs["added_cond_kwargs"] = dict(text_embeds=randn(batch, pooled), time_ids=time_ids)
    return args, kwargs
