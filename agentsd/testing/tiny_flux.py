"""Tiny Flux pipelines with random weights, built offline in well under a second.

Flux.1-dev (`flux`: FluxPipeline) and Flux.1-Fill (`flux-fill`: FluxFillPipeline) at toy sizes,
with the real diffusers classes, for tests, the CLI and the docs; `tiny_flux_variant` turns the
tiny `flux` pipeline into the img2img, inpainting, Kontext and ControlNet pipelines. They need a
diffusers with Flux (0.30; 0.32 for Fill, 0.34 for Kontext): `agentsd.testing` imports this
module only when a Flux kind is asked for.

Sizes: the VAE downsamples 4x and Flux packs 2x2 latent patches into one token, so an H x W px
image has an (H/8) x (W/8) token grid; sides must be multiples of 8. Flux pipelines default to
512 px whatever the model (`default_sample_size` is fixed at 128 latents), so pass
`height=128, width=128` for the 16x16 = 256-token grid where agent attention's default
`min_tokens=256` starts to act.
"""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxFillPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextModel

from .components import TEXT_HIDDEN, text_config, tiny_tokenizer, tiny_vae
from .tiny_dit import tiny_t5_encoder, tiny_t5_tokenizer

SIZE = 128  # px, both sides: a 16x16 token grid; pass it as height and width
SAMPLE_SIZE = SIZE // 4  # the same in latents
LATENT_CHANNELS = 16  # Flux's VAE
PACKED = 4 * LATENT_CHANNELS  # a token is a 2x2 patch of latents: the transformer's in_channels
VAE_SCALE = 4  # the tiny VAE's downsampling (three blocks)
# Flux.1-Fill's tokens also carry the masked image's packed latents and the mask, whose pixels
# under each latent (VAE_SCALE x VAE_SCALE of them) become channels before packing: 64 + 64 + 64
# here, 64 + 64 + 256 with Flux's 8x VAE (384).
FILL_IN_CHANNELS = 2 * PACKED + 4 * VAE_SCALE**2
# 1 double-stream and 2 single-stream blocks of 4 heads of 8 channels (width 32). The RoPE axes
# (reference-image index, row, column) split the head dim: their sizes must be even and sum to it.
SHAPE = dict(num_layers=1, num_single_layers=2, num_attention_heads=4, attention_head_dim=8, axes_dims_rope=(2, 2, 4))
# The T5 width, wider than the transformer as Flux's (4096 vs 3072), so a mix-up fails loudly.
T5_WIDTH = 64
# Flux.1-dev's VAE scaling and shift, and its scheduler: the shift grows with the image's token
# count (mu from 0.5 at 256 tokens to 1.15 at 4096).
VAE_CONFIG = dict(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
SCHEDULER_CONFIG = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
# The variants `tiny_flux_variant` builds from the tiny `flux` pipeline, by name.
VARIANTS = {
    "img2img": "FluxImg2ImgPipeline",
    "inpaint": "FluxInpaintPipeline",
    "kontext": "FluxKontextPipeline",
    "controlnet": "FluxControlNetPipeline",
}
# What to pass to every call of a tiny Flux pipeline, by kind (`flux-<variant>` for the variants).
# Flux pads prompts to `max_sequence_length` T5 tokens (512 unless told). Kontext scales the size
# asked to the area `max_area` (1024**2 unless told: keep it height * width) and snaps the
# reference image to its preferred ~1 megapixel sizes unless `_auto_resize=False`.
CALL_KWARGS: dict[str, dict[str, Any]] = {
    kind: dict(max_sequence_length=16) for kind in ("flux", "flux-fill", *(f"flux-{name}" for name in VARIANTS))
}
CALL_KWARGS["flux-kontext"].update(max_area=SIZE * SIZE, _auto_resize=False)


def tiny_flux_transformer(in_channels: int = PACKED) -> FluxTransformer2DModel:
    """A FluxTransformer2DModel of `SHAPE` with Flux.1-dev's guidance embedding, taking the tiny T5's
    states and the tiny CLIP's pooled output, and predicting `PACKED` channels per token."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=PACKED,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=True,
        **SHAPE,
    )


def tiny_flux_pipeline(
    seed: int = 0, sample_size: int = SAMPLE_SIZE, fill: bool = False
) -> FluxPipeline | FluxFillPipeline:
    """A tiny FluxPipeline (or FluxFillPipeline with `fill`): the `SHAPE` transformer, the
    byte-level CLIP encoder and tokenizer, a 2-layer T5 encoder with the character-level T5
    tokenizer, Flux.1-dev's FlowMatchEulerDiscreteScheduler, and a 4x VAE with Flux's 16 channels,
    scaling and shift.

    Call it with `height=128, width=128` (`SIZE`; the pipeline's own default is 512 px) and
    `CALL_KWARGS["flux"]` (`max_sequence_length=16`). Fill also takes `image` and `mask_image`.

    Args:
        seed: seeds the random weights.
        sample_size: the VAE's sample size in latents (4x smaller than the image); Flux
            pipelines do not read it.
        fill: build Flux.1-Fill's pipeline, whose transformer takes `FILL_IN_CHANNELS`.
    """
    torch.manual_seed(seed)
    transformer = tiny_flux_transformer(FILL_IN_CHANNELS if fill else PACKED)
    vae = tiny_vae(sample_size * 4, latent_channels=LATENT_CHANNELS, **VAE_CONFIG)
    components = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=CLIPTextModel(text_config()),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_t5_encoder(T5_WIDTH),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer,
    )
    if fill:
        return FluxFillPipeline(**components)
    return FluxPipeline(**components, image_encoder=None, feature_extractor=None)


def tiny_flux_controlnet(transformer: FluxTransformer2DModel) -> FluxControlNetModel:
    """A FluxControlNetModel of one double- and one single-stream block, copying the transformer's
    embeddings and first blocks, as diffusers' ControlNet training starts; its control-image input
    and its outputs start at zero, so it adds nothing to the transformer until trained."""
    return FluxControlNetModel.from_transformer(
        transformer,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=transformer.config.attention_head_dim,
        num_attention_heads=transformer.config.num_attention_heads,
    )


def tiny_flux_variant(pipe: FluxPipeline, variant: str) -> DiffusionPipeline:
    """The tiny `flux` pipeline's components in another Flux pipeline, sharing its modules:

    - `img2img`: `FluxImg2ImgPipeline.from_pipe(pipe)`; call with `image` and `strength`.
    - `inpaint`: `FluxInpaintPipeline.from_pipe(pipe)`; call with `image`, `mask_image`, `strength`.
    - `kontext`: `FluxKontextPipeline.from_pipe(pipe)`; call with a reference `image`, whose tokens
      follow the generated image's (their `img_ids[:, 0]` is 1), and `CALL_KWARGS["flux-kontext"]`.
    - `controlnet`: `FluxControlNetPipeline.from_pipe(pipe, controlnet=tiny_flux_controlnet(...))`;
      call with `control_image`.

    Call each with `height`, `width` and `CALL_KWARGS[f"flux-{variant}"]`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown Flux variant {variant!r}: use one of {', '.join(VARIANTS)}.")
    cls = getattr(diffusers, VARIANTS[variant])  # looked up here: older diffusers lack Kontext
    extra = dict(controlnet=tiny_flux_controlnet(pipe.transformer)) if variant == "controlnet" else {}
    return cls.from_pipe(pipe, **extra)
