"""The compatibility matrix: agentsd on the pipelines, adapters and accelerators diffusers users
combine it with.

Each cell runs the patch cycle: the patched run is finite and differs from the baseline, agentsd
replaced self-attention (`attn1`) processors only and every other processor is still the same
object, and after unpatching the pipeline has all its original processors and gives the baseline
bit for bit. `python scripts/compat_matrix.py` runs these cells (and the related tests in other
files) and writes the matrix in the README; `test_readme_matrix_lists_every_cell` keeps the two
in step.
"""

import tempfile
from collections import Counter
from pathlib import Path

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
from agentsd.processors.self_attention import AgentSDProcessor
from agentsd.testing import tiny_pipeline

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
MASK = Image.fromarray(np.tile((np.arange(64) > 32).astype(np.uint8) * 255, (64, 1)))
STEPS = 4
README = Path(__file__).parents[1] / "README.md"
MATRIX_MARKERS = ("<!-- compat-matrix:start -->", "<!-- compat-matrix:end -->")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def img2img():
    """StableDiffusionImg2ImgPipeline, strength 0.9"""
    return StableDiffusionImg2ImgPipeline(**tiny_pipeline("sd15").components), dict(image=IMAGE, strength=0.9)


def inpaint():
    """StableDiffusionInpaintPipeline, half the image masked"""
    return StableDiffusionInpaintPipeline(**tiny_pipeline("sd15").components), dict(image=IMAGE, mask_image=MASK)


def sdxl_img2img():
    """StableDiffusionXLImg2ImgPipeline, strength 0.9, `max_downsample=2`"""
    pipe = StableDiffusionXLImg2ImgPipeline(**tiny_pipeline("sdxl").components)
    return pipe, dict(image=IMAGE, strength=0.9)


def controlnet():
    """StableDiffusionControlNetPipeline with a ControlNet made from the UNet"""
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

    build.__doc__ = f"peft LoRA (rank 4) on q, k, v, out of every attention, {'fused' if fuse else 'not fused'}"
    return build


