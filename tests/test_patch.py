"""patch / unpatch on real (tiny) diffusers pipelines."""

import logging
import types

import diffusers
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

import agentsd
from agentsd.api.patch import PATCH_ATTR
from agentsd.processors.self_attention import AgentSDProcessor
from agentsd.testing import tiny_pipeline

# The tiny SDXL's first attention level is an 8x8 grid, under the default min_tokens floor.
PATCH_ARGS = {"sd15": {}, "sd2": {}, "sdxl": {"max_downsample": 2, "min_tokens": 0}}
EXPECTED_LAYERS = {
    "sd15": {"down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"},
    "sd2": {"down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"},
    "sdxl": {"down_blocks.1.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"},
}


def generate(pipe, steps=5, seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a red cube", num_inference_steps=steps, height=64, width=64, output_type="np")
    args.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(seed), **args).images


def patched_names(unet):
    return {name for name, p in unet.attn_processors.items() if isinstance(p, AgentSDProcessor)}


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_patch_changes_output_and_unpatch_restores_it_bit_for_bit(kind):
    pipe = tiny_pipeline(kind)
    baseline = generate(pipe)
    assert agentsd.patch(pipe, **PATCH_ARGS[kind]) is pipe
    assert agentsd.is_patched(pipe)
    prefixes = {name.split(".transformer_blocks")[0] for name in patched_names(pipe.unet)}
    assert prefixes == EXPECTED_LAYERS[kind]
    assert all(name.endswith("attn1.processor") for name in patched_names(pipe.unet))
    out = generate(pipe)
    assert np.isfinite(out).all()
    assert not np.array_equal(out, baseline)
    agentsd.unpatch(pipe)
    assert not agentsd.is_patched(pipe)
    assert np.array_equal(generate(pipe), baseline)


def test_only_selected_processors_change_and_unpatch_restores_the_same_objects():
    pipe = tiny_pipeline("sd15")
    before = dict(pipe.unet.attn_processors)
    agentsd.patch(pipe)
    during = pipe.unet.attn_processors
    changed = patched_names(pipe.unet)
    assert len(changed) == 3
    for name, processor in during.items():
        if name in changed:
            assert processor.original is before[name]
        else:
            assert processor is before[name]
    assert len(pipe.unet._forward_pre_hooks) == 1
    agentsd.unpatch(pipe)
    assert all(pipe.unet.attn_processors[name] is p for name, p in before.items())
    assert len(pipe.unet._forward_pre_hooks) == 0
    assert not hasattr(pipe.unet, PATCH_ATTR)


def test_patching_twice_replaces_the_patch_without_chains():
    pipe = tiny_pipeline("sd15")
    before = dict(pipe.unet.attn_processors)
    agentsd.patch(pipe, ratio=0.3)
    agentsd.patch(pipe.unet, ratio=0.5)
    assert len(pipe.unet._forward_pre_hooks) == 1
    for name in patched_names(pipe.unet):
        processor = pipe.unet.attn_processors[name]
        assert processor.original is before[name]
        assert processor.state.config.ratio == 0.5
    agentsd.unpatch(pipe)
    agentsd.unpatch(pipe)  # unpatching an unpatched model is a no-op
    assert all(pipe.unet.attn_processors[name] is p for name, p in before.items())
    assert len(pipe.unet._forward_pre_hooks) == 0


def test_same_generator_gives_the_same_image_with_random_destinations():
    pipe = agentsd.patch(tiny_pipeline("sd15"), use_rand=True, agent_steps=1.0)
    first, second = generate(pipe, seed=3), generate(pipe, seed=3)
    assert np.array_equal(first, second)
    other_seed = agentsd.patch(pipe, use_rand=True, agent_steps=1.0, seed=1)
    assert not np.array_equal(generate(other_seed, seed=3), first)


