"""agentsd on diffusion transformers (SD 3, SD 3.5, PixArt-Sigma): the patch cycle, the layers it
takes, the schedule over their schedulers, following processor changes, block ranges, compile."""

import numpy as np
import pytest
import torch

import agentsd
from agentsd.processor import AgentSDProcessor
from agentsd.status import recording_phases
from agentsd.testing import DIT_KINDS, tiny_pipeline

tiny_dit = pytest.importorskip("agentsd.tiny_dit", reason="this diffusers has no SD3 or PixArt-Sigma")
from agentsd.joint import JointAgentSDProcessor  # noqa: E402 (after the skip)

PATCH = dict(min_tokens=0)  # the tiny grids (16x16 at 128 px) are at the default floor: act anyway
# The layers agentsd takes: every block's joint attention (and SD 3.5's image-only attn2), and
# PixArt's self-attention; never PixArt's cross-attention.
BLOCKS = ("transformer_blocks.0", "transformer_blocks.1")
EXPECTED = {
    "sd3": ({f"{b}.attn" for b in BLOCKS}, JointAgentSDProcessor),
    "sd35": ({f"{b}.attn" for b in BLOCKS} | {"transformer_blocks.0.attn2"}, JointAgentSDProcessor),
    "pixart": ({f"{b}.attn1" for b in BLOCKS}, AgentSDProcessor),
}


def generate(pipe, kind, steps=3, size=128, seed=0, **extra):
    pipe.set_progress_bar_config(disable=True)
    args = dict(num_inference_steps=steps, height=size, width=size, output_type="np", **tiny_dit.CALL_KWARGS[kind])
    return pipe("a red cube", generator=torch.Generator().manual_seed(seed), **args, **extra).images


def patched_layers(model):
    return {
        n.removesuffix(".processor"): type(p)
        for n, p in model.attn_processors.items()
        if isinstance(p, AgentSDProcessor)
    }


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_patch_cycle_on_the_pipeline(kind):
    pipe = tiny_pipeline(kind)
    before = dict(pipe.transformer.attn_processors)
    baseline = generate(pipe, kind)
    agentsd.patch(pipe, **PATCH)
    names, processor = EXPECTED[kind]
    assert patched_layers(pipe.transformer) == dict.fromkeys(names, processor)
    assert all(  # every other processor is the same object
        p is before[n] for n, p in pipe.transformer.attn_processors.items() if n.removesuffix(".processor") not in names
    )
    patched = generate(pipe, kind)
    assert np.isfinite(patched).all() and not np.array_equal(patched, baseline)
    report = agentsd.status(pipe)
    assert agentsd.is_patched(pipe) and report.activity.calls == 3
    assert report.activity.ran_agent_attention and report.latent == (16, 16)  # the patch grid
    agentsd.unpatch(pipe)
    assert np.array_equal(generate(pipe, kind), baseline)
    assert all(pipe.transformer.attn_processors[n] is p for n, p in before.items())
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_the_phase_follows_the_schedulers_timesteps(kind):
    """SD3's flow matching passes t = 1000 sigma (shift 3: 1000, 858, 602, 9 over 4 steps), PixArt
    DPM-Solver's training timesteps: agent phase while 1 - t / 1000 < 0.4."""
    pipe = agentsd.patch(tiny_pipeline(kind), **PATCH)
    timesteps = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: timesteps.append(float(kwargs["timestep"].flatten()[0])), with_kwargs=True
    )
    with recording_phases(pipe) as phases:
        generate(pipe, kind, steps=4)
    assert phases == ["agent" if 1 - t / 1000 < 0.4 else "tome" for t in timesteps]
    assert phases[0] == "agent" and phases[-1] == "tome"


def _flow_schedulers():
    import diffusers

    names = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
    return [pytest.param(name, id=name) for name in names if hasattr(diffusers, name)]


