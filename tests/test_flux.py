"""agentsd on Flux (tiny FluxPipeline and the pipelines built on it): the patch cycle, the layers
it takes, the grid and text length read from the call, the schedule over Flux's shifted sigmas,
following processor changes, the dispatcher's backend, compile, odd sizes."""

import copy
import pickle

import numpy as np
import pytest
import torch
from reloading import assert_images_close, assert_same_components

import agentsd
from agentsd.api.patch import PATCH_ATTR
from agentsd.api.status import recording_phases
from agentsd.testing import tiny_pipeline

tiny_flux = pytest.importorskip("agentsd.testing.tiny_flux", reason="this diffusers has no Flux")
flux = pytest.importorskip("agentsd.processors.flux_attention")
if flux.flux_attention_class() is None:
    pytest.skip("agentsd patches Flux from diffusers 0.35 (FluxAttention)", allow_module_level=True)
FluxAgentSDProcessor = flux.FluxAgentSDProcessor

PATCH = dict(min_tokens=0)  # the tiny grid (16x16 at 128 px) is at the default floor: act anyway
LAYERS = {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"}


def generate(pipe, kind="flux", steps=3, height=128, width=128, seed=0, **extra):
    pipe.set_progress_bar_config(disable=True)
    args = dict(num_inference_steps=steps, height=height, width=width, output_type="np", **tiny_flux.CALL_KWARGS[kind])
    return pipe(prompt="a red cube", generator=torch.Generator().manual_seed(seed), **args, **extra).images


def patched_layers(model):
    processors = model.attn_processors.items()
    return {n.removesuffix(".processor") for n, p in processors if isinstance(p, FluxAgentSDProcessor)}


def test_patch_cycle_on_the_pipeline():
    pipe = tiny_pipeline("flux")
    before = dict(pipe.transformer.attn_processors)
    baseline = generate(pipe)
    agentsd.patch(pipe, **PATCH)
    assert patched_layers(pipe.transformer) == LAYERS
    patched = generate(pipe)
    assert np.isfinite(patched).all() and not np.array_equal(patched, baseline)
    report = agentsd.status(pipe)
    assert agentsd.is_patched(pipe) and report.activity.calls == 3
    assert report.activity.ran_agent_attention and report.latent == (16, 16)  # the packed grid
    assert {layer.mode for layer in report.layers} == {"tome"}  # the last of 3 steps: sigma < 0.6
    agentsd.unpatch(pipe)
    assert np.array_equal(generate(pipe), baseline)
    assert all(pipe.transformer.attn_processors[n] is p for n, p in before.items())
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks


def test_the_grid_and_text_length_come_from_the_call():
    """128 wide x 192 tall: a 24x16 grid from img_ids; the single-stream layers take the text
    length from encoder_hidden_states (16 T5 tokens), so their 16 + 384 tokens fit the plan."""
    pipe = agentsd.patch(tiny_pipeline("flux"), **PATCH)
    generate(pipe, height=192, width=128, steps=2)
    report = agentsd.status(pipe)
    assert report.latent == (24, 16) and report.activity.ran_agent_attention
    assert not [layer for layer in report.layers if layer.reason]
    assert getattr(pipe.transformer, PATCH_ATTR).state.latest.sequence.text == 16


def test_the_phase_follows_flux_shifted_sigmas():
    """Flux passes sigma (t / 1000, shifted by the image's token count): agent phase while
    1 - sigma < 0.4, as for SD 3."""
    pipe = agentsd.patch(tiny_pipeline("flux"), **PATCH)
    sigmas = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: sigmas.append(float(kwargs["timestep"].flatten()[0])), with_kwargs=True
    )
    with recording_phases(pipe) as phases:
        generate(pipe, steps=6)
    assert all(0 < s <= 1 for s in sigmas)
    assert phases == ["agent" if 1 - s < 0.4 else "tome" for s in sigmas]
    assert phases[0] == "agent" and phases[-1] == "tome" and phases == sorted(phases)


def test_block_range_counts_double_then_single_blocks(caplog):
    pipe = agentsd.patch(tiny_pipeline("flux"), block_range=(0, 1), **PATCH)
    assert patched_layers(pipe.transformer) == {"transformer_blocks.0.attn"}
    agentsd.patch(pipe, block_range=(1, 3), **PATCH)
    assert patched_layers(pipe.transformer) == {"single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"}
    with caplog.at_level("WARNING", logger="agentsd"):
        agentsd.patch(pipe, block_range=(5, 9))
    assert "selects none of this transformer's 3 blocks" in caplog.text
    assert not patched_layers(pipe.transformer)


