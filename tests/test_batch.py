"""An image never depends on what else is in its batch: each image of a batch, made with its own
generator, equals the same image made alone, in every family, with random destinations on.

Flux has no guidance batch and SD 1.x without guidance neither, so one image is a batch of one
and two are a batch of two: a draw that depends on the batch (the published rule turns randomness
off for odd batches) gives the image another set of destinations there. Batched kernels may round
differently from single ones, so the comparison has a tolerance; a different draw changes the
images by orders of magnitude more."""

import pytest
import torch

import agentsd

PROMPTS = ("a red cube", "a blue ball")
SEEDS = (1, 2)
# kind -> the call's own arguments (tiny sizes, and for Flux the tiny T5's prompt length)
CASES = {
    "sd15": dict(height=64, width=64),
    "sd15-no-guidance": dict(height=64, width=64, guidance_scale=1.0),
    "sdxl": dict(height=64, width=64),
    "sd3": dict(height=128, width=128),
    "pixart": dict(height=128, width=128),
    "flux": dict(height=128, width=128, max_sequence_length=16),
}
PATCH = dict(min_tokens=0, use_rand=True, agent_steps=0.5)  # both phases, random destinations


def generate(pipe, prompts, seeds, call, num_images_per_prompt=1):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompt=list(prompts),
        generator=generators,
        num_inference_steps=4,
        num_images_per_prompt=num_images_per_prompt,
        output_type="np",
        **call,
    ).images


@pytest.mark.parametrize("case", CASES)
def test_each_image_of_a_batch_is_the_image_made_alone(pipes, case):
    kind = case.split("-")[0]
    pipe = agentsd.patch(pipes(kind), max_downsample=2, **PATCH)
    call = CASES[case]
    alone = [generate(pipe, [prompt], [seed], call)[0] for prompt, seed in zip(PROMPTS, SEEDS, strict=True)]
    together = generate(pipe, PROMPTS, SEEDS, call)
    patched_effect = abs(alone[0] - generate(agentsd.unpatch(pipe), [PROMPTS[0]], [SEEDS[0]], call)[0]).max()
    assert patched_effect > 1e-3  # the patch changes the image far more than the tolerance below
    for made_alone, in_batch in zip(alone, together, strict=True):
        assert abs(made_alone - in_batch).max() < 1e-5


@pytest.mark.parametrize("kind", ["sd15", "flux"])
def test_num_images_per_prompt_makes_the_images_made_one_by_one(pipes, kind):
    case = "sd15-no-guidance" if kind == "sd15" else kind
    pipe = agentsd.patch(pipes(kind), **PATCH)
    call = CASES[case]
    alone = [generate(pipe, [PROMPTS[0]], [seed], call)[0] for seed in SEEDS]
    together = generate(pipe, [PROMPTS[0]], SEEDS, call, num_images_per_prompt=2)
    for made_alone, in_batch in zip(alone, together, strict=True):
        assert abs(made_alone - in_batch).max() < 1e-5
