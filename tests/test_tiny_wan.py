"""The tiny Wan video pipelines (Wan 2.1 text-, image- and video-to-video, Wan 2.2 A14B and TI2V-5B):
each kind builds with every module in eval mode, generates finite frames of the asked size, the same
frames twice, and reloads from a saved folder (its weights bit for bit, its frames to rounding: see
reloading.py); the transformers get what Wan's do (wan22: each expert on its side of the boundary;
wan22-5b: a timestep per token; wan-i2v: the image's tokens before 512 text tokens); wan-v2v has
wan's weights and follows its video; `make_tiny_model.py --kind <wan kind>` saves a folder
DiffusionPipeline loads offline."""

import inspect
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from reloading import assert_images_close, assert_same_components, public

from agentsd.testing import WAN_KINDS, tiny_pipeline

tiny_wan = pytest.importorskip("agentsd.testing.tiny_wan", reason="this diffusers has no Wan")
from diffusers import WanImageToVideoPipeline, WanPipeline, WanVideoToVideoPipeline  # noqa: E402 (after the skip)
from diffusers.utils import is_ftfy_available  # noqa: E402

HAS_WAN22 = "boundary_ratio" in inspect.signature(WanPipeline.__init__).parameters
NEEDS_FTFY = ("wan-i2v", "wan-v2v")  # diffusers' pipelines for them clean prompts with ftfy, installed or not


def skips(kind, prompts=False):
    """Wan 2.2 needs diffusers 0.35; with `prompts`, the I2V and V2V pipelines need ftfy."""
    found = []
    if kind.startswith("wan22") and not HAS_WAN22:
        found.append(pytest.mark.skip(reason="diffusers < 0.35"))
    if prompts and kind in NEEDS_FTFY and not is_ftfy_available():
        found.append(pytest.mark.skip(reason="this pipeline needs ftfy to encode a prompt"))
    return found


KINDS = [pytest.param(kind, marks=skips(kind)) for kind in WAN_KINDS]
CLASSES = {
    "wan": WanPipeline,
    "wan-i2v": WanImageToVideoPipeline,
    "wan-v2v": WanVideoToVideoPipeline,
    "wan22": WanPipeline,
    "wan22-5b": WanPipeline,
}
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red cube"
FRAMES = tiny_wan.FRAMES


def side(kind):
    return tiny_wan.CALL_KWARGS[kind]["height"]


def picture(seed, size=tiny_wan.SIZE):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def inputs(kind, steps, seed=1):
    """What a kind takes besides the prompt to run `steps` steps: wan-i2v an image; wan-v2v a video
    of `FRAMES` frames, and strength 0.5 of twice the steps (it runs the last half)."""
    if kind == "wan-i2v":
        return dict(image=picture(seed), num_inference_steps=steps)
    if kind == "wan-v2v":
        video = [picture(seed + i) for i in range(FRAMES)]
        return dict(video=video, strength=0.5, num_inference_steps=2 * steps)
    return dict(num_inference_steps=steps)


def prompt(pipe, kind):
    """The prompt as the kind's pipeline takes it here: the I2V and V2V pipelines need ftfy to
    encode one, so they get its embeddings (`tiny_wan_prompt_embeds`)."""
    if kind in NEEDS_FTFY:
        return tiny_wan.tiny_wan_prompt_embeds(pipe, kind, PROMPT)
    return dict(prompt=PROMPT)


def generate(pipe, kind, steps=2, output_type="np", **extra):
    call = dict(generator=torch.Generator().manual_seed(0), output_type=output_type, **tiny_wan.CALL_KWARGS[kind])
    return pipe(**prompt(pipe, kind), **{**call, **inputs(kind, steps), **extra}).frames


def calls(module, run, positional=False):
    """The keyword arguments of each call of `module` while `run()` runs (with `positional`, its
    first positional argument)."""
    seen = []
    if positional:
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    else:
        handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_builds_the_kinds_pipeline_in_eval_mode(pipes, kind):
    pipe = pipes(kind)
    assert type(pipe) is CLASSES[kind]
    modules = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert {name for name, module in modules.items() if any(m.training for m in module.modules())} == set()