@pytest.mark.parametrize("name", _flow_schedulers())
def test_every_flow_matching_scheduler_of_sd3(name):
    import diffusers

    pipe = tiny_pipeline("sd3")
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    agentsd.patch(pipe, **PATCH)
    timesteps = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: timesteps.append(float(kwargs["timestep"].flatten()[0])), with_kwargs=True
    )
    with recording_phases(pipe) as phases:
        generate(pipe, "sd3", steps=6)
    assert phases == ["agent" if 1 - t / 1000 < 0.4 else "tome" for t in timesteps]
    assert phases[0] == "agent" and phases[-1] == "tome" and phases == sorted(phases)


def test_block_range_patches_only_those_blocks(caplog):
    pipe = agentsd.patch(tiny_pipeline("sd35"), block_range=(1, 2), **PATCH)
    assert set(patched_layers(pipe.transformer)) == {"transformer_blocks.1.attn"}
    with caplog.at_level("WARNING", logger="agentsd"):
        agentsd.patch(pipe, block_range=(5, 9))
    assert "block_range=(5, 9) selects none of this transformer's 2 blocks" in caplog.text
    assert not patched_layers(pipe.transformer) and not agentsd.is_patched(pipe)


def test_a_bare_transformer_is_patched_too():
    pipe = tiny_pipeline("sd3")
    baseline = generate(pipe, "sd3")
    agentsd.patch(pipe.transformer, **PATCH)
    assert agentsd.is_patched(pipe) and not np.array_equal(generate(pipe, "sd3"), baseline)
    agentsd.unpatch(pipe)
    assert np.array_equal(generate(pipe, "sd3"), baseline)


def test_from_pretrained_folder(tmp_path):
    from diffusers import DiffusionPipeline

    tiny_pipeline("sd35").save_pretrained(tmp_path / "tiny-sd35")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "tiny-sd35")
    with agentsd.patched(pipe, **PATCH):
        assert patched_layers(pipe.transformer).keys() == EXPECTED["sd35"][0]
        assert np.isfinite(generate(pipe, "sd35")).all()


