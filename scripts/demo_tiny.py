"""Patch a tiny offline Stable Diffusion 1.x pipeline and show the schedule at work.

Builds a toy SD 1.x pipeline with random weights (nothing is downloaded), runs it once
without and once with agent attention, prints the phase of every denoising step and the
wall time of both runs. The images are noise (random weights); the point is the mechanics.

    python scripts/demo_tiny.py --steps 50
"""

import argparse
import time

import torch

import agentsd
from agentsd.testing import tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--latent", type=int, default=32, help="latent side; the image is 4x larger")
    args = parser.parse_args()

    pipe = tiny_pipeline("sd15", sample_size=args.latent)
    pipe.set_progress_bar_config(disable=True)
    size = args.latent * pipe.vae_scale_factor
    run = dict(prompt="a photo of a cat", num_inference_steps=args.steps, height=size, width=size, output_type="np")

    start = time.perf_counter()
    baseline = pipe(generator=torch.Generator().manual_seed(0), **run).images
    baseline_s = time.perf_counter() - start

    phases = []

    def record(pipeline, step, timestep, callback_kwargs):
        phases.append((step, int(timestep), agentsd.current_phase(pipeline)))
        return callback_kwargs

    with agentsd.patched(pipe):
        start = time.perf_counter()
        images = pipe(generator=torch.Generator().manual_seed(0), callback_on_step_end=record, **run).images
        agent_s = time.perf_counter() - start

    for step, timestep, phase in phases:
        print(f"step {step:3d}  t={timestep:4d}  {phase}")
    print(f"agent steps: {sum(p == 'agent' for *_, p in phases)} of {len(phases)}")
    print(f"baseline {baseline_s:.2f} s, agentsd {agent_s:.2f} s ({size}x{size} px, tiny random UNet)")
    print(f"max |difference| from the baseline image: {abs(images - baseline).max():.4f}")


if __name__ == "__main__":
    main()