@pytest.mark.parametrize("kind", KINDS)
def test_generates_the_same_finite_frames_twice(pipes, kind):
    first, second = (generate(pipes(kind), kind) for _ in range(2))
    assert first.shape == (1, FRAMES, side(kind), side(kind), 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("kind", KINDS)
def test_reloads_from_a_saved_folder(pipes, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = pipes(kind)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    assert loaded.tokenizer(PROMPT).input_ids == pipe.tokenizer(PROMPT).input_ids
    assert public(loaded.config) == public(pipe.config)  # boundary_ratio, expand_timesteps
    if kind == "wan-i2v":
        assert loaded.image_processor.to_dict() == pipe.image_processor.to_dict()
    assert_same_components(loaded, pipe)
    assert_images_close(generate(loaded, kind), generate(pipe, kind))


@pytest.mark.skipif(not HAS_WAN22, reason="diffusers < 0.35")
def test_wan22_runs_each_expert_on_its_side_of_the_boundary(pipes):
    """At 4 steps (shift 3: timesteps 1000, 857, 602, 9) `transformer` runs the first, the only one
    from the boundary (875) up, and `transformer_2` the other three, each twice (with and without
    the prompt); the experts' weights differ."""
    pipe = pipes("wan22")
    experts = pipe.transformer, pipe.transformer_2
    seen = []
    hooks = [
        expert.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append((module, float(kwargs["timestep"]))), with_kwargs=True
        )
        for expert in experts
    ]
    try:
        generate(pipe, "wan22", steps=4, output_type="latent")
    finally:
        for hook in hooks:
            hook.remove()
    timesteps = pipe.scheduler.timesteps.tolist()
    assert timesteps == pytest.approx([1000, 857, 602, 9], abs=1)
    assert [t for _, t in seen] == [t for t in timesteps for _ in "cu"]  # with and without the prompt
    assert [module for module, _ in seen] == [experts[0]] * 2 + [experts[1]] * 6
    assert pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps == 875
    first, second = (expert.state_dict() for expert in experts)
    assert first.keys() == second.keys() and not torch.equal(first["proj_out.weight"], second["proj_out.weight"])


@pytest.mark.skipif(not HAS_WAN22, reason="diffusers < 0.35")
def test_wan22_5b_transformer_gets_a_timestep_per_token(pipes):
    """256 px and 17 frames: a 5 x 16 x 16 latent of 48 channels, 5 x 8 x 8 = 320 tokens, each with
    its own timestep (all 1000 at the first step: no image to keep)."""
    pipe = pipes("wan22-5b")
    (call, *_) = calls(pipe.transformer, lambda: generate(pipe, "wan22-5b", steps=1, output_type="latent"))
    assert call["hidden_states"].shape == (1, 48, 5, 16, 16)
    assert call["timestep"].shape == (1, 320)
    assert (call["timestep"] == 1000).all()


def test_i2v_cross_attention_gets_the_image_tokens_before_512_text_tokens(pipes):
    """The transformer takes 16 noisy, 4 mask and 16 image-latent channels, and the CLIP encoder's 17
    tokens (16 patches and the class token); Wan's attention takes all but the last 512 tokens of
    its context as the image's, so those 17 reach `add_k_proj`."""
    pipe = pipes("wan-i2v")

    def run():
        generate(pipe, "wan-i2v", steps=1, output_type="latent")

    (call, *_) = calls(pipe.transformer, run)
    assert call["hidden_states"].shape == (1, 36, 5, 16, 16)
    assert call["encoder_hidden_states"].shape == (1, 512, tiny_wan.TEXT_WIDTH)
    assert call["encoder_hidden_states_image"].shape == (1, 17, tiny_wan.IMAGE_WIDTH)
    (image_tokens, *_) = calls(pipe.transformer.blocks[0].attn2.add_k_proj, run, positional=True)
    assert image_tokens.shape == (1, 17, tiny_wan.WIDTH)


def test_v2v_has_wans_weights_and_follows_its_video(pipes):
    wan, v2v = pipes("wan"), pipes("wan-v2v")
    for name in ("text_encoder", "vae", "transformer"):
        mine, theirs = getattr(wan, name).state_dict(), getattr(v2v, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    other = dict(video=[picture(100 + i) for i in range(FRAMES)])
    assert not np.allclose(generate(v2v, "wan-v2v"), generate(v2v, "wan-v2v", **other), atol=1e-3)


@pytest.mark.parametrize("kind", [pytest.param(kind, marks=skips(kind, prompts=True)) for kind in WAN_KINDS])
def test_prompt_embeds_are_the_pipelines_own(pipes, kind):
    """`tiny_wan_prompt_embeds` gives what the kind's pipeline makes of the prompt and the negative
    prompt itself, bit for bit, at its `max_sequence_length`."""
    pipe = pipes(kind)
    length = tiny_wan.CALL_KWARGS[kind]["max_sequence_length"]
    embeds = tiny_wan.tiny_wan_prompt_embeds(pipe, kind, PROMPT, "blurry")
    own = pipe.encode_prompt(PROMPT, "blurry", max_sequence_length=length)
    assert embeds["prompt_embeds"].shape == (1, length, tiny_wan.TEXT_WIDTH)
    assert torch.equal(embeds["prompt_embeds"], own[0]) and torch.equal(embeds["negative_prompt_embeds"], own[1])


@pytest.mark.parametrize("kind", KINDS)
def test_make_tiny_model_saves_a_folder_diffusers_loads(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["make_tiny_model.py", "tiny", "--kind", kind])
    runpy.run_path(str(ROOT / "scripts" / "make_tiny_model.py"), run_name="__main__")
    assert f"ask for {side(kind)} px, 17 frames" in capsys.readouterr().out
    pipe = DiffusionPipeline.from_pretrained("tiny")
    assert type(pipe) is CLASSES[kind]
    pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(generate(pipe, kind, steps=1, output_type="latent")).all()


def test_unknown_kinds_and_sample_sizes_are_refused():
    with pytest.raises(ValueError, match="wan, wan-i2v, wan-v2v, wan22, wan22-5b"):
        tiny_wan.tiny_wan_pipeline(kind="wan3")
    with pytest.raises(ValueError, match="takes no sample_size"):
        tiny_pipeline("wan", sample_size=32)
