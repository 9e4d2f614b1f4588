"""Stable Diffusion 1.x / 2.x with agent attention, as a diffusers community pipeline.

    import agentsd
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        custom_pipeline=agentsd.community_pipeline("sd"),  # this file, also inside an installed agentsd
        trust_remote_code=True,  # diffusers asks for it to run a local pipeline file
    )
    image = pipe("a photo of a cat").images[0]                           # the `paper` preset
    image = pipe("a photo of a cat", agentsd_config="sd21").images[0]    # another preset
    image = pipe("a photo of a cat", agentsd_config={"ratio": 0.5}).images[0]
    image = pipe("a photo of a cat", agentsd_config=False).images[0]     # the baseline

Needs `agentsd` installed. The UNet is patched for the call and unpatched after it.
"""

from diffusers import StableDiffusionPipeline

from agentsd.api.community import call_with_agentsd


class AgentSDStableDiffusionPipeline(StableDiffusionPipeline):
    """`StableDiffusionPipeline` whose `__call__` takes `agentsd_config` (default: `paper`)."""

    def __call__(self, *args, agentsd_config=None, **kwargs):
        return call_with_agentsd(self, super().__call__, agentsd_config, "paper", *args, **kwargs)
