"""Tiny Stable Diffusion pipelines with random weights, built offline in about a second.

They have the real diffusers architectures (SD 1.x, SD 2.x, SDXL) at toy sizes, with
self-attention at the latent resolution, so tests, examples and the benchmark harness can
run the whole library without downloading anything. The diffusion transformers (SD3, SD 3.5,
PixArt-Sigma) are in `agentsd.testing.tiny_dit`, Flux in `agentsd.testing.tiny_flux`, the Wan video
pipelines in `agentsd.testing.tiny_wan`, imported when first used (they need a newer diffusers); the
parts all of them share in `agentsd.testing.components`; `tiny_pipeline` builds every kind.
"""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .components import (
    DIT_KINDS,
    FLUX_KINDS,
    KINDS,
    TEXT_HIDDEN,
    TRANSFORMER_KINDS,
    WAN_KINDS,
    byte_symbols,
    text_config,
    tiny_tokenizer,
    tiny_vae,
)

__all__ = [
    "DIT_KINDS",
    "FLUX_KINDS",
    "KINDS",
    "TEXT_HIDDEN",
    "TRANSFORMER_KINDS",
    "WAN_KINDS",
    "byte_symbols",
    "text_config",
    "tiny_pipeline",
    "tiny_tokenizer",
    "tiny_unet",
    "tiny_vae",
]


def tiny_unet(kind: str = "sd15", sample_size: int = 16) -> UNet2DConditionModel:
    """A toy UNet of the given family: SD 1.x, SD 2.x (linear projection, upcast attention)
    or SDXL (text-time embedding, no attention at the latent resolution)."""
    common = dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8)
    if kind in ("sd15", "sd2"):
        sd2 = dict(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
        return UNet2DConditionModel(
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN,
            **(sd2 if kind == "sd2" else dict(attention_head_dim=2)),
            **common,
        )
    if kind == "sdxl":
        return UNet2DConditionModel(
            block_out_channels=(16, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * TEXT_HIDDEN,
            attention_head_dim=(2, 2, 4),
            transformer_layers_per_block=(1, 1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN,
            **common,
        )
    raise ValueError(f"unknown tiny pipeline kind {kind!r}: use one of {', '.join(KINDS)}.")


def tiny_pipeline(kind: str = "sd15", seed: int = 0, sample_size: int | None = None):
    """A tiny StableDiffusionPipeline (`sd15`, `sd2`), StableDiffusionXLPipeline (`sdxl`),
    StableDiffusion3Pipeline (`sd3`, `sd35`), PixArtSigmaPipeline (`pixart`), FluxPipeline
    (`flux`), FluxFillPipeline (`flux-fill`) or a Wan video pipeline (`WAN_KINDS`: Wan 2.1 text-,
    image- and video-to-video, Wan 2.2 A14B and TI2V-5B).

    The VAE downsamples 4x, so the UNets' default 16x16 latent is a 64x64 image; the
    transformers default to a 32x32 latent, a 128x128 image with a 16x16 patch grid (their
    calls take `agentsd.testing.tiny_dit.CALL_KWARGS[kind]`; see `agentsd.testing.tiny_dit`). Flux pipelines
    default to 512 px whatever the model: call them with `height=128, width=128` and
    `agentsd.testing.tiny_flux.CALL_KWARGS[kind]` (see `agentsd.testing.tiny_flux`). Wan pipelines
    take no `sample_size`: call them with `agentsd.testing.tiny_wan.CALL_KWARGS[kind]` (17 frames at
    128 px; 256 px for `wan22-5b`).
    """
    if kind in WAN_KINDS:
        if sample_size is not None:
            raise ValueError(f"a tiny {kind} pipeline takes no sample_size: it is given its size when called.")
        from .tiny_wan import tiny_wan_pipeline

        return tiny_wan_pipeline(seed, kind)
    if kind in FLUX_KINDS:
        from .tiny_flux import SAMPLE_SIZE, tiny_flux_pipeline

        return tiny_flux_pipeline(seed, SAMPLE_SIZE if sample_size is None else sample_size, fill=kind == "flux-fill")
    if kind in TRANSFORMER_KINDS:
        from .tiny_dit import SAMPLE_SIZE, tiny_transformer_pipeline

        return tiny_transformer_pipeline(kind, seed, SAMPLE_SIZE if sample_size is None else sample_size)
    if kind not in KINDS:
        every = ", ".join(KINDS + TRANSFORMER_KINDS + WAN_KINDS)
        raise ValueError(f"unknown tiny pipeline kind {kind!r}: use one of {every}.")
    sample_size = 16 if sample_size is None else sample_size
    torch.manual_seed(seed)
    unet = tiny_unet(kind, sample_size)
    vae = tiny_vae(sample_size * 4)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if kind == "sd2" else "epsilon",
    )
    tokenizer = tiny_tokenizer()
    if kind == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(text_config()),
            text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=TEXT_HIDDEN)),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config()),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def __getattr__(name: str):
    """The transformer builders, re-exported from `agentsd.testing.tiny_dit`, `agentsd.testing.tiny_flux` and
    `agentsd.testing.tiny_wan` on first use, so this module still imports on a diffusers without SD3,
    PixArt, Flux or Wan."""
    if name in ("tiny_sd3_pipeline", "tiny_pixart_pipeline", "tiny_t5_tokenizer"):
        from . import tiny_dit

        return getattr(tiny_dit, name)
    if name in ("tiny_flux_pipeline", "tiny_flux_controlnet", "tiny_flux_variant"):
        from . import tiny_flux

        return getattr(tiny_flux, name)
    if name in ("tiny_wan_pipeline", "tiny_wan_prompt_embeds"):
        from . import tiny_wan

        return getattr(tiny_wan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
