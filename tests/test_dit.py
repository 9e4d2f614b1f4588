"""agentsd on diffusion transformers (SD 3, SD 3.5, PixArt-Sigma): the patch cycle, the layers it
takes, the schedule over their schedulers, following processor changes, block ranges, compile."""

import copy
import inspect
import pickle
import threading

import numpy as np
import pytest
import torch
from reference import check_one_per_whole_cell
from test_reference import count_matchings

import agentsd
from agentsd.api.patch import PATCH_ATTR
from agentsd.api.status import recording_phases
from agentsd.processors.self_attention import AgentSDProcessor
from agentsd.testing import DIT_KINDS, tiny_pipeline

tiny_dit = pytest.importorskip("agentsd.testing.tiny_dit", reason="this diffusers has no SD3 or PixArt-Sigma")
from agentsd.processors.joint_attention import JointAgentSDProcessor  # noqa: E402 (after the skip)

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
    """Images of a square `size` (or of the `height` and `width` in `extra`, which overrides)."""
    pipe.set_progress_bar_config(disable=True)
    args = dict(num_inference_steps=steps, height=size, width=size, output_type="np", **tiny_dit.CALL_KWARGS[kind])
    return pipe("a red cube", generator=torch.Generator().manual_seed(seed), **{**args, **extra}).images


def transformer_call(kind, transformer, timestep, seed=0, **kwargs):
    """One call of a bare tiny transformer on a 16x16 patch grid (a 32x32 latent, batch 2), every
    input positional as the forward takes them (SD 3: hidden_states, encoder_hidden_states,
    pooled_projections, timestep; PixArt: hidden_states, encoder_hidden_states, timestep,
    added_cond_kwargs); `kwargs` go as keywords."""
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    latent = torch.randn(2, config.in_channels, 32, 32, generator=generator)
    t = torch.full((2,), float(timestep))
    if kind == "pixart":
        text = torch.randn(2, 16, config.caption_channels, generator=generator)
        args = (latent, text, t, {"resolution": None, "aspect_ratio": None})
    else:
        text = torch.randn(2, 16, config.joint_attention_dim, generator=generator)
        args = (latent, text, torch.randn(2, config.pooled_projection_dim, generator=generator), t)
    with torch.no_grad():
        return transformer(*args, **kwargs).sample


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


@pytest.mark.parametrize("kind", ["sd35", "pixart"])
def test_block_range_patches_only_those_blocks(kind, caplog):
    """`(start, stop)` as in `range`: (1, 2) is block 1, (0, 1) block 0 alone (the stop is left out
    inside the model too, not only at its end), (5, 9) none of the 2 blocks."""
    in_block = {i: {n for n in EXPECTED[kind][0] if n.startswith(f"transformer_blocks.{i}.")} for i in (0, 1)}
    pipe = agentsd.patch(tiny_pipeline(kind), block_range=(1, 2), **PATCH)
    assert set(patched_layers(pipe.transformer)) == in_block[1]
    agentsd.patch(pipe, block_range=(0, 1), **PATCH)
    assert set(patched_layers(pipe.transformer)) == in_block[0]
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


@pytest.mark.parametrize("kind", ["sd3", "pixart"])
def test_a_non_square_image_gives_its_rows_and_columns(kind):
    """128 px tall and 192 wide: a grid of 16 rows and 24 columns (the same token count as 24 x 16,
    which a transposed grid would keep, so only the geometry shows it): in `status`, in every
    layer's plan in both phases, and in the destinations, one per whole cell of that grid."""
    pipe = agentsd.patch(tiny_pipeline(kind), **PATCH)
    state = getattr(pipe.transformer, PATCH_ATTR).state
    calls = []
    pipe.transformer.register_forward_hook(lambda *_: calls.append(state.call))
    generate(pipe, kind, steps=3, height=128, width=192)
    assert {call.phase for call in calls} == {"agent", "tome"}
    for call in calls:
        assert call.latent_hw == (16, 24)
        for plan in call.plans.values():
            assert (plan.h, plan.w) == (16, 24)
            check_one_per_whole_cell(plan.dst, 16, 24, plan.sx, plan.sy)
    report = agentsd.status(pipe)
    assert report.latent == (16, 24) and {layer.grid for layer in report.layers} == {(16, 24)}


