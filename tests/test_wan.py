"""agentsd on Wan (tiny WanPipeline): the patch cycle, the layers it takes, the video grid read from
the call and named by `status`, the schedule over Wan's flow-matching schedulers, Wan 2.2's two
experts under one patch, following processor changes (the dispatcher's backend, fused projections,
LoRA), compile, copies, threads, and the timestep per token of Wan 2.2 5B."""

import copy
import pickle
import threading

import numpy as np
import pytest
import torch

import agentsd
from agentsd.api.patch import PATCH_ATTR
from agentsd.api.presets import load_preset
from agentsd.api.status import recording_phases

tiny_wan = pytest.importorskip("agentsd.testing.tiny_wan", reason="this diffusers has no Wan")
wan = pytest.importorskip("agentsd.processors.wan_attention")
if wan.wan_attention_class() is None:
    pytest.skip("agentsd patches Wan from diffusers 0.35 (WanAttention)", allow_module_level=True)

PATCH = dict(min_tokens=0, st=2)
LAYERS = {"blocks.0.attn1", "blocks.1.attn1"}


def generate(pipe, steps=3, seed=0, **extra):
    pipe.set_progress_bar_config(disable=True)
    args = dict(num_inference_steps=steps, output_type="np", **tiny_wan.CALL_KWARGS["wan"]) | extra
    return pipe("a red cube", generator=torch.Generator().manual_seed(seed), **args).frames


def patched_layers(model):
    processors = model.attn_processors.items()
    return {n.removesuffix(".processor") for n, p in processors if isinstance(p, wan.WanAgentSDProcessor)}


def two_experts(seed=0):
    """Wan 2.2 A14B's layout: `transformer` for timesteps >= 875 (the noisiest), `transformer_2` after."""
    pipe = tiny_wan.tiny_wan_pipeline(seed)
    torch.manual_seed(seed + 1)
    return type(pipe)(**pipe.components | dict(transformer_2=tiny_wan.tiny_wan_transformer()), boundary_ratio=0.875)


def test_patch_cycle_and_the_video_grid_in_status():
    pipe = tiny_wan.tiny_wan_pipeline()
    before = dict(pipe.transformer.attn_processors)
    baseline = generate(pipe)
    agentsd.patch(pipe, load_preset("wan").replace(min_tokens=0))
    assert patched_layers(pipe.transformer) == LAYERS  # the self-attention only: attn2 stays Wan's
    patched = generate(pipe)
    assert np.isfinite(patched).all() and not np.array_equal(patched, baseline)
    report = agentsd.status(pipe)
    assert report.activity.calls == 6 and report.activity.ran_agent_attention  # 3 steps, with guidance
    assert report.latent == (5, 8, 8) and report.size == "token grid 5x8x8"  # frames x rows x columns
    assert "latest call: token grid 5x8x8" in str(report) and "grid 5x8x8" in str(report).splitlines()[2]
    agentsd.unpatch(pipe)
    assert np.array_equal(generate(pipe), baseline)
    assert all(pipe.transformer.attn_processors[n] is p for n, p in before.items())
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks


def test_the_grid_comes_from_the_call():
    """160 x 96 px and 9 frames: a 3 x 6 x 10 token grid (partial boxes on every side)."""
    pipe = agentsd.patch(tiny_wan.tiny_wan_pipeline(), **PATCH)
    frames = generate(pipe, height=96, width=160, num_frames=9)
    assert frames.shape == (1, 9, 96, 160, 3) and np.isfinite(frames).all()
    report = agentsd.status(pipe)
    assert report.latent == (3, 6, 10) and report.activity.ran_agent_attention
    assert {layer.grid for layer in report.layers} == {(3, 6, 10)}


def test_schedule_reads_the_flow_matching_scheduler():
    """Wan passes sigma * 1000: the agent phase is the steps with 1 - sigma < 0.4, computed here
    from the scheduler's own sigmas."""
    pipe = agentsd.patch(tiny_wan.tiny_wan_pipeline(), **PATCH, agent_steps=0.4)
    with recording_phases(pipe) as phases:
        generate(pipe, steps=6, guidance_scale=1.0)
    sigmas = pipe.scheduler.sigmas[:-1].tolist()
    assert phases == ["agent" if 1 - s < 0.4 else "tome" for s in sigmas]
    assert "agent" in phases and "tome" in phases