def test_global_rng_state_is_neither_used_nor_consumed():
    pipe = agentsd.patch(tiny_pipeline("sd15"), agent_steps=1.0)
    torch.manual_seed(123)
    a = generate(pipe)
    after_a = torch.rand(1)
    torch.manual_seed(999)
    b = generate(pipe)
    assert np.array_equal(a, b)
    torch.manual_seed(123)
    torch.rand(1)  # the pipeline drew only from its own generators
    torch.manual_seed(123)
    generate(pipe)
    assert torch.equal(torch.rand(1), after_a)


def sana_transformer():
    """A diffusion transformer of a family agentsd does not patch."""
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        sample_size=8,
    )  # fmt: skip


@pytest.mark.parametrize(
    "model, message",
    [
        (lambda: AutoencoderKL(block_out_channels=(8,), norm_num_groups=8), "not support AutoencoderKL"),
        (lambda: torch.nn.Linear(2, 2), "not support Linear"),
        (lambda: types.SimpleNamespace(transformer=torch.nn.Linear(2, 2)), "holding a Linear as `transformer`"),
        (lambda: "runwayml/stable-diffusion-v1-5", "not support str"),
        pytest.param(
            sana_transformer,
            "not support SanaTransformer2DModel",
            marks=pytest.mark.skipif(not hasattr(diffusers, "SanaTransformer2DModel"), reason="no Sana here"),
        ),
    ],
)
def test_unsupported_models_raise_and_are_left_alone(model, message):
    obj = model()
    before = dict(obj.attn_processors) if hasattr(obj, "attn_processors") else None
    with pytest.raises(TypeError, match=message) as err:
        agentsd.patch(obj)
    for family in ("SD 1.x, 2.x, XL", "SD3Transformer2DModel", "PixArtTransformer2DModel", "FluxTransformer2DModel"):
        assert family in str(err.value)
    assert not agentsd.is_patched(obj)
    if before is not None:
        assert all(obj.attn_processors[k] is v for k, v in before.items())
        assert not obj._forward_pre_hooks


