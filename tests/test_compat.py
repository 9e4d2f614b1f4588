"""The compatibility matrix: agentsd on the pipelines and adapters diffusers users combine it with.

Each cell: the patched run is finite and differs from the baseline, and after unpatching the
pipeline gives the baseline bit for bit.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from PIL import Image

import agentsd
from agentsd.testing import tiny_pipeline

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
MASK = Image.fromarray(np.tile((np.arange(64) > 32).astype(np.uint8) * 255, (64, 1)))


def img2img():
    return StableDiffusionImg2ImgPipeline(**tiny_pipeline("sd15").components), dict(image=IMAGE, strength=0.9)


def inpaint():
    return StableDiffusionInpaintPipeline(**tiny_pipeline("sd15").components), dict(image=IMAGE, mask_image=MASK)


def sdxl_img2img():
    pipe = StableDiffusionXLImg2ImgPipeline(**tiny_pipeline("sdxl").components)
    return pipe, dict(image=IMAGE, strength=0.9)


def controlnet():
    base = tiny_pipeline("sd15")
    torch.manual_seed(1)
    net = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16, 16))
    return StableDiffusionControlNetPipeline(**base.components, controlnet=net), dict(image=IMAGE)


def lora(fuse):
    def build():
        pytest.importorskip("peft")
        from peft import LoraConfig

        pipe = tiny_pipeline("sd15")
        torch.manual_seed(2)
        pipe.unet.add_adapter(
            LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
        )
        if fuse:
            pipe.unet.fuse_lora()
        return pipe, {}

    return build


def no_cfg():
    return tiny_pipeline("sd15"), dict(guidance_scale=1.0)


CELLS = {
    "img2img": img2img,
    "inpaint": inpaint,
    "sdxl-img2img": sdxl_img2img,
    "controlnet": controlnet,
    "lora": lora(fuse=False),
    "lora-fused": lora(fuse=True),
    "guidance-1": no_cfg,
}


def generate(pipe, extra):
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a red cube", num_inference_steps=4, height=64, width=64, output_type="np")
    return pipe(generator=torch.Generator().manual_seed(0), **args, **extra).images


@pytest.mark.parametrize("cell", list(CELLS))
def test_cell(cell):
    pipe, extra = CELLS[cell]()
    baseline = generate(pipe, extra)
    agentsd.patch(pipe, agent_steps=1.0, max_downsample=2 if "sdxl" in cell else 1)
    out = generate(pipe, extra)
    assert np.isfinite(out).all()
    assert not np.array_equal(out, baseline)
    agentsd.unpatch(pipe)
    assert np.array_equal(generate(pipe, extra), baseline)
