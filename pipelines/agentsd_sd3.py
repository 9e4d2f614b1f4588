"""Stable Diffusion 3 / 3.5 with agent attention, as a diffusers community pipeline.

    import agentsd
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        "stabilityai/stable-diffusion-3.5-medium",
        custom_pipeline=agentsd.community_pipeline("sd3"),  # this file, also inside an installed agentsd
        trust_remote_code=True,  # diffusers asks for it to run a local pipeline file
    )
    image = pipe("a photo of a cat").images[0]                           # the `sd3` preset
    image = pipe("a photo of a cat", agentsd_config={"ratio": 0.5}).images[0]
    image = pipe("a photo of a cat", agentsd_config=False).images[0]     # the baseline

Needs `agentsd` installed and a diffusers with SD 3 (0.29 or newer; SD 3.5 needs 0.31). The
transformer is patched for the call and unpatched after it.
"""

from diffusers import StableDiffusion3Pipeline

from agentsd.api.community import call_with_agentsd


class AgentSDStableDiffusion3Pipeline(StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` whose `__call__` takes `agentsd_config` (default: `sd3`)."""

    def __call__(self, *args, agentsd_config=None, **kwargs):
        return call_with_agentsd(self, super().__call__, agentsd_config, "sd3", *args, **kwargs)