@pytest.mark.parametrize("kind, position", [("sd3", 3), ("pixart", 2)])
def test_a_bare_transformer_reads_a_positional_timestep(kind, position):
    """The timestep passed in its place among the forward's positional arguments (after the
    latent, the text and, in SD 3, the pooled text) decides the phase: t = 999 agent, t = 100 ToMe."""
    transformer = agentsd.patch(tiny_pipeline(kind).transformer.eval(), **PATCH)
    forward = inspect.signature(type(transformer).forward).parameters
    assert list(forward).index("timestep") == position + 1  # after self
    for timestep, phase in ((999, "agent"), (100, "tome")):
        transformer_call(kind, transformer, timestep)
        assert agentsd.current_phase(transformer) == phase, timestep


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_a_compiled_transformer_and_a_pipeline_holding_one_are_patched(kind):
    """torch.compile wraps the model (its `_orig_mod`): given the compiled model, or a pipeline
    holding it, agentsd finds the family and patches the model's own layers. (Nothing is compiled
    here: test_compiled_transformer_matches_eager_without_recompiling runs a compiled one.)"""
    names, processor = EXPECTED[kind]
    pipe = tiny_pipeline(kind)
    transformer = pipe.transformer
    compiled = torch.compile(transformer, backend="eager")
    agentsd.patch(compiled, **PATCH)
    assert patched_layers(transformer) == dict.fromkeys(names, processor)
    assert agentsd.is_patched(compiled) and agentsd.patched_config(compiled).min_tokens == 0
    agentsd.unpatch(compiled)
    assert not patched_layers(transformer)
    pipe.transformer = compiled
    agentsd.patch(pipe, **PATCH)
    assert patched_layers(transformer) == dict.fromkeys(names, processor) and agentsd.is_patched(pipe)
    agentsd.unpatch(pipe)
    assert not patched_layers(transformer) and not agentsd.is_patched(pipe)


def test_a_stale_processor_set_back_after_unpatch_runs_the_original():
    """An agentsd processor kept from the patched model and set back by hand after `unpatch` finds
    this thread's last plan (the patched model's last call, at the same size) still there: it must
    not act on it, only hand every call to the processor it wraps, so the images are unpatched."""
    pipe = agentsd.patch(tiny_pipeline("sd3"), **PATCH)
    generate(pipe, "sd3")
    stale = dict(pipe.transformer.attn_processors)
    assert set(patched_layers(pipe.transformer)) == {n.removesuffix(".processor") for n in stale}
    agentsd.unpatch(pipe)
    baseline = generate(pipe, "sd3")
    pipe.transformer.set_attn_processor(stale)
    assert np.array_equal(generate(pipe, "sd3"), baseline)


@pytest.mark.parametrize("share", [False, True], ids=["default", "share_matching"])
@pytest.mark.parametrize("kind", ["sd35", "pixart"])
def test_one_matching_per_layer_and_call_or_per_grid_when_shared(kind, share, monkeypatch):
    """Every patched layer matches its own input once per model call (agents in the agent phase,
    the ToMe merge in the ToMe phase); with `share_matching` the call's one grid is matched once,
    in its first layer."""
    calls = count_matchings(monkeypatch)
    transformer = agentsd.patch(tiny_pipeline(kind).transformer.eval(), share_matching=share, **PATCH)
    for timestep in (999, 100, 999):
        calls.clear()
        transformer_call(kind, transformer, timestep)
        assert len(calls) == (1 if share else len(EXPECTED[kind][0])), timestep


MASKED = "called with a mask or temb"  # the reason a masked joint call is handed over