def test_bad_config_leaves_the_pipeline_unpatched():
    pipe = tiny_pipeline("sd15")
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match="AgentSDConfig.ratio"):
        agentsd.patch(pipe, ratio=1.5)
    with pytest.raises(TypeError, match="no field"):
        agentsd.patch(pipe, ratoi=0.5)
    with pytest.raises(TypeError, match="AgentSDConfig"):
        agentsd.patch(pipe, config={"ratio": 0.5})
    assert not agentsd.is_patched(pipe)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_xformers_backend_without_the_package_is_refused_at_patch_time(monkeypatch):
    """Refused by `patch`, not in the middle of the first UNet call; the pipeline stays as it was,
    an earlier patch included."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real(name, *a))
    pipe = agentsd.patch(tiny_pipeline("sd15"), ratio=0.5)
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match="pip install xformers"):
        agentsd.patch(pipe, attention_backend="xformers")
    assert agentsd.patched_config(pipe).ratio == 0.5
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_sdxl_with_max_downsample_1_warns_that_nothing_is_patched(caplog):
    pipe = tiny_pipeline("sdxl")
    with caplog.at_level(logging.WARNING, logger="agentsd"):
        agentsd.patch(pipe)
    assert "patched no layer" in caplog.text
    assert "max_downsample=2" in caplog.text
    assert not patched_names(pipe.unet)


def test_patched_context_manager_restores_what_was_there():
    pipe = tiny_pipeline("sd15")
    with agentsd.patched(pipe, ratio=0.5) as p:
        assert p is pipe and agentsd.patched_config(pipe).ratio == 0.5
    assert not agentsd.is_patched(pipe)
    agentsd.patch(pipe, ratio=0.2)
    with agentsd.patched(pipe, ratio=0.6):
        assert agentsd.patched_config(pipe).ratio == 0.6
    assert agentsd.patched_config(pipe).ratio == 0.2


class CountingProcessor(AttnProcessor2_0):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


def test_custom_processors_keep_serving_what_agentsd_does_not_handle():
    pipe = tiny_pipeline("sd15")
    baseline = generate(pipe, steps=3)
    counters = {name: CountingProcessor() for name in pipe.unet.attn_processors}
    pipe.unet.set_attn_processor(dict(counters))
    # agent_steps=0, late_ratio=0: every call is handed to the original processors.
    agentsd.patch(pipe, agent_steps=0.0, late_ratio=0.0)
    assert np.array_equal(generate(pipe, steps=3), baseline)
    unet_calls = 3  # one UNet call per step (classifier-free guidance batches both halves)
    assert all(c.calls == unet_calls for c in counters.values())
    agentsd.unpatch(pipe)
    assert all(pipe.unet.attn_processors[k] is v for k, v in counters.items())


def test_unpatch_keeps_a_processor_the_user_set_after_patching():
    pipe = agentsd.patch(tiny_pipeline("sd15"))
    name = sorted(patched_names(pipe.unet))[0]
    mine = AttnProcessor2_0()
    pipe.unet.set_attn_processor({**pipe.unet.attn_processors, name: mine})
    agentsd.unpatch(pipe)
    assert pipe.unet.attn_processors[name] is mine


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_finite(dtype):
    pipe = tiny_pipeline("sd2")
    for module in pipe.components.values():  # not pipe.to(dtype=): diffusers < 0.20 names it torch_dtype
        if isinstance(module, torch.nn.Module):
            module.to(dtype=dtype)
    baseline = generate(pipe, output_type="latent")
    assert torch.isfinite(torch.as_tensor(baseline)).all()
    agentsd.patch(pipe, agent_steps=0.5)
    out = torch.as_tensor(generate(pipe, output_type="latent"))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


def test_pipeline_loaded_with_from_pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_pipeline("sd15").save_pretrained(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    baseline = generate(pipe)
    with agentsd.patched(pipe, agent_steps=1.0):
        out = generate(pipe)
    assert np.isfinite(out).all() and not np.array_equal(out, baseline)
    assert np.array_equal(generate(pipe), baseline)


@pytest.mark.parametrize("size", [(72, 40), (56, 104)])
def test_sizes_that_strides_do_not_divide(size):
    pipe = agentsd.patch(tiny_pipeline("sd15"), agent_steps=1.0, min_tokens=0)  # 18x10 is 180 tokens
    out = generate(pipe, height=size[0], width=size[1], num_images_per_prompt=3)
    assert out.shape == (3, size[0], size[1], 3)
    assert np.isfinite(out).all()


def test_a_failure_in_the_middle_of_patch_leaves_the_pipeline_as_it_was(monkeypatch):
    from diffusers.models.attention_processor import Attention

    pipe = tiny_pipeline("sd15")
    before = dict(pipe.unet.attn_processors)
    real_set = Attention.set_processor
    calls = []

    def failing_second_time(self, processor):
        calls.append(processor)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        real_set(self, processor)

    monkeypatch.setattr(Attention, "set_processor", failing_second_time)
    with pytest.raises(RuntimeError, match="injected"):
        agentsd.patch(pipe)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    assert not pipe.unet._forward_pre_hooks and not agentsd.is_patched(pipe)

    # With an earlier patch in place, a failing re-patch keeps the earlier one.
    monkeypatch.setattr(Attention, "set_processor", real_set)
    agentsd.patch(pipe, ratio=0.3)
    patched_before = dict(pipe.unet.attn_processors)
    calls.clear()
    monkeypatch.setattr(Attention, "set_processor", failing_second_time)
    with pytest.raises(RuntimeError, match="injected"):
        agentsd.patch(pipe, ratio=0.5)
    monkeypatch.setattr(Attention, "set_processor", real_set)
    assert agentsd.patched_config(pipe).ratio == 0.3
    assert all(pipe.unet.attn_processors[k] is v for k, v in patched_before.items())
    assert len(pipe.unet._forward_pre_hooks) == 1
    agentsd.unpatch(pipe)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_a_unet_without_self_attention_layers_is_not_told_to_raise_max_downsample(caplog):
    """IF / Kandinsky / UnCLIP-style blocks attend without a transformer `attn1`: no level helps."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32, attention_head_dim=8,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="agentsd"):
        agentsd.patch(unet, max_downsample=8)
    assert "patched no layer" in caplog.text and "no self-attention layer agentsd can patch" in caplog.text
    assert "max_downsample" not in caplog.text


