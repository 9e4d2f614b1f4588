"""The tiny diffusion-transformer pipelines (SD3, SD 3.5, PixArt-Sigma): each kind builds,
generates finite images of the asked size, reloads from a saved folder (its weights bit for bit,
its images to rounding: see reloading.py), and has the patch grid its docstring states, (H/8) x
(W/8) tokens: 128 px gives 256, 256 px gives 1024."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from reloading import assert_images_close, assert_same_components

from agentsd.testing import DIT_KINDS, tiny_pipeline

tiny_dit = pytest.importorskip("agentsd.testing.tiny_dit", reason="this diffusers has no SD3 or PixArt-Sigma")
from diffusers import PixArtAlphaPipeline, SD3Transformer2DModel  # noqa: E402 (after the skip)

HAS_SD35 = "dual_attention_layers" in inspect.signature(SD3Transformer2DModel.__init__).parameters
KINDS = [
    pytest.param(kind, marks=pytest.mark.skipif(kind == "sd35" and not HAS_SD35, reason="diffusers < 0.31"))
    for kind in DIT_KINDS
]
PROMPT = "a red cube"


def generate(pipe, kind, steps=2, width=128, height=128, **extra):
    generator = torch.Generator().manual_seed(0)
    call = dict(num_inference_steps=steps, width=width, height=height, generator=generator, output_type="np")
    return pipe(PROMPT, **{**call, **tiny_dit.CALL_KWARGS[kind], **extra}).images


def image_tokens(pipe, kind, width, height):
    """The number of patch tokens the transformer's patch embedding makes at this image size."""
    seen = []
    hook = pipe.transformer.pos_embed.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    try:
        generate(pipe, kind, steps=1, width=width, height=height, output_type="latent")
    finally:
        hook.remove()
    return set(seen)


@pytest.mark.parametrize("kind", KINDS)
def test_generates_finite_images_of_the_asked_size(pipes, kind):
    images = generate(pipes(kind), kind, width=128, height=96)
    assert images.shape == (1, 96, 128, 3)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("side", "tokens"), [(128, 16 * 16), (256, 32 * 32)])
def test_patch_grid_is_an_eighth_of_the_image_side(pipes, kind, side, tokens):
    assert image_tokens(pipes(kind), kind, side, side) == {tokens}


@pytest.mark.parametrize("kind", KINDS)
def test_reloads_from_a_saved_folder(pipes, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = pipes(kind)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    tokenizers = [name for name in ("tokenizer", "tokenizer_2", "tokenizer_3") if getattr(pipe, name, None)]
    assert tokenizers
    for name in tokenizers:
        assert getattr(loaded, name)(PROMPT).input_ids == getattr(pipe, name)(PROMPT).input_ids, name
    assert_same_components(loaded, pipe)
    assert_images_close(generate(loaded, kind), generate(pipe, kind))


def test_sd35_adds_qk_norm_and_the_image_only_attention_to_the_first_block_only(pipes):
    if not HAS_SD35:
        pytest.skip("diffusers < 0.31")
    sd3, sd35 = pipes("sd3").transformer, pipes("sd35").transformer
    assert [block.attn2 is not None for block in sd35.transformer_blocks] == [True, False]
    assert all(block.attn2 is None for block in sd3.transformer_blocks)
    assert sd35.transformer_blocks[0].attn.norm_q is not None and sd3.transformer_blocks[0].attn.norm_q is None


def test_pixart_alpha_runs_with_the_sigma_components(pipes):
    alpha = PixArtAlphaPipeline(**pipes("pixart").components)
    images = generate(alpha, "pixart")
    assert images.shape == (1, 128, 128, 3) and np.isfinite(images).all()


def test_sd3_without_t5_runs_and_reloads_when_told_it_has_none(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = tiny_dit.tiny_sd3_pipeline(t5=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, text_encoder_3=None, tokenizer_3=None)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None
    assert_same_components(loaded, pipe)
    assert_images_close(generate(loaded, "sd3"), generate(pipe, "sd3"))


def test_unknown_kinds_are_refused_naming_every_kind():
    with pytest.raises(ValueError, match="sd15, sd2, sdxl, sd3, sd35, pixart"):
        tiny_pipeline("sd4")
