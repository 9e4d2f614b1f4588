"""Stable Diffusion XL with agent attention, as a diffusers community pipeline.

    import agentsd
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        "stabilityai/stable-diffusion-xl-base-1.0",
        custom_pipeline=agentsd.community_pipeline("sdxl"),  # this file, also inside an installed agentsd
        trust_remote_code=True,  # diffusers asks for it to run a local pipeline file
    )
    image = pipe("a photo of a cat").images[0]                           # the `sdxl` preset
    image = pipe("a photo of a cat", agentsd_config=False).images[0]     # the baseline

Needs `agentsd` installed. The UNet is patched for the call and unpatched after it.
"""

from diffusers import StableDiffusionXLPipeline

from agentsd.api.community import call_with_agentsd


class AgentSDStableDiffusionXLPipeline(StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` whose `__call__` takes `agentsd_config` (default: `sdxl`)."""

    def __call__(self, *args, agentsd_config=None, **kwargs):
        return call_with_agentsd(self, super().__call__, agentsd_config, "sdxl", *args, **kwargs)
