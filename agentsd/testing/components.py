"""The parts every tiny pipeline shares: the kinds `tiny_pipeline` builds, a byte-level CLIP
tokenizer and text-encoder config, and a small VAE."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTokenizer

KINDS = ("sd15", "sd2", "sdxl")
DIT_KINDS = ("sd3", "sd35", "pixart")  # agentsd.testing.tiny_dit
FLUX_KINDS = ("flux", "flux-fill")  # agentsd.testing.tiny_flux
WAN_KINDS = ("wan", "wan-i2v", "wan-v2v", "wan22", "wan22-5b")  # agentsd.testing.tiny_wan: video
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


def text_config(**extra) -> CLIPTextConfig:
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
