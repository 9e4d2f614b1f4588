"""The tiny Flux pipelines (Flux.1-dev, Flux.1-Fill): each kind builds, generates finite images of
the asked size, square or not, and reloads from a saved folder (its weights bit for bit, its images
to rounding: see reloading.py); the transformer gets what Flux's does (sigma as the timestep, one
(index, row, column) id per token, the T5 prompt at `max_sequence_length`); the img2img,
inpainting, Kontext and ControlNet pipelines run from the tiny one; `make_tiny_model.py --kind
flux` saves a folder FluxPipeline loads offline."""

import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from reloading import assert_images_close, assert_same_components

from agentsd.testing import FLUX_KINDS

tiny_flux = pytest.importorskip("agentsd.testing.tiny_flux", reason="this diffusers has no Flux")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red cube"
SIDE = tiny_flux.SIZE


def image(seed=1, width=SIDE, height=SIDE):
    """A random image tensor in [0, 1], as the pipelines' image processor takes it."""
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def square_mask(width=SIDE, height=SIDE):
    """White (repaint) in the middle half of each side, black (keep) around it."""
    mask = torch.zeros(1, 1, height, width)
    mask[..., height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1
    return mask


def inputs(kind, width=SIDE, height=SIDE):
    """The images a kind needs besides the prompt."""
    if kind == "flux-fill":
        return dict(image=image(width=width, height=height), mask_image=square_mask(width, height))
    return {}


def generate(pipe, kind, steps=2, width=SIDE, height=SIDE, output_type="pt", **extra):
    generator = torch.Generator().manual_seed(0)
    call = dict(num_inference_steps=steps, width=width, height=height, generator=generator, output_type=output_type)
    return pipe(prompt=PROMPT, **{**call, **tiny_flux.CALL_KWARGS[kind], **extra}).images


def transformer_calls(pipe, kind, **call):
    """The keyword arguments of each transformer call while the pipeline generates."""
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True
    )
    try:
        generate(pipe, kind, output_type="latent", **call)
    finally:
        hook.remove()
    return calls


def variant(pipes, name):
    pipe = tiny_flux.tiny_flux_variant(pipes("flux"), name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", FLUX_KINDS)
@pytest.mark.parametrize(("width", "height"), [(SIDE, SIDE), (128, 192)])
def test_generates_finite_images_of_the_asked_size(pipes, kind, width, height):
    images = generate(pipes(kind), kind, width=width, height=height, **inputs(kind, width, height))
    assert images.shape == (1, 3, height, width)
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("kind", FLUX_KINDS)
def test_reloads_from_a_saved_folder(pipes, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = pipes(kind)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(loaded, name)(PROMPT).input_ids == getattr(pipe, name)(PROMPT).input_ids, name
    assert_same_components(loaded, pipe)
    assert_images_close(generate(loaded, kind, **inputs(kind)), generate(pipe, kind, **inputs(kind)))


def test_the_transformer_gets_sigma_the_token_grid_ids_and_the_t5_prompt(pipes):
    """At 128 px wide and 192 tall, a 16-column, 24-row grid: `img_ids` holds (0, row, column) in
    row-major order; the timestep is Flux's dynamically shifted sigma, exp(mu) / (exp(mu) + 1/s - 1)
    for s = 1, 1/2 with mu from 0.5 at 256 tokens to 1.15 at 4096."""
    rows, columns = 24, 16
    calls = transformer_calls(pipes("flux"), "flux", width=128, height=192)
    tokens = rows * columns
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    sigmas = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in (1.0, 0.5)]
    assert [float(call["timestep"]) for call in calls] == pytest.approx(sigmas, rel=1e-6)
    index = torch.arange(tokens)
    grid = torch.stack([torch.zeros(tokens), index // columns, index % columns], dim=1)
    for call in calls:
        assert call["hidden_states"].shape == (1, tokens, tiny_flux.PACKED)
        assert torch.equal(call["img_ids"], grid)
        assert call["encoder_hidden_states"].shape == (1, 16, tiny_flux.T5_WIDTH)  # max_sequence_length
        assert call["txt_ids"].shape == (16, 3) and not call["txt_ids"].any()
        assert call["guidance"] is not None  # Flux.1-dev's guidance embedding


def test_fill_tokens_carry_the_masked_image_and_the_mask(pipes):
    """64 noisy-latent channels, 64 of the masked image's latents, 64 of the mask (4x4 pixels per
    latent, 2x2 latents per token)."""
    (call, *_) = transformer_calls(pipes("flux-fill"), "flux-fill", **inputs("flux-fill"))
    assert call["hidden_states"].shape == (1, 256, 64 + 64 + 64)


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("img2img", lambda: dict(image=image(), strength=1.0)),
        ("inpaint", lambda: dict(image=image(), mask_image=square_mask(), strength=1.0)),
        ("controlnet", lambda: dict(control_image=image())),
    ],
)
def test_variants_run_on_the_tiny_pipelines_modules(pipes, name, extra):
    pipe = variant(pipes, name)
    assert pipe.transformer is pipes("flux").transformer
    images = generate(pipe, f"flux-{name}", **extra())
    assert images.shape == (1, 3, SIDE, SIDE) and torch.isfinite(images).all()


def test_a_fresh_controlnet_adds_nothing(pipes):
    """Its output projections start at zero: from the same latents (the ControlNet pipeline draws
    from the generator for the control image first) and guidance (its default is 7, Flux's 3.5)
    it gives the plain pipeline's latents."""
    latents = torch.randn(1, (SIDE // 8) ** 2, tiny_flux.PACKED, generator=torch.Generator().manual_seed(2))
    same = dict(latents=latents, guidance_scale=3.5, output_type="latent")
    plain = generate(pipes("flux"), "flux", **same)
    controlled = generate(variant(pipes, "controlnet"), "flux-controlnet", control_image=image(), **same)
    assert torch.equal(controlled, plain)


def test_kontext_reference_tokens_follow_the_image_tokens(pipes):
    pipe = variant(pipes, "kontext")
    (call, *_) = transformer_calls(pipe, "flux-kontext", image=image())
    tokens = (SIDE // 8) ** 2
    ids = call["img_ids"]
    assert call["hidden_states"].shape == (1, 2 * tokens, tiny_flux.PACKED)
    assert ids.shape == (2 * tokens, 3)
    assert not ids[:tokens, 0].any() and (ids[tokens:, 0] == 1).all()
    assert torch.equal(ids[tokens:, 1:], ids[:tokens, 1:])  # a reference of the same size: the same grid


@pytest.mark.parametrize("kind", FLUX_KINDS)
def test_make_tiny_model_saves_a_folder_the_pipeline_class_loads(kind, tmp_path, monkeypatch, capsys):
    from diffusers import FluxFillPipeline, FluxPipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["make_tiny_model.py", "tiny", "--kind", kind])
    runpy.run_path(str(ROOT / "scripts" / "make_tiny_model.py"), run_name="__main__")
    assert "ask for 128 px images" in capsys.readouterr().out
    pipe = (FluxFillPipeline if kind == "flux-fill" else FluxPipeline).from_pretrained("tiny")
    pipe.set_progress_bar_config(disable=True)
    assert generate(pipe, kind, steps=1, output_type="latent", **inputs(kind)).shape == (1, 256, tiny_flux.PACKED)


def test_unknown_variants_are_refused_naming_every_variant(pipes):
    with pytest.raises(ValueError, match="img2img, inpaint, kontext, controlnet"):
        tiny_flux.tiny_flux_variant(pipes("flux"), "redux")
