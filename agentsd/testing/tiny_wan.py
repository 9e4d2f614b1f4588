"""Tiny Wan video pipelines with random weights, built offline in about a second.

Wan 2.1 text-to-video (`wan`: WanPipeline) at toy sizes, with the real diffusers classes: a
`WanTransformer3DModel` of 2 blocks, a causal `AutoencoderKLWan` that compresses 4x in time and
8x in space, a 2-layer UMT5 encoder with the character-level T5 tokenizer, and Wan's flow-matching
scheduler (FlowMatchEulerDiscreteScheduler, shift 3). They need a diffusers with Wan (0.33):
`agentsd.testing` imports this module only when a Wan kind is asked for. Every module is put in
eval mode (T5's dropout is on in a freshly built model).

Sizes: 128 x 128 px and 17 frames make a 5 x 16 x 16 latent, which the transformer's 1 x 2 x 2
patches turn into a 5 x 8 x 8 token grid (320 tokens). Wan wants 4 k + 1 frames.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from .tiny_dit import T5_PIECES, tiny_t5_tokenizer

SIZE = 128  # px, both sides
FRAMES = 17  # video frames: 5 latent frames
TEXT_WIDTH = 32  # the UMT5 encoder's width (the transformer's text_dim)
# 2 blocks of 2 heads of 12 channels (width 24): Wan's rotary embedding splits a head's 12
# channels into 4 for time, 4 for rows and 4 for columns.
SHAPE = dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2)
# What to pass to every call of a tiny Wan pipeline: its size, and a short prompt padding (Wan
# pads prompts to 512 tokens unless told).
CALL_KWARGS: dict[str, dict[str, Any]] = {
    "wan": dict(height=SIZE, width=SIZE, num_frames=FRAMES, max_sequence_length=16),
}


def tiny_wan_transformer(**overrides: Any) -> WanTransformer3DModel:
    """A WanTransformer3DModel of `SHAPE` over the tiny VAE's 16 latent channels, in eval mode."""
    config = dict(
        patch_size=(1, 2, 2),
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_WIDTH,
        freq_dim=256,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        **SHAPE,
    )
    return WanTransformer3DModel(**(config | overrides)).eval()


def tiny_wan_vae() -> AutoencoderKLWan:
    """A causal video VAE: 4x in time (the first frame alone, then 4 frames per latent frame),
    8x in space, 16 latent channels."""
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def tiny_umt5_encoder() -> UMT5EncoderModel:
    """A 2-layer UMT5 encoder of width `TEXT_WIDTH` for the character-level T5 tokenizer."""
    config = UMT5Config(
        vocab_size=len(T5_PIECES),
        d_model=TEXT_WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return UMT5EncoderModel(config).eval()


def tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    """A tiny Wan 2.1 text-to-video pipeline. Call it with `CALL_KWARGS["wan"]`."""
    torch.manual_seed(seed)
    return WanPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=tiny_umt5_encoder(),
        vae=tiny_wan_vae(),
        transformer=tiny_wan_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
