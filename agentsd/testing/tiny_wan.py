"""Tiny Wan video pipelines with random weights, built offline in about a second.

The real diffusers classes at toy sizes, by kind (`WAN_KINDS`):

- `wan`: Wan 2.1 text-to-video (WanPipeline): a `WanTransformer3DModel` of 2 blocks, a causal
  `AutoencoderKLWan` that compresses 4x in time and 8x in space, a 2-layer UMT5 encoder with the
  character-level T5 tokenizer, and Wan's flow-matching scheduler (FlowMatchEulerDiscreteScheduler,
  shift 3).
- `wan-i2v`: Wan 2.1 image-to-video (WanImageToVideoPipeline): besides, a tiny CLIP vision encoder
  and its image processor; the transformer takes 36 channels (16 noisy, 4 of mask, 16 of the image's
  latents) and its cross-attentions have `add_k_proj`/`add_v_proj` for the image's tokens.
- `wan-v2v`: Wan 2.1 video-to-video (WanVideoToVideoPipeline) with `wan`'s weights (the same seed
  draws the same modules); it takes `video` (a list of PIL frames) and `strength`, and no `num_frames`.
- `wan22`: Wan 2.2 A14B text-to-video: WanPipeline with two different transformers, `transformer`
  for the high-noise steps (timestep >= `BOUNDARY_RATIO` * 1000) and `transformer_2` for the rest.
- `wan22-5b`: Wan 2.2 TI2V-5B text-to-video: WanPipeline with `expand_timesteps=True` (the
  transformer gets one timestep per token, shape (batch, tokens)) over the Wan 2.2 VAE (residual
  blocks, 2x2 pixel patches in 12 channels, 48 latent channels, 16x in space).

They need a diffusers with Wan (0.33; 0.35 for Wan 2.2): `agentsd.testing` imports this module only
when a Wan kind is asked for. Every module is put in eval mode (T5's dropout is on in a freshly
built model).

Sizes: 128 x 128 px and 17 frames make a 5 x 16 x 16 latent, which the transformer's 1 x 2 x 2
patches turn into a 5 x 8 x 8 token grid (320 tokens). `wan22-5b`'s VAE compresses 16x in space:
it gets the same grid at 256 px. Wan wants 4 k + 1 frames.

Prompts: diffusers' image- and video-to-video Wan pipelines clean prompts with ftfy whether it is
installed or not (a NameError without it); the text-to-video one only where it is. Without ftfy,
give them `tiny_wan_prompt_embeds(pipe, kind, prompt)` instead of `prompt`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
    WanVideoToVideoPipeline,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from .components import WAN_KINDS
from .tiny_dit import T5_PIECES, tiny_t5_tokenizer

SIZE = 128  # px, both sides
SIZE_5B = 256  # px, both sides, for `wan22-5b` (its VAE compresses 16x): the same token grid
FRAMES = 17  # video frames: 5 latent frames
TEXT_WIDTH = 32  # the UMT5 encoder's width (the transformer's text_dim)
IMAGE_WIDTH = 40  # the CLIP vision encoder's width (the I2V transformer's image_dim)
IMAGE_SIZE = 32  # px, the CLIP vision encoder's input: 4 x 4 patches of 8 px and a class token
LATENT_CHANNELS_5B = 48  # the Wan 2.2 VAE's
BOUNDARY_RATIO = 0.875  # Wan 2.2 A14B text-to-video's: `transformer` from timestep 875 up
# 2 blocks of 2 heads of 12 channels (width 24): Wan's rotary embedding splits a head's 12
# channels into 4 for time, 4 for rows and 4 for columns.
SHAPE = dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2)
WIDTH = SHAPE["num_attention_heads"] * SHAPE["attention_head_dim"]
# What to pass to every call of a tiny Wan pipeline, by kind: its size, and a short prompt padding
# (Wan pads prompts to 512 tokens unless told). Not for `wan-i2v`: Wan's attention takes the last
# 512 tokens of what the cross-attention gets as the text and the ones before as the image
# (hard-coded), so shorter prompts leave the image none. `wan-v2v` takes its frames from `video`.
CALL_KWARGS: dict[str, dict[str, Any]] = {
    "wan": dict(height=SIZE, width=SIZE, num_frames=FRAMES, max_sequence_length=16),
    "wan-i2v": dict(height=SIZE, width=SIZE, num_frames=FRAMES, max_sequence_length=512),
    "wan-v2v": dict(height=SIZE, width=SIZE, max_sequence_length=16),
    "wan22": dict(height=SIZE, width=SIZE, num_frames=FRAMES, max_sequence_length=16),
    "wan22-5b": dict(height=SIZE_5B, width=SIZE_5B, num_frames=FRAMES, max_sequence_length=16),
}


def tiny_wan_transformer(**overrides: Any) -> WanTransformer3DModel:
    """A WanTransformer3DModel of `SHAPE` over the tiny VAE's 16 latent channels, in eval mode;
    `overrides` change its config (`in_channels`, `image_dim`, ...)."""
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


def tiny_wan22_vae() -> AutoencoderKLWan:
    """The Wan 2.2 (TI2V-5B) VAE's layout at toy size: residual down and up blocks over 2x2 pixel
    patches (12 channels), 48 latent channels, 4x in time and 16x in space. Its latents are
    normalized with mean 0 and standard deviation 1 (a config needs 48 of each)."""
    return AutoencoderKLWan(
        base_dim=4,
        z_dim=LATENT_CHANNELS_5B,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * LATENT_CHANNELS_5B,
        latents_std=[1.0] * LATENT_CHANNELS_5B,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
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


def tiny_clip_vision() -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    """A 2-layer CLIP vision encoder of width `IMAGE_WIDTH` on `IMAGE_SIZE` px images (17 tokens),
    in eval mode, and the image processor that resizes and crops images to that size. Wan 2.1's
    I2V pipeline gives the transformer the encoder's next-to-last hidden states."""
    config = CLIPVisionConfig(
        hidden_size=IMAGE_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return CLIPVisionModel(config).eval(), processor


def tiny_wan_pipeline(seed: int = 0, kind: str = "wan") -> DiffusionPipeline:
    """A tiny Wan pipeline of the given kind (see the module's docstring). Call it with
    `CALL_KWARGS[kind]`; `wan-i2v` also takes `image`, `wan-v2v` `video` and `strength`."""
    if kind not in WAN_KINDS:
        raise ValueError(f"unknown tiny Wan kind {kind!r}: use one of {', '.join(WAN_KINDS)}.")
    torch.manual_seed(seed)
    # Built in this order for every kind, so `wan` and `wan-v2v` draw the same weights.
    text = dict(tokenizer=tiny_t5_tokenizer(), text_encoder=tiny_umt5_encoder())
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    if kind == "wan22-5b":
        transformer = tiny_wan_transformer(in_channels=LATENT_CHANNELS_5B, out_channels=LATENT_CHANNELS_5B)
        return WanPipeline(
            **text, vae=tiny_wan22_vae(), transformer=transformer, scheduler=scheduler, expand_timesteps=True
        )
    vae = tiny_wan_vae()
    if kind == "wan-i2v":
        transformer = tiny_wan_transformer(in_channels=36, image_dim=IMAGE_WIDTH, added_kv_proj_dim=WIDTH)
        encoder, processor = tiny_clip_vision()
        return WanImageToVideoPipeline(
            **text,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            image_encoder=encoder,
            image_processor=processor,
        )
    transformer = tiny_wan_transformer()
    if kind == "wan-v2v":
        return WanVideoToVideoPipeline(**text, vae=vae, transformer=transformer, scheduler=scheduler)
    if kind == "wan22":
        return WanPipeline(
            **text,
            vae=vae,
            transformer=transformer,
            transformer_2=tiny_wan_transformer(),
            scheduler=scheduler,
            boundary_ratio=BOUNDARY_RATIO,
        )
    return WanPipeline(**text, vae=vae, transformer=transformer, scheduler=scheduler)


def tiny_wan_prompt_embeds(
    pipe: DiffusionPipeline, kind: str, prompt: str, negative_prompt: str = ""
) -> dict[str, torch.Tensor]:
    """`prompt_embeds` and `negative_prompt_embeds` for a tiny Wan pipeline of `kind`, padded to
    its `CALL_KWARGS[kind]["max_sequence_length"]`: what the pipeline makes of `prompt` and
    `negative_prompt` itself, by way of the text-to-video pipeline's encoding (the image- and
    video-to-video pipelines' needs ftfy; see the module's docstring)."""
    text = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler)
    length = CALL_KWARGS[kind]["max_sequence_length"]
    embeds, negative = text.encode_prompt(prompt, negative_prompt, max_sequence_length=length)
    return dict(prompt_embeds=embeds, negative_prompt_embeds=negative)