def test_unipc_with_flow_shift():
    """Wan's published scheduler: UniPC in flow-prediction mode with flow_shift."""
    from diffusers import UniPCMultistepScheduler

    pipe = tiny_wan.tiny_wan_pipeline()
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    agentsd.patch(pipe, **PATCH)
    with recording_phases(pipe) as phases:
        generate(pipe, steps=6, guidance_scale=1.0)
    pipe.scheduler.set_timesteps(6)
    expected = ["agent" if 1 - float(t) / 1000 < 0.4 else "tome" for t in pipe.scheduler.timesteps]
    assert phases == expected and "agent" in phases and "tome" in phases


def test_two_experts_share_one_patch_and_one_progress():
    pipe = two_experts()
    baseline = generate(pipe, steps=8, guidance_scale=1.0)
    agentsd.patch(pipe, **PATCH, agent_steps=0.4)
    assert patched_layers(pipe.transformer) == LAYERS and patched_layers(pipe.transformer_2) == LAYERS
    assert getattr(pipe.transformer, PATCH_ATTR) is getattr(pipe.transformer_2, PATCH_ATTR)
    calls = []
    hooks = [m.register_forward_hook(lambda *_, m=name: calls.append(m)) for name, m in
             (("high", pipe.transformer), ("low", pipe.transformer_2))]  # fmt: skip
    with recording_phases(pipe.transformer) as high, recording_phases(pipe.transformer_2) as low:
        patched = generate(pipe, steps=8, guidance_scale=1.0)
    for hook in hooks:
        hook.remove()
    assert np.isfinite(patched).all() and not np.array_equal(patched, baseline)
    pipe.scheduler.set_timesteps(8)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert calls == ["high" if t >= 875 else "low" for t in timesteps] and set(calls) == {"high", "low"}
    expected = ["agent" if 1 - t / 1000 < 0.4 else "tome" for t in timesteps]
    assert high + low == expected and "agent" in low  # the agent phase runs on past the hand-over
    report = agentsd.status(pipe)
    names = {layer.name.removesuffix(".processor") for layer in report.layers}
    assert names == LAYERS | {f"transformer_2.{n}" for n in LAYERS} and report.activity.calls == 8
    assert str(agentsd.status(pipe.transformer_2)) == str(report)  # either expert reports the one patch
    agentsd.unpatch(pipe.transformer_2)  # unpatching either expert removes the patch from both
    assert not agentsd.is_patched(pipe) and not patched_layers(pipe.transformer)
    assert not patched_layers(pipe.transformer_2)
    assert np.array_equal(generate(pipe, steps=8, guidance_scale=1.0), baseline)


def test_the_dispatcher_backend_is_the_users():
    """`set_attention_backend` after patching reaches Wan's processors and agentsd's calls alike."""
    pipe = agentsd.patch(tiny_wan.tiny_wan_pipeline(), **PATCH)
    default = generate(pipe)
    pipe.transformer.set_attention_backend("_native_math")
    assert {layer.backend for layer in agentsd.status(pipe).layers} == {"dispatch:_native_math"}
    assert np.allclose(generate(pipe), default, atol=1e-5)
    assert agentsd.status(pipe).activity.ran_agent_attention


def test_fused_projections_follow():
    pipe = agentsd.patch(tiny_wan.tiny_wan_pipeline(), **PATCH)
    expected = generate(pipe)
    pipe.transformer.fuse_qkv_projections()
    assert pipe.transformer.blocks[0].attn1.fused_projections
    assert np.allclose(generate(pipe), expected, atol=1e-5)
    pipe.transformer.unfuse_qkv_projections()
    assert np.allclose(generate(pipe), expected, atol=1e-5)
    assert agentsd.status(pipe).activity.ran_agent_attention


def test_lora_through_peft():
    pytest.importorskip("peft")
    from peft import LoraConfig

    pipe = tiny_wan.tiny_wan_pipeline()
    pipe.transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"]))
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
    pipe = agentsd.patch(tiny_wan.tiny_wan_pipeline(), **PATCH)
    eager = generate(pipe, steps=4)
    if repeated:
        pipe.transformer.compile_repeated_blocks(backend="aot_eager")
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
    warm = generate(pipe, steps=4)  # both phases compile once
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = generate(pipe, steps=4)
    assert np.allclose(warm, eager, atol=1e-4) and np.allclose(again, eager, atol=1e-4)
    assert agentsd.status(pipe).activity.phase_calls.keys() == {"agent", "tome"}


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_are_independent_patched_pipelines(how):
    pipe = agentsd.patch(tiny_wan.tiny_wan_pipeline(), **PATCH)
    expected = generate(pipe)
    other = copy.deepcopy(pipe) if how == "deepcopy" else pickle.loads(pickle.dumps(pipe))
    assert np.array_equal(generate(other), expected)
    agentsd.unpatch(other)
    assert agentsd.is_patched(pipe) and np.array_equal(generate(pipe), expected)


