"""Tiny Stable Diffusion pipelines with random weights, built offline in about a second.

They have the real diffusers architectures (SD 1.x, SD 2.x, SDXL) at toy sizes, with
self-attention at the latent resolution, so tests, examples and the benchmark harness can
run the whole library without downloading anything. The diffusion transformers (SD3, SD 3.5,
PixArt-Sigma) are in `agentsd.testing.tiny_dit`, Flux in `agentsd.testing.tiny_flux`, imported when first used
(they need a newer diffusers); `tiny_pipeline` builds every kind.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

KINDS = ("sd15", "sd2", "sdxl")
DIT_KINDS = ("sd3", "sd35", "pixart")  # agentsd.testing.tiny_dit
FLUX_KINDS = ("flux", "flux-fill")  # agentsd.testing.tiny_flux
TRANSFORMER_KINDS = DIT_KINDS + FLUX_KINDS
TEXT_HIDDEN = 32


def byte_symbols() -> list[str]:
    """The 256 characters a byte-level BPE tokenizer (GPT-2, CLIP) writes bytes as, in byte-table
    order: printable Latin-1 bytes stand for themselves, the others for code points from 256 on.
    (transformers has this table, but its module moved between releases.)"""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer: 2 special tokens and the 512 byte symbols, no merges."""
    symbols = byte_symbols()
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    with tempfile.TemporaryDirectory() as folder:
        vocab, merges = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        merges.write_text("#version: 0.2\n")
        return CLIPTokenizer(str(vocab), str(merges), model_max_length=77)


def _text_config(**extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=600,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


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


def tiny_vae(image_size: int, latent_channels: int = 4, **config) -> AutoencoderKL:
    """A toy AutoencoderKL that downsamples 4x (three blocks), with `image_size` as its sample
    size; `config` adds to its config (SD3's `shift_factor`, `use_quant_conv`, ...)."""
    return AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=image_size,
        **config,
    )


def tiny_pipeline(kind: str = "sd15", seed: int = 0, sample_size: int | None = None):
    """A tiny StableDiffusionPipeline (`sd15`, `sd2`), StableDiffusionXLPipeline (`sdxl`),
    StableDiffusion3Pipeline (`sd3`, `sd35`), PixArtSigmaPipeline (`pixart`), FluxPipeline
    (`flux`) or FluxFillPipeline (`flux-fill`).

    The VAE downsamples 4x, so the UNets' default 16x16 latent is a 64x64 image; the
    transformers default to a 32x32 latent, a 128x128 image with a 16x16 patch grid (their
    calls take `agentsd.testing.tiny_dit.CALL_KWARGS[kind]`; see `agentsd.testing.tiny_dit`). Flux pipelines
    default to 512 px whatever the model: call them with `height=128, width=128` and
    `agentsd.testing.tiny_flux.CALL_KWARGS[kind]` (see `agentsd.testing.tiny_flux`).
    """
    if kind in FLUX_KINDS:
        from .tiny_flux import SAMPLE_SIZE, tiny_flux_pipeline

        return tiny_flux_pipeline(seed, SAMPLE_SIZE if sample_size is None else sample_size, fill=kind == "flux-fill")
    if kind in TRANSFORMER_KINDS:
        from .tiny_dit import SAMPLE_SIZE, tiny_transformer_pipeline

        return tiny_transformer_pipeline(kind, seed, SAMPLE_SIZE if sample_size is None else sample_size)
    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}: use one of {', '.join(KINDS + TRANSFORMER_KINDS)}.")
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
            text_encoder=CLIPTextModel(_text_config()),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=TEXT_HIDDEN)),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def __getattr__(name: str):
    """The transformer builders, re-exported from `agentsd.testing.tiny_dit` and `agentsd.testing.tiny_flux` on
    first use, so this module still imports on a diffusers without SD3, PixArt or Flux."""
    if name in ("tiny_sd3_pipeline", "tiny_pixart_pipeline", "tiny_t5_tokenizer"):
        from . import tiny_dit

        return getattr(tiny_dit, name)
    if name in ("tiny_flux_pipeline", "tiny_flux_controlnet", "tiny_flux_variant"):
        from . import tiny_flux

        return getattr(tiny_flux, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