def tiny_image_encoder(projection_dim: int):
    """A tiny random CLIPVisionModelWithProjection (32 px images), as IP-Adapters load theirs."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=projection_dim,
        )
    )


def ip_adapter():
    """IP-Adapter through `load_ip_adapter` from a local folder, image prompt given

    The real loading path, offline: a tiny random `CLIPVisionModelWithProjection` saved as the
    folder's `image_encoder`, and an IP-Adapter weight file in the published layout
    (`image_proj.*` for the image projection, `ip_adapter.{i}.to_k_ip/to_v_ip` for the i-th
    processor when it is a cross-attention one) with small random weights. `load_ip_adapter`
    then does what it does with a downloaded adapter: loads the encoder, creates the feature
    extractor, puts `IPAdapterAttnProcessor2_0` on every `attn2` (new processor objects of the
    old classes on `attn1`) and the image projection on the UNet; the pipeline call encodes the
    image prompt. Only the weights differ from a real adapter.
    """
    from diffusers.models import attention_processor
    from safetensors.torch import save_file

    if not hasattr(attention_processor, "IPAdapterAttnProcessor2_0"):
        pytest.skip("this diffusers has no IP-Adapter support")
    pipe = tiny_pipeline("sd15")
    torch.manual_seed(3)
    image_dim, text_dim = 16, pipe.unet.config.cross_attention_dim
    encoder = tiny_image_encoder(image_dim)
    weights = {  # the image projection: 4 tokens of the text width from one image embedding
        "image_proj.proj.weight": 0.1 * torch.randn(4 * text_dim, image_dim),
        "image_proj.proj.bias": torch.zeros(4 * text_dim),
        "image_proj.norm.weight": torch.ones(text_dim),
        "image_proj.norm.bias": torch.zeros(text_dim),
    }
    for i, name in enumerate(pipe.unet.attn_processors):
        if name.endswith(".attn2.processor"):
            attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
            weights[f"ip_adapter.{i}.to_k_ip.weight"] = 0.1 * torch.randn_like(attn.to_k.weight)
            weights[f"ip_adapter.{i}.to_v_ip.weight"] = 0.1 * torch.randn_like(attn.to_v.weight)
    with tempfile.TemporaryDirectory() as folder:
        encoder.save_pretrained(Path(folder, "image_encoder"))
        save_file(weights, Path(folder, "ip-adapter.safetensors"))
        pipe.load_ip_adapter(folder, subfolder="", weight_name="ip-adapter.safetensors")
    cross = [p for n, p in pipe.unet.attn_processors.items() if n.endswith(".attn2.processor")]
    assert cross and all(isinstance(p, attention_processor.IPAdapterAttnProcessor2_0) for p in cross)
    return pipe, dict(ip_adapter_image=IMAGE)


def no_cfg():
    """guidance_scale=1: no classifier-free guidance, batch of 1"""
    return tiny_pipeline("sd15"), dict(guidance_scale=1.0)


CELLS = {
    "img2img": img2img,
    "inpaint": inpaint,
    "sdxl-img2img": sdxl_img2img,
    "controlnet": controlnet,
    "lora": lora(fuse=False),
    "lora-fused": lora(fuse=True),
    "ip-adapter": ip_adapter,
    "guidance-1": no_cfg,
}


def generate(pipe, extra):
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a red cube", num_inference_steps=STEPS, height=64, width=64, output_type="np")
    return pipe(generator=torch.Generator().manual_seed(0), **args, **extra).images


def check_patch_cycle(pipe, extra, **patch_args):
    """The cycle every cell runs (see the module docstring); returns the baseline."""
    before = dict(pipe.unet.attn_processors)
    baseline = generate(pipe, extra)
    # min_tokens=0: the tiny pipelines' grids (64 to 256 tokens) are small enough for a floor
    # on grid size to hand them all to the original processors, and these cells are about
    # agentsd acting next to other components, not about where it chooses to act.
    agentsd.patch(pipe, agent_steps=1.0, min_tokens=0, **patch_args)
    replaced = {name for name, p in pipe.unet.attn_processors.items() if p is not before[name]}
    assert replaced and all(name.endswith(".attn1.processor") for name in replaced)
    out = generate(pipe, extra)
    assert np.isfinite(out).all()
    assert not np.array_equal(out, baseline)
    agentsd.unpatch(pipe)
    assert all(pipe.unet.attn_processors[name] is p for name, p in before.items())
    assert np.array_equal(generate(pipe, extra), baseline)
    return baseline


@pytest.mark.parametrize("cell", list(CELLS))
def test_cell(cell):
    pipe, extra = CELLS[cell]()
    check_patch_cycle(pipe, extra, max_downsample=2 if "sdxl" in cell else 1)


def patched_layer_calls(pipe, extra):
    """Run once; how many times each patched self-attention layer ran, in module order."""
    calls = Counter()
    handles = [
        module.register_forward_pre_hook(lambda *_, name=name: calls.update([name]))
        for name, module in pipe.unet.named_modules()
        if isinstance(getattr(module, "processor", None), AgentSDProcessor)
    ]
    try:
        generate(pipe, extra)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def test_deepcache():
    """DeepCache (DeepCacheSDHelper) enabled first, agentsd patched on top, then both removed.

    The helper swaps `unet.forward` and every block's `forward` for caching wrappers (instance
    attributes). `nn.Module.__call__` still runs the UNet's forward pre-hooks before the wrapped
    forward, so agentsd's hook plans every call, and the attention processors are not DeepCache's
    business. `cache_branch_id=0` is the shallowest branch: on a cached step only `conv_in` and
    the last layer of the last up block are computed, and that layer is one agentsd patches in
    the tiny UNet (which has a self-attention there, as SD 1.5 has), so agent attention runs on
    cached steps too; the tiny UNet's two levels have no layout this branch id could miss.
    """
    deepcache = pytest.importorskip("DeepCache")
    pipe = tiny_pipeline("sd15")
    plain = generate(pipe, {})
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=0)
    helper.enable()
    deepcache_only = check_patch_cycle(pipe, {})
    assert not np.array_equal(deepcache_only, plain)  # the cache is in effect

    with agentsd.patched(pipe, agent_steps=1.0):
        calls = patched_layer_calls(pipe, {})
    *deep, shallow = calls  # the last patched layer in module order is on the shallow branch
    assert calls[shallow] == STEPS  # every step
    assert all(calls[name] == STEPS // 2 for name in deep)  # only the uncached steps 0, 2

    helper.disable()
    assert np.array_equal(generate(pipe, {}), plain)


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp16():
    """fp16 on CUDA: the half-precision CUDA kernels in both agentsd and the baseline."""
    check_patch_cycle(tiny_pipeline("sd15").to("cuda", torch.float16), {})


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda]), "cpu"])
def test_model_cpu_offload(device):
    """`enable_model_cpu_offload`: accelerate hooks wrap each model's forward and move the model
    to `device` for its call (fp16 on CUDA, where the UNet really travels). With `device="cpu"`
    (diffusers accepts it) the moves are no-ops but the hooks are the same, so CI checks that
    agentsd composes with them. After unpatching the offload is still in place."""
    pipe = tiny_pipeline("sd15")
    if device == "cuda":
        pipe.to(torch.float16)
    pipe.enable_model_cpu_offload(device=device)
    check_patch_cycle(pipe, {})
    assert hasattr(pipe.unet, "_hf_hook") and pipe.unet.device.type == "cpu"  # offloaded again


def test_readme_matrix_lists_every_cell():
    """scripts/compat_matrix.py writes the README's matrix from these tests; a cell or test added
    here without rerunning it fails this (no pipeline runs)."""
    start, end = MATRIX_MARKERS
    readme = README.read_text()
    rerun = "rerun python scripts/compat_matrix.py"
    assert readme.count(start) == 1 and readme.count(end) == 1, f"the README needs one of each marker; {rerun}"
    matrix = readme.split(start)[1].split(end)[0]
    rows = {line.split("|")[1].strip().strip("`") for line in matrix.splitlines() if line.startswith("| `")}
    assert set(CELLS) <= rows, f"cells missing from the README matrix: {set(CELLS) - rows}; {rerun}"
    tests = [name for name in globals() if name.startswith("test_") and name != "test_readme_matrix_lists_every_cell"]
    missing = [name for name in tests if f"test_compat.py::{name}" not in matrix]
    assert not missing, f"tests missing from the README matrix: {missing}; {rerun}"