def test_a_bare_transformer_and_a_saved_pipeline(tmp_path):
    """Patched as a bare transformer, unpatched, saved: the folder holds the plain model (its
    weights bit for bit; its images to rounding, see reloading.py), which patches as the original."""
    from diffusers import FluxPipeline

    pipe = tiny_pipeline("flux")
    baseline = generate(pipe)
    agentsd.patch(pipe.transformer, **PATCH)  # no scheduler: t / 1000 * 1000 is in [0, 1000]
    assert agentsd.is_patched(pipe) and not np.array_equal(generate(pipe), baseline)
    assert agentsd.status(pipe).activity.ran_agent_attention
    agentsd.unpatch(pipe)
    assert np.array_equal(generate(pipe), baseline)
    pipe.save_pretrained(tmp_path / "tiny-flux")
    loaded = FluxPipeline.from_pretrained(tmp_path / "tiny-flux")
    assert_same_components(loaded, pipe)
    assert_images_close(generate(loaded), baseline)
    with agentsd.patched(loaded, **PATCH):
        assert patched_layers(loaded.transformer) == LAYERS and np.isfinite(generate(loaded)).all()


def test_follows_processor_changes_fused_projections_and_the_backend():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    pipe = agentsd.patch(tiny_pipeline("flux"), **PATCH)
    patched = generate(pipe)
    pipe.transformer.set_attn_processor(FluxAttnProcessor())
    assert not patched_layers(pipe.transformer)
    assert np.array_equal(generate(pipe), patched)  # wrapped again at the first call
    used = []
    pipe.transformer.fuse_qkv_projections()
    for module in pipe.transformer.modules():
        for name in ("to_qkv", "to_added_qkv"):
            if getattr(module, name, None) is not None:
                getattr(module, name).register_forward_hook(lambda *_, n=name: used.append(n))
    fused = generate(pipe)
    assert {"to_qkv", "to_added_qkv"} <= set(used)
    assert np.allclose(fused, patched, atol=1e-5)
    pipe.transformer.unfuse_qkv_projections()
    assert np.array_equal(generate(pipe), patched)
    # The dispatcher's backend set on the model reaches agentsd's attention calls.
    pipe.transformer.set_attention_backend("native")
    kernels = {layer.backend for layer in agentsd.status(pipe).layers}
    assert kernels == {"dispatch:native"}
    assert np.allclose(generate(pipe), patched, atol=1e-5)