def test_sd3_follows_processor_changes_and_fused_projections():
    """After patching: a new processor set by hand is wrapped at the next call; fused QKV
    projections give the same images as the unfused ones (agentsd projects with to_qkv and
    to_added_qkv then), and unfusing brings the unfused processors back."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    pipe = agentsd.patch(tiny_pipeline("sd35"), **PATCH)
    patched = generate(pipe, "sd35")
    pipe.transformer.set_attn_processor(JointAttnProcessor2_0())
    assert not patched_layers(pipe.transformer)
    assert np.array_equal(generate(pipe, "sd35"), patched)  # wrapped again at the first call
    used = []
    pipe.transformer.fuse_qkv_projections()
    for module in pipe.transformer.modules():
        for name in ("to_qkv", "to_added_qkv"):
            if getattr(module, name, None) is not None:
                getattr(module, name).register_forward_hook(lambda *_, n=name: used.append(n))
    fused = generate(pipe, "sd35")
    assert {"to_qkv", "to_added_qkv"} <= set(used)
    assert np.allclose(fused, patched, atol=1e-5)
    pipe.transformer.unfuse_qkv_projections()
    assert np.array_equal(generate(pipe, "sd35"), patched)
    agentsd.unpatch(pipe)
    assert not any(isinstance(p, AgentSDProcessor) for p in pipe.transformer.attn_processors.values())


def test_lora_through_peft_on_sd3():
    pytest.importorskip("peft")
    from peft import LoraConfig

    pipe = tiny_pipeline("sd3")
    pipe.transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "add_q_proj"]))
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    baseline = generate(pipe, "sd3")
    agentsd.patch(pipe, **PATCH)
    patched = generate(pipe, "sd3")
    assert np.isfinite(patched).all() and not np.array_equal(patched, baseline)
    agentsd.unpatch(pipe)
    assert np.array_equal(generate(pipe, "sd3"), baseline)


@pytest.mark.parametrize("kind", ["sd35", "pixart"])
def test_compiled_transformer_matches_eager_without_recompiling(kind):
    torch._dynamo.reset()
    pipe = tiny_pipeline(kind)
    transformer = pipe.transformer
    agentsd.patch(pipe, **PATCH)
    eager = generate(pipe, kind, steps=4)
    pipe.transformer = torch.compile(transformer, backend="aot_eager")
    warm = generate(pipe, kind, steps=4)  # both phases compile once
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = generate(pipe, kind, steps=4)
    assert np.allclose(warm, eager, atol=1e-4) and np.allclose(again, eager, atol=1e-4)


def _variant(name):
    import diffusers

    return getattr(diffusers, name, None)


@pytest.mark.parametrize(
    "variant",
    ["StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline", "StableDiffusion3ControlNetPipeline"],
)
def test_sd3_img2img_inpaint_and_controlnet(variant):
    """The SD 3 variants share the transformer: the patch cycle holds for each."""
    cls = _variant(variant)
    if cls is None:
        pytest.skip(f"this diffusers has no {variant}")
    base = tiny_pipeline("sd3")
    components = dict(base.components)
    image = torch.rand(1, 3, 128, 128)
    extra = {}
    if variant == "StableDiffusion3ControlNetPipeline":
        from diffusers import SD3ControlNetModel

        torch.manual_seed(1)
        components["controlnet"] = SD3ControlNetModel.from_transformer(
            base.transformer, num_layers=1, num_extra_conditioning_channels=0
        )
        extra = dict(control_image=image, controlnet_conditioning_scale=0.7)
    else:
        extra = dict(image=image, strength=0.9)
        if variant == "StableDiffusion3InpaintPipeline":
            mask = torch.zeros(1, 1, 128, 128)
            mask[..., 64:] = 1.0
            extra["mask_image"] = mask
    expected, optional = cls._get_signature_keys(cls)
    pipe = cls(**{k: v for k, v in components.items() if k in {*expected, *optional}})
    baseline = generate(pipe, "sd3", steps=3, **extra)
    agentsd.patch(pipe, **PATCH)
    patched = generate(pipe, "sd3", steps=3, **extra)
    assert np.isfinite(patched).all() and not np.array_equal(patched, baseline)
    assert agentsd.status(pipe).activity.ran_agent_attention
    agentsd.unpatch(pipe)
    assert np.array_equal(generate(pipe, "sd3", steps=3, **extra), baseline)


def test_grids_under_min_tokens_run_exact_attention_and_say_why():
    pipe = agentsd.patch(tiny_pipeline("pixart"))  # default min_tokens=256; 64 px is an 8x8 grid
    baseline = agentsd.unpatched
    with baseline(pipe):
        expected = generate(pipe, "pixart", size=64)
    assert np.array_equal(generate(pipe, "pixart", size=64), expected)
    reasons = {layer.reason for layer in agentsd.status(pipe).layers}
    assert reasons == {"grid 8x8 = 64 tokens < min_tokens=256"}


@pytest.mark.parametrize(
    "kind, size", [("sd15", "latent 16x16"), ("sd3", "token grid 16x16"), ("pixart", "token grid 16x16")]
)
def test_reports_name_what_the_size_is(kind, size, caplog):
    """A UNet's size is its latent's; a transformer's is its token grid (its latent is 32x32 there)."""
    pipe = agentsd.patch(tiny_pipeline(kind), min_tokens=10_000)
    pipe.set_progress_bar_config(disable=True)
    pixels, extra = (64, {}) if kind == "sd15" else (128, tiny_dit.CALL_KWARGS[kind])
    with caplog.at_level("WARNING", logger="agentsd"):
        pipe("a red cube", num_inference_steps=1, height=pixels, width=pixels, output_type="latent", **extra)
    assert f"latest call: {size}," in str(agentsd.status(pipe))
    warned = [r.getMessage() for r in caplog.records if "at this size" in r.getMessage()]
    assert len(warned) == 1 and f"({size})" in warned[0]