def test_concurrent_calls_get_what_they_would_alone():
    """diffusers' server pattern: a pipeline per request sharing the patched transformer, each with
    its own scheduler, tokenizer and VAE (Wan's causal VAE caches features in the module while it
    decodes: two decodes at once on one VAE interfere, patched or not), from two threads at once."""
    pipe = agentsd.patch(tiny_wan.tiny_wan_pipeline(), **PATCH)

    def request():
        own = dict(scheduler=pipe.scheduler.from_config(pipe.scheduler.config))
        own |= {name: copy.deepcopy(getattr(pipe, name)) for name in ("tokenizer", "vae")}
        return type(pipe)(**pipe.components | own)

    alone = {seed: generate(request(), seed=seed) for seed in (0, 1)}
    results = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, generate(request(), seed=s))) for s in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(results[s], alone[s]) for s in (0, 1))


def test_a_timestep_per_token_reads_the_frames_being_made():
    """Wan 2.2 5B's pipeline passes (batch, tokens) timesteps, 0 on a conditioning first frame: the
    call's progress is that of the largest."""
    transformer = tiny_wan.tiny_wan_transformer()
    agentsd.patch(transformer, **PATCH, agent_steps=0.4)
    latent, text = torch.randn(1, 16, 5, 16, 16), torch.randn(1, 16, tiny_wan.TEXT_WIDTH)
    per_token = torch.full((1, 320), 900.0)
    per_token[:, :64] = 0.0  # the first frame's tokens
    with torch.no_grad():
        transformer(latent, per_token, text)
    assert agentsd.current_phase(transformer) == "agent"  # progress 0.1, not 1.0


def test_a_pipeline_without_a_transformer_is_refused_clearly():
    pipe = tiny_wan.tiny_wan_pipeline()
    pipe.transformer = None
    with pytest.raises(TypeError, match="does not support WanPipeline"):
        agentsd.patch(pipe)


@pytest.mark.parametrize("kind", ["wan-i2v", "wan-v2v", "wan22-5b"])
def test_image_and_video_to_video_and_wan22_5b_keep_the_patch_cycle(kind):
    """Wan's other pipelines: agentsd acts on every layer (I2V's image keys stay in the exact
    cross-attention; 5B's timestep comes per token) and unpatches exactly."""
    from test_tiny_wan import generate as generate_kind

    pipe = tiny_wan.tiny_wan_pipeline(kind=kind)
    pipe.set_progress_bar_config(disable=True)
    baseline = generate_kind(pipe, kind)
    agentsd.patch(pipe, **PATCH)
    assert patched_layers(pipe.transformer) == LAYERS
    patched = generate_kind(pipe, kind)
    assert np.isfinite(patched).all() and not np.array_equal(patched, baseline)
    report = agentsd.status(pipe)
    assert report.activity.ran_agent_attention and report.latent == (5, 8, 8)
    assert not [layer for layer in report.layers if layer.reason]
    agentsd.unpatch(pipe)
    assert np.array_equal(generate_kind(pipe, kind), baseline)


@pytest.mark.parametrize(("frames", "ranks"), [(21, 2), (21, 4), (21, 8), (20, 4), (2, 8)])
def test_each_rank_sees_its_run_as_whole_frames_with_cut_frames_around(frames, ranks):
    """Wan 2.1 480p at 81 video frames (21 token frames of 30 x 52) over 2, 4 and 8 ranks: every rank's
    run of tokens holds a grid of whole frames as deep as on every other rank (the fewest any run
    holds), starting at its first whole frame; what is left of the run lies before and after it.
    Too few frames per rank: the reason, and diffusers attends exactly."""
    from agentsd.families.base import ModelCall
    from agentsd.families.wan import shard

    rows, columns = 30, 52
    per_frame, call = rows * columns, ModelCall(torch.zeros(1), 900.0, (frames, rows, columns))
    run = frames * per_frame // ranks
    starts = [r * run for r in range(ranks)]
    inside = [[t for t in range(frames) if s <= t * per_frame and (t + 1) * per_frame <= s + run] for s in starts]
    depth = min(len(frames_in) for frames_in in inside)
    for rank in range(ranks):
        local = shard(call, ranks, rank)
        if depth == 0:
            assert isinstance(local, str) and "holds no whole token frame" in local
            continue
        lead = inside[rank][0] * per_frame - starts[rank]
        assert local.grid == (depth, rows, columns)
        assert (local.sequence.ranks, local.sequence.lead) == (ranks, lead)
        assert lead + depth * per_frame + local.sequence.tail == run