def test_other_processors_are_handed_every_call():
    """A processor agentsd does not know (IP-Adapter's, a custom one) runs as it is."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class Custom(FluxAttnProcessor):
        pass

    pipe = tiny_pipeline("flux")
    pipe.transformer.set_attn_processor(Custom())
    baseline = generate(pipe)
    agentsd.patch(pipe, **PATCH)
    assert np.array_equal(generate(pipe), baseline)
    reasons = {layer.reason for layer in agentsd.status(pipe).layers}
    assert reasons == {"served by Custom, which agentsd hands every call to"}


def test_lora_through_peft():
    pytest.importorskip("peft")
    from peft import LoraConfig

    pipe = tiny_pipeline("flux")
    pipe.transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "add_q_proj"]))
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    baseline = generate(pipe)
    agentsd.patch(pipe, **PATCH)
    patched = generate(pipe)
    assert np.isfinite(patched).all() and not np.array_equal(patched, baseline)
    assert agentsd.status(pipe).activity.ran_agent_attention
    agentsd.unpatch(pipe)
    assert np.array_equal(generate(pipe), baseline)


@pytest.mark.parametrize("repeated", [False, True], ids=["compile", "compile_repeated_blocks"])
def test_compiled_transformer_matches_eager_without_recompiling(repeated):
    torch._dynamo.reset()
    pipe = agentsd.patch(tiny_pipeline("flux"), **PATCH)
    eager = generate(pipe, steps=4)
    if repeated:
        if not hasattr(pipe.transformer, "compile_repeated_blocks"):
            pytest.skip("this diffusers has no compile_repeated_blocks")
        pipe.transformer.compile_repeated_blocks(backend="aot_eager")
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
    warm = generate(pipe, steps=4)  # both phases compile once
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = generate(pipe, steps=4)
    assert np.allclose(warm, eager, atol=1e-4) and np.allclose(again, eager, atol=1e-4)
    # Compiled, the processors still tell that they ran: no call is counted as skipped by a cache.
    assert agentsd.status(pipe).activity.cache_calls == {"computed": 12}


def _variant_inputs(variant):
    image = torch.rand(1, 3, 128, 128)
    if variant == "img2img":
        return dict(image=image, strength=0.9)
    if variant in ("inpaint", "fill"):
        mask = torch.zeros(1, 1, 128, 128)
        mask[..., 64:] = 1.0
        return dict(image=image, mask_image=mask) | ({"strength": 0.9} if variant == "inpaint" else {})
    if variant == "kontext":
        return dict(image=image)
    return dict(control_image=image, controlnet_conditioning_scale=0.7)


@pytest.mark.parametrize("variant", ["img2img", "inpaint", "kontext", "controlnet", "fill"])
def test_flux_pipelines_keep_the_patch_cycle(variant):
    """The Flux pipelines diffusers ships: agentsd acts in each and unpatches exactly. Kontext's
    reference-image tokens follow the grid and stay unmerged."""
    try:
        if variant == "fill":
            pipe, kind = tiny_pipeline("flux-fill"), "flux-fill"
        else:
            torch.manual_seed(1)
            pipe, kind = tiny_flux.tiny_flux_variant(tiny_pipeline("flux"), variant), f"flux-{variant}"
    except (AttributeError, ImportError) as err:
        pytest.skip(f"this diffusers lacks the {variant} pipeline: {err}")
    extra = _variant_inputs(variant)
    baseline = generate(pipe, kind, **extra)
    agentsd.patch(pipe, **PATCH)
    patched = generate(pipe, kind, **extra)
    assert np.isfinite(patched).all() and not np.array_equal(patched, baseline)
    report = agentsd.status(pipe)
    assert report.activity.ran_agent_attention and report.latent == (16, 16)
    assert not [layer for layer in report.layers if layer.reason]  # every layer acted
    agentsd.unpatch(pipe)
    assert np.array_equal(generate(pipe, kind, **extra), baseline)


@pytest.mark.parametrize("height, width", [(136, 128), (128, 200), (64, 64)])
def test_odd_and_small_grids(height, width):
    """17x16 and 16x25 grids leave partial cells unmerged; 64 px (8x8 = 64 tokens) is under the
    default min_tokens and runs exact attention, saying why."""
    pipe = tiny_pipeline("flux")
    if height == 64:
        agentsd.patch(pipe)
        with agentsd.unpatched(pipe):
            expected = generate(pipe, height=height, width=width)
        assert np.array_equal(generate(pipe, height=height, width=width), expected)
        assert {layer.reason for layer in agentsd.status(pipe).layers} == {"grid 8x8 = 64 tokens < min_tokens=256"}
        return
    agentsd.patch(pipe, **PATCH)
    assert np.isfinite(generate(pipe, height=height, width=width)).all()
    report = agentsd.status(pipe)
    assert report.latent == (height // 8, width // 8) and report.activity.ran_agent_attention


def test_img_ids_that_are_not_a_grid_run_exact_attention():
    pipe = tiny_pipeline("flux")
    transformer = pipe.transformer
    inputs = dict(
        hidden_states=torch.randn(1, 256, 64),
        encoder_hidden_states=torch.randn(1, 16, tiny_flux.T5_WIDTH),
        pooled_projections=torch.randn(1, 32),
        timestep=torch.tensor([1.0]),
        txt_ids=torch.zeros(16, 3),
        guidance=torch.tensor([3.5]),
    )
    ids = torch.stack(
        [torch.zeros(256), torch.arange(16).repeat_interleave(16).float(), torch.arange(16).repeat(16).float()], 1
    )
    shuffled = ids[torch.randperm(256, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        expected = transformer(**inputs, img_ids=shuffled).sample
        agentsd.patch(pipe, **PATCH)
        assert torch.equal(transformer(**inputs, img_ids=shuffled).sample, expected)
        reasons = {layer.reason for layer in agentsd.status(pipe).layers}
        assert reasons == {"the image's 256 img_ids are not a row-major grid from (0, 0)"}
        transformer(**inputs, img_ids=ids)
        assert agentsd.status(pipe).activity.ran_agent_attention


def test_copies_and_pickles_generate_what_the_original_does():
    pipe = agentsd.patch(tiny_pipeline("flux"), **PATCH)
    expected = generate(pipe)
    for transformer in (copy.deepcopy(pipe.transformer), pickle.loads(pickle.dumps(pipe.transformer))):
        other = tiny_pipeline("flux")
        other.transformer = transformer
        assert agentsd.is_patched(other)
        assert np.array_equal(generate(other), expected)


def test_a_diffusers_without_flux_attention_is_refused_and_nothing_changes(monkeypatch):
    """diffusers before 0.35 builds Flux without FluxAttention: refused, with the fix."""
    from agentsd.families import flux as family

    pipe = tiny_pipeline("flux")
    before = dict(pipe.transformer.attn_processors)
    monkeypatch.setattr(family, "flux_attention_class", lambda: None)
    with pytest.raises(TypeError, match=r"FluxAttention \(diffusers 0.35 and later\).*pip install -U diffusers"):
        agentsd.patch(pipe)
    assert not agentsd.is_patched(pipe) and not pipe.transformer._forward_pre_hooks
    assert all(pipe.transformer.attn_processors[n] is p for n, p in before.items())