def joint_processor_recording_masks():
    """A JointAttnProcessor2_0 (which ignores masks) that records the mask of every call it gets."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class Recording(JointAttnProcessor2_0):
        def __init__(self):
            super().__init__()
            self.masks = []

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
            self.masks.append(attention_mask)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    return Recording()


def test_a_masked_joint_call_goes_to_the_original_processor():
    """agentsd's joint attention takes no mask: a call given one (through the pipeline's
    `joint_attention_kwargs`) goes, mask and all, to the processor agentsd wraps, in every layer
    (SD 3.5's image-only attn2 too); the images are that processor's and `status` says why."""
    pipe = tiny_pipeline("sd35")
    original = joint_processor_recording_masks()
    pipe.transformer.set_attn_processor(original)
    mask = torch.zeros(2, 1, 1, 256 + 77 + 16)  # additive: it would hide nothing
    masked = dict(joint_attention_kwargs={"attention_mask": mask}, steps=2)
    baseline = generate(pipe, "sd35", **masked)
    agentsd.patch(pipe, agent_steps=1.0, **PATCH)
    original.masks.clear()
    assert np.array_equal(generate(pipe, "sd35", **masked), baseline)
    assert len(original.masks) == 2 * 3 and all(m is mask for m in original.masks)  # 2 steps, 3 layers
    report = agentsd.status(pipe)
    assert {(layer.mode, layer.reason) for layer in report.layers} == {("exact", MASKED)}
    assert not report.activity.ran_agent_attention
    generate(pipe, "sd35", steps=2)  # unmasked: agent attention
    assert {(layer.mode, layer.reason) for layer in agentsd.status(pipe).layers} == {("agent", None)}


def test_a_hand_over_in_one_thread_stays_in_that_threads_call():
    """Two threads on one patched SD 3 transformer, in this order: A plans its call, whose mask
    makes its layers hand it over; A's first layer waits (in the processor it is handed to) until
    B has planned its own, unmasked call; then both run. A's later hand-overs thus come while B's
    call is the latest: each must go to A's own call. Each thread's `status` shows its own call
    (A: exact, for the mask; B: agent attention), each gets what it gets alone, and the counters
    hold one exact and one agent call per layer."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    a_waits, b_planned = threading.Event(), threading.Event()

    class Gate(JointAttnProcessor2_0):
        """Holds thread A's first handed-over layer until thread B has planned its call."""

        def __call__(self, *args, **kwargs):
            a_waits.set()
            assert b_planned.wait(timeout=60), "thread B never planned its call"
            return super().__call__(*args, **kwargs)

    transformer = tiny_pipeline("sd3").transformer.eval()
    mask = {"joint_attention_kwargs": {"attention_mask": torch.zeros(2, 1, 1, 256 + 16)}}
    expected = {"a": transformer_call("sd3", transformer, 999, seed=1, **mask)}  # the original processor's
    with agentsd.patched(transformer, **PATCH):
        expected["b"] = transformer_call("sd3", transformer, 999, seed=2)  # agentsd alone
    transformer.set_attn_processor(Gate())
    agentsd.patch(transformer, **PATCH)

    def planned(*_):  # a pre-hook after agentsd's, which has planned the call by then
        if threading.current_thread().name == "b":
            b_planned.set()

    transformer.register_forward_pre_hook(planned)
    both_called = threading.Barrier(2, timeout=60)
    results, errors = {}, []

    def run(name, seed, kwargs):
        try:
            if name == "b":
                assert a_waits.wait(timeout=60), "thread A never reached its first layer"
            out = transformer_call("sd3", transformer, 999, seed=seed, **kwargs)
            both_called.wait()  # both calls made before either reads its status
            results[name] = out, agentsd.status(transformer)
        except Exception as err:  # reported below
            both_called.abort()
            errors.append((name, err))

    threads = [threading.Thread(target=run, args=a, name=a[0]) for a in (("a", 1, mask), ("b", 2, {}))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for name, mode, reason in (("a", "exact", MASKED), ("b", "agent", None)):
        out, report = results[name]
        assert torch.equal(out, expected[name]), name
        assert {(layer.mode, layer.reason) for layer in report.layers} == {(mode, reason)}, name
    activity = agentsd.status(transformer).activity
    assert activity.phase_calls == {"agent": 2} and activity.acting_calls == {"agent": 1}
    names = {f"{name}.processor" for name in EXPECTED["sd3"][0]}
    assert activity.layer_calls == dict.fromkeys(names, {"exact": 1, "agent": 1})


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


@pytest.mark.parametrize("kind", ["sd3", "pixart"])
def test_a_patched_transformer_deep_copies_and_pickles(kind):
    """A deep copy and a pickled-and-loaded copy are patched transformers of their own: the same
    images (within rounding: the weights live elsewhere now), and they unpatch to the baseline."""
    pipe = tiny_pipeline(kind)
    baseline = generate(pipe, kind)
    agentsd.patch(pipe, **PATCH, agent_steps=0.5)
    patched = generate(pipe, kind)
    for twin in (copy.deepcopy(pipe.transformer), pickle.loads(pickle.dumps(pipe.transformer))):
        other = type(pipe)(**{**pipe.components, "transformer": twin})
        assert agentsd.is_patched(other) and twin is not pipe.transformer
        assert np.abs(generate(other, kind) - patched).max() < 1e-5
        assert np.abs(generate(agentsd.unpatch(other), kind) - baseline).max() < 1e-5
    assert np.array_equal(generate(pipe, kind), patched)  # the original is still patched, untouched