def test_a_call_handed_over_at_run_time_is_reported_as_exact():
    """One layer gets a token more than its grid (another patch on its block, say): it hands
    its call to the original processor, and `status` says so; the other layers act."""
    pipe = agentsd.patch(tiny_pipeline("sd15"), min_tokens=0)
    name = sorted(patched_names(pipe.unet))[0]
    module = pipe.unet.get_submodule(name.removesuffix(".processor"))
    module.register_forward_pre_hook(
        lambda m, args, kwargs: ((torch.cat([args[0], args[0][:, :1]], dim=1), *args[1:]), kwargs), with_kwargs=True
    )
    module.register_forward_hook(lambda m, args, out: out[:, :-1])
    generate(pipe, steps=1)
    report = agentsd.status(pipe)
    layers = {layer.name: layer for layer in report.layers}
    assert layers[name].mode == "exact" and "do not fit" in layers[name].reason
    assert report.activity.layer_calls[name] == {"exact": 1}
    assert all(layer.mode == "tome" for n, layer in layers.items() if n != name)  # one step: t = 1


def test_unpatch_right_after_processors_are_rebuilt_from_their_class():
    """`load_ip_adapter` rebuilds processors from their class with no arguments: an unbound
    agentsd processor; unpatching before any UNet call must remove those too."""
    pipe = agentsd.patch(tiny_pipeline("sd15"))
    rebuilt = {name: type(p)() for name, p in pipe.unet.attn_processors.items()}
    pipe.unet.set_attn_processor(rebuilt)
    assert any(isinstance(p, AgentSDProcessor) and p.state is None for p in pipe.unet.attn_processors.values())
    agentsd.unpatch(pipe)
    assert not any(isinstance(p, AgentSDProcessor) for p in pipe.unet.attn_processors.values())


def test_unpatch_after_the_unets_own_fuse_leaves_no_agentsd_processor_in_its_stash():
    unet = tiny_pipeline("sd15").unet
    if not hasattr(unet, "fuse_qkv_projections"):
        pytest.skip("this diffusers has no fuse_qkv_projections")
    agentsd.patch(unet)
    unet.fuse_qkv_projections()  # keeps the processors it replaces, agentsd's among them
    agentsd.unpatch(unet)
    assert not any(isinstance(p, AgentSDProcessor) for p in unet.original_attn_processors.values())
    unet.unfuse_qkv_projections()  # the UNet's own method: it puts the stash back
    assert not any(isinstance(p, AgentSDProcessor) for p in unet.attn_processors.values())


def test_running_unpatched_for_a_while_keeps_the_counters_and_the_phase():
    pipe = agentsd.patch(tiny_pipeline("sd15"), min_tokens=0)
    generate(pipe, steps=3)
    activity, phase = agentsd.status(pipe).activity, agentsd.current_phase(pipe)
    assert activity.calls == 3 and phase == "tome"
    with agentsd.unpatched(pipe):
        assert agentsd.current_phase(pipe) is None and not agentsd.is_patched(pipe)
        generate(pipe, steps=2)
    assert agentsd.status(pipe).activity == activity and agentsd.current_phase(pipe) == phase
    generate(pipe, steps=1)
    assert agentsd.status(pipe).activity.calls == 4


def test_the_activity_line_counts_in_words():
    from agentsd.api.status import Activity

    one = Activity({"agent": 1}, {"agent": 1}, {"layer": {"agent": 1}}, {}, "UNet")
    assert one.summary() == (
        "agentsd: 1 UNet call since patching (1 agent phase, 0 ToMe phase); agent attention on 1 call (1 of 1 layer)"
    )
    two = one + one
    assert (
        two.summary().startswith("agentsd: 2 UNet calls since patching")
        and "on 2 calls (1 of 1 layer)" in two.summary()
    )
