"""The Wan video transformers `agentsd bench` builds: Wan 2.1 T2V 1.3B and 14B, Wan 2.2 TI2V 5B.

Each is the hub repository's `transformer/config.json` (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`,
`Wan-AI/Wan2.1-T2V-14B-Diffusers`, `Wan-AI/Wan2.2-TI2V-5B-Diffusers`; the same numbers as the Wan
team's own configs, `wan/configs/wan_t2v_1_3B.py` and the like) with random weights, called as
`WanPipeline` calls it in one denoising step: the latent (B, C, latent frames, H / s, W / s),
the timestep, and 512 UMT5 tokens of width 4096 (the pipeline pads every prompt to
`max_sequence_length=512`). With guidance the pipeline calls the transformer twice per step, the
prompt and the negative prompt one after the other, each with one sample per video: the benchmark
times one such call (its batch is the number of videos), so a step takes two of them and the
speedups of a step are those of a call.

Sizes. A video of F frames (the pipelines' `num_frames`, 4 k + 1) has (F - 1) / 4 + 1 latent
frames: Wan's causal VAE keeps the first frame and packs every 4 after it into one. In space
Wan 2.1's VAE compresses 8x and Wan 2.2's 16x (its latent has 48 channels, Wan 2.1's 16), and the
transformer's 1 x 2 x 2 patches halve both sides again: a token is 16 x 16 px on Wan 2.1 and
32 x 32 px on Wan 2.2 5B. 480p is 480 x 832 px (the pipelines' default), 720p 720 x 1280 (Wan 2.2
5B's 720p: 704 x 1280, whole 32 px tokens). Wan 2.1 at 81 frames: 21 x 30 x 52 = 32,760 tokens at
480p, 21 x 45 x 80 = 75,600 at 720p; Wan 2.2 5B at 121 frames and 704 x 1280: 31 x 22 x 40 = 27,280.

Wan 2.2 5B's pipeline (`expand_timesteps`, TI2V) passes one timestep per token, (B, tokens), and
the transformer then embeds every token's timestep: a per-token cost the benchmark keeps.

`blocks=K` keeps the first K of the model's blocks (all alike) at the real widths.
"""

from __future__ import annotations

from typing import Any

import torch

