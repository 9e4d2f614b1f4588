"""Tiny diffusion-transformer pipelines with random weights, built offline in well under a second.

Stable Diffusion 3 (`sd3`), SD 3.5 (`sd35`) and PixArt-Sigma (`pixart`) at toy sizes, with the
real diffusers classes, for tests, the CLI and the docs. They need a diffusers that has those
classes (0.29; 0.31 for SD 3.5's `qk_norm` and `dual_attention_layers`): `agentsd.testing`
imports this module only when a transformer kind is asked for, so it still loads on older ones.

Sizes: the VAE downsamples 4x and the transformers take 2x2 latent patches, so an H x W px
image has an (H/8) x (W/8) patch grid. The default, 128 px, gives 16x16 = 256 image tokens
(where agent attention's default `min_tokens=256` starts to act); 256 px gives 32x32 = 1024.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from .components import DIT_KINDS, TEXT_HIDDEN, text_config, tiny_tokenizer, tiny_vae

SAMPLE_SIZE = 32  # the latent side by default: 128 px images, a 16x16 patch grid
# Both transformers' shape: 2 blocks of 4 heads of 8 channels (width 32) on 2x2 latent patches.
SHAPE = dict(patch_size=2, num_layers=2, num_attention_heads=4, attention_head_dim=8)
WIDTH = SHAPE["num_attention_heads"] * SHAPE["attention_head_dim"]
# SD3's T5 width: twice the two CLIP encoders' concatenated one, as in SD3 (2048 -> 4096); the CLIP
# states are zero-padded to it.
SD3_JOINT = 4 * TEXT_HIDDEN
# The T5 tokenizer's vocabulary: pad, eos and unk (ids 0-2, as T5's), the metaspace symbol and the
# printable ASCII characters.
T5_PIECES = ("<pad>", "</s>", "<unk>", "\u2581", *(chr(c) for c in range(ord("!"), ord("~") + 1)))
# What to pass to every call of a tiny transformer pipeline, by kind. SD3 appends
# `max_sequence_length` T5 tokens (256 unless told; zeros without T5) to the 77 CLIP ones.
# PixArt-Sigma pads prompts to `max_sequence_length` (300 unless told), snaps the size to its
# resolution bins (the 256 px ones at sample size 32) unless `use_resolution_binning=False`, and
# warns without `clean_caption=False` where Beautiful Soup is missing.
CALL_KWARGS: dict[str, dict[str, Any]] = {
    "sd3": dict(max_sequence_length=16),
    "sd35": dict(max_sequence_length=16),
    "pixart": dict(max_sequence_length=16, use_resolution_binning=False, clean_caption=False),
}


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A character-level T5 tokenizer: a Unigram model over `T5_PIECES` that splits words with
    the metaspace pre-tokenizer and appends eos, as T5's does."""
    tokenizer = Tokenizer(models.Unigram([(piece, -1.0) for piece in T5_PIECES], unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "tokenizer.json")
        tokenizer.save(str(path))
        return T5TokenizerFast(tokenizer_file=str(path), extra_ids=0, model_max_length=300)


def tiny_t5_encoder(width: int) -> T5EncoderModel:
    """A 2-layer T5 v1.1 encoder (gated GELU, as SD3's and PixArt's) of the given width, for the
    character-level T5 tokenizer."""
    return T5EncoderModel(
        T5Config(
            vocab_size=len(T5_PIECES),
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,  # built in training mode: dropout would make every call differ
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def tiny_sd3_pipeline(
    seed: int = 0,
    sample_size: int = SAMPLE_SIZE,
    qk_norm: str | None = None,
    dual_attention_layers: tuple[int, ...] = (),
    t5: bool = True,
) -> StableDiffusion3Pipeline:
    """A tiny StableDiffusion3Pipeline: a 2-block SD3Transformer2DModel (patch 2, 16 latent
    channels), two CLIPTextModelWithProjection sharing the byte-level CLIP tokenizer, a 2-layer
    T5 encoder with the character-level T5 tokenizer, FlowMatchEulerDiscreteScheduler with SD3's
    shift 3.0, and a 4x VAE with SD3's 16 channels, scaling and shift.

    128x128 px (the default, `sample_size=32`) gives a 16x16 patch grid (256 tokens), 256x256
    px a 32x32 one (1024): (H/8) x (W/8). Pass `max_sequence_length=16` (`CALL_KWARGS["sd3"]`)
    to keep the joint attention's text at 77 + 16 tokens.

    Args:
        seed: seeds the random weights.
        sample_size: the latent side the images default to (4x smaller than the image).
        qk_norm: `"rms_norm"` normalises queries and keys, as in SD 3.5.
        dual_attention_layers: blocks that also get an image-only self-attention (`attn2`), as
            the first 13 of SD 3.5 Medium.
        t5: without it, `text_encoder_3=None, tokenizer_3=None` (SD3 then uses zeros for the T5
            tokens); diffusers saves such a pipeline but reloads it only when given
            `text_encoder_3=None, tokenizer_3=None` again.
    """
    sd35 = dict(qk_norm=qk_norm, dual_attention_layers=tuple(dual_attention_layers))
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        in_channels=16,
        out_channels=16,
        joint_attention_dim=SD3_JOINT,
        caption_projection_dim=WIDTH,
        pooled_projection_dim=2 * TEXT_HIDDEN,
        **SHAPE,
        **{name: value for name, value in sd35.items() if value},  # diffusers before 0.31 lacks both
    )
    vae = tiny_vae(
        sample_size * 4,
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    tokenizer = tiny_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(text_config(projection_dim=TEXT_HIDDEN)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=TEXT_HIDDEN)),
        tokenizer_2=tokenizer,
        text_encoder_3=tiny_t5_encoder(SD3_JOINT) if t5 else None,
        tokenizer_3=tiny_t5_tokenizer() if t5 else None,
    )


def tiny_pixart_pipeline(seed: int = 0, sample_size: int = SAMPLE_SIZE) -> PixArtSigmaPipeline:
    """A tiny PixArtSigmaPipeline: a 2-layer PixArtTransformer2DModel (patch 2, learned sigma),
    the 2-layer T5 encoder with the character-level T5 tokenizer, DPMSolverMultistepScheduler
    (its defaults are PixArt-Sigma's) and the 4x VAE with 4 channels. PixArtAlphaPipeline runs
    with the same components (`PixArtAlphaPipeline(**pipe.components)`).

    128x128 px (the default, `sample_size=32`) gives a 16x16 patch grid (256 tokens), 256x256
    px a 32x32 one (1024): (H/8) x (W/8), with `use_resolution_binning=False`. Pass
    `CALL_KWARGS["pixart"]`: `max_sequence_length=16`, `use_resolution_binning=False` (else the
    size snaps to the 256 px bins: 128 px runs at 256 and is resized) and `clean_caption=False`.

    Args:
        seed: seeds the random weights.
        sample_size: the latent side the images default to (4x smaller than the image); with
            resolution binning it must be 32, 64, 128 or 256.
    """
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=WIDTH,
        caption_channels=WIDTH,  # the T5 encoder's width
        **SHAPE,
    )
    vae = tiny_vae(sample_size * 4)
    return PixArtSigmaPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=tiny_t5_encoder(WIDTH),
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def tiny_transformer_pipeline(kind: str, seed: int = 0, sample_size: int = SAMPLE_SIZE):
    """The tiny pipeline of a transformer kind: `sd3`, `sd35` (SD 3.5: `qk_norm="rms_norm"` and
    block 0 with the image-only `attn2`) or `pixart`."""
    if kind == "sd3":
        return tiny_sd3_pipeline(seed, sample_size)
    if kind == "sd35":
        return tiny_sd3_pipeline(seed, sample_size, qk_norm="rms_norm", dual_attention_layers=(0,))
    if kind == "pixart":
        return tiny_pixart_pipeline(seed, sample_size)
    raise ValueError(f"unknown tiny transformer kind {kind!r}: use one of {', '.join(DIT_KINDS)}.")