# WanPipeline pads every prompt to max_sequence_length=512 UMT5 tokens (width 4096).
WAN_TEXT_TOKENS = 512
VAE_TEMPORAL = 4  # frames per latent frame after the first (both Wan VAEs)
WAN22_LATENT_CHANNELS = 48  # Wan 2.2's VAE: 48 channels, 16x in space; Wan 2.1's: 16 channels, 8x
DEFAULT_SIZE = (480, 832)  # the Wan pipelines' default height and width: 480p
DEFAULT_FRAMES = 81  # the Wan pipelines' default num_frames: 21 latent frames
# Any timestep: the benchmark's agentsd methods fix their phase. Wan pipelines pass training
# timesteps (sigma x 1000).
WAN_TIMESTEP = 500.0

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json.
WAN21_1_3B = dict(
    patch_size=(1, 2, 2),  # frames x rows x columns of the latent per token
    num_attention_heads=12,
    attention_head_dim=128,  # 12 x 128 = 1536 wide
    in_channels=16,  # Wan 2.1's VAE latent
    out_channels=16,
    text_dim=4096,  # UMT5-XXL's width
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
# Wan-AI/Wan2.1-T2V-14B-Diffusers: 40 x 128 = 5120 wide, 40 blocks.
WAN21_14B = dict(WAN21_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
# Wan-AI/Wan2.2-TI2V-5B-Diffusers: 24 x 128 = 3072 wide, 30 blocks, Wan 2.2's 48-channel latent.
WAN22_5B = dict(WAN21_1_3B, num_attention_heads=24, ffn_dim=14336, in_channels=48, out_channels=48)
# The same at toy widths (2 blocks, 2 heads of 12 channels, as agentsd.testing's tiny Wan), real text length.
TINY_WAN = dict(WAN21_1_3B, num_attention_heads=2, attention_head_dim=12, text_dim=32, ffn_dim=32, num_layers=2)
TINY_WAN22 = dict(TINY_WAN, in_channels=48, out_channels=48)


def is_wan22(config: Any) -> bool:
    """Whether a Wan transformer config takes Wan 2.2's 48-channel latent (16x VAE, per-token timesteps)."""
    return _get(config, "in_channels") == WAN22_LATENT_CHANNELS


def pixels_per_token(config: Any) -> int:
    """The side in pixels of one token: the VAE's spatial factor x the patch side."""
    return (16 if is_wan22(config) else 8) * _get(config, "patch_size")[1]


def latent_frames(frames: int) -> int:
    """Latent frames of a video of `frames` frames (4 k + 1)."""
    return (frames - 1) // VAE_TEMPORAL + 1


def frames_problem(frames: int) -> str | None:
    """Why a Wan pipeline would not take `frames` as it is (it rounds to 4 k + 1), or None."""
    if frames >= 1 and (frames - 1) % VAE_TEMPORAL == 0:
        return None
    below = frames - (frames - 1) % VAE_TEMPORAL if frames > 1 else 1
    return f"Wan takes 4k+1 video frames (its VAE packs 4 frames per latent frame after the first): use e.g. {below}"


def size_problem(arch: str, config: Any, height: int, width: int) -> str | None:
    """Why the Wan transformer `arch` cannot take `height` x `width` px, or None: both sides whole tokens."""
    side = pixels_per_token(config)
    if height > 0 and width > 0 and not height % side and not width % side:
        return None
    vae = "16x VAE" if is_wan22(config) else "8x VAE"
    fit = [max(side, n - n % side) for n in (height, width)]
    return f"{arch} takes sides that are multiples of {side} (its {vae} x the 2x2 patches): use e.g. {fit[0]}x{fit[1]}"


def token_grid(config: Any, height: int, width: int, frames: int) -> tuple[int, int, int]:
    """The (frames, rows, columns) token grid of a video."""
    side = pixels_per_token(config)
    return latent_frames(frames) // _get(config, "patch_size")[0], height // side, width // side


def wan_inputs(
    model: torch.nn.Module,
    height: int,
    width: int,
    frames: int,
    videos: int,
    timestep_device: torch.device | str | None = None,
) -> tuple[tuple, dict[str, Any]]:
    """The Wan transformer's (args, kwargs) for one of a step's calls on `videos` videos, as
    `WanPipeline` makes them: all keywords, `return_dict=False`; the timestep made on
    `timestep_device` (default: the model's device), one per sample, or on Wan 2.2 5B one per
    token (B, tokens).

    Raises:
        ValueError: for frames or sides the model cannot take.
    """
    config, device, dtype = model.config, model.device, model.dtype
    problem = frames_problem(frames) or size_problem("this Wan transformer", config, height, width)
    if problem:
        raise ValueError(f"{height}x{width} px, {frames} frames: {problem}.")
    side = pixels_per_token(config) // config.patch_size[1]
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    latent = randn(videos, config.in_channels, latent_frames(frames), height // side, width // side)
    timestep_device = device if timestep_device is None else timestep_device
    if is_wan22(config):  # WanPipeline with expand_timesteps: every token's timestep
        tokens = torch.Size(token_grid(config, height, width, frames)).numel()
        timestep = torch.full((videos, tokens), WAN_TIMESTEP, device=timestep_device)
    else:
        timestep = torch.full((videos,), WAN_TIMESTEP, device=timestep_device)
    kwargs = dict(
        hidden_states=latent,
        timestep=timestep,
        encoder_hidden_states=randn(videos, WAN_TEXT_TOKENS, config.text_dim),
        return_dict=False,
    )
    return (), kwargs


def _get(config: Any, key: str) -> Any:
    return config[key] if isinstance(config, dict) else getattr(config, key)
