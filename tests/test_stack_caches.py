"""agentsd stacked with diffusers' step caches (`transformer.enable_cache`), in either order: the
stack runs and differs from the cache alone, each part comes off leaving exactly the other, the
schedule's phase per call is the one without the cache (it comes from the timestep, not from
counting calls), and `status` counts the calls whose patched layers a cache skipped apart."""

import diffusers
import pytest
import torch

import agentsd

hooks = pytest.importorskip("diffusers.hooks", reason="this diffusers has no step caches")
if not hasattr(hooks, "TaylorSeerCacheConfig"):
    pytest.skip("diffusers' step caches with TaylorSeer come with diffusers 0.36", allow_module_level=True)

from stacking import BOTH, PATCH, STEPS, check_stack_and_each_part_off, generate, readme_stacking_table, tiny_wan  # noqa: E402
from stacking import pipeline as tiny_stack_pipeline  # noqa: E402

MODELS = {
    "flux": diffusers.FluxTransformer2DModel,
    "wan": diffusers.WanTransformer3DModel,
    "sd3": diffusers.SD3Transformer2DModel,
    "pixart": diffusers.PixArtTransformer2DModel,
}

# Settings that make each cache skip at 4 steps. FirstBlockCache skips every block after the first
# while the first block's output changes little; TaylorSeer predicts the hooked modules' outputs
# between computed steps. Its default patterns hook attention modules named "...attn", which are
# Flux's; Wan's are attn1 and attn2, so Wan takes the lite mode (whole blocks predicted). MagCache
# skips blocks by calibrated magnitude ratios (flat ones here: random weights calibrate nothing).
# Pyramid Attention Broadcast and FasterCache reuse attention outputs every other call within a
# timestep range that must leave out the first call (there is nothing to reuse yet); FasterCache
# reads guidance as the two halves of one batch unless told the model is guidance-distilled,
# which Flux is and Wan's separate guidance calls (each in its own cache context) look like.
# SeaCache skips the blocks while spectral indicators of the latent change little.
CACHES = {
    "first-block": lambda pipe, family: hooks.FirstBlockCacheConfig(threshold=0.5),
    "taylorseer": lambda pipe, family: hooks.TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, use_lite_mode=family == "wan"
    ),
    "mag": lambda pipe, family: hooks.MagCacheConfig(
        mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS, threshold=0.5, retention_ratio=0.0
    ),
    "pyramid-attention-broadcast": lambda pipe, family: hooks.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 900),
        current_timestep_callback=lambda: pipe.current_timestep,
    ),
    "faster": lambda pipe, family: hooks.FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 900),
        current_timestep_callback=lambda: pipe.current_timestep,
        attention_weight_callback=lambda _: 0.5,
        is_guidance_distilled=True,
    ),
}
# SeaCache (newer diffusers) reads the latent through an adapter of the model's: diffusers has Wan
# text-to-video's and Cosmos 3's; another model needs a `raw_vision_callback` of the user's.
if hasattr(hooks, "SeaCacheConfig"):
    CACHES["sea"] = lambda pipe, family: hooks.SeaCacheConfig(threshold=1.0, retention_steps=1, cache_end_steps=0)
ON = {"sea": ("wan",)}  # the families a cache runs on as diffusers ships it, where not both


def pipeline(family):
    if not hasattr(MODELS[family], "enable_cache"):
        # diffusers' SD 3 and PixArt transformers have no `enable_cache` (no CacheMixin), and their
        # pipelines open no cache context, which the caches' hooks need (applied directly, they
        # raise "No cache context is set"): nothing to stack yet, until a diffusers adds them.
        pytest.skip(f"{MODELS[family].__name__} has no enable_cache in this diffusers: no step cache to stack")
    return tiny_stack_pipeline(family)


def enabler(cache, family):
    """`enable_cache(pipe)` for diffusers' `cache` on `family`."""
    return lambda pipe: pipe.transformer.enable_cache(CACHES[cache](pipe, family))


def disable(pipe):
    pipe.transformer.disable_cache()


# Every cache in both orders: agentsd's patch before the cache's hooks, and after them.
STACKS = [
    (family, cache, order)
    for family in ("flux", "wan")
    for cache in CACHES
    if family in ON.get(cache, (family,))
    for order in BOTH
]


@pytest.mark.parametrize(
    "family, cache, order", STACKS + [("sd3", "first-block", BOTH[0]), ("pixart", "first-block", BOTH[0])]
)
def test_a_step_cache_stacks_with_agentsd_and_each_comes_off_exactly(family, cache, order):
    check_stack_and_each_part_off(pipeline(family), family, enabler(cache, family), disable, order)


def test_status_counts_computed_and_skipped_calls_and_the_cached_layers():
    """With FirstBlockCache on Flux, a skipped call runs the first block only: its patched layer
    runs, those of the later blocks are cached; the phases count every call."""
    pipe = pipeline("flux")
    agentsd.patch(pipe, **PATCH["flux"])
    pipe.transformer.enable_cache(CACHES["first-block"](pipe, "flux"))
    generate(pipe, "flux")
    activity = agentsd.status(pipe).activity
    computed, skipped = activity.cache_calls["computed"], activity.skipped_calls
    assert skipped > 0 and computed + skipped == activity.calls == STEPS
    assert sum(activity.phase_calls.values()) == STEPS
    first, *later = sorted(activity.layer_calls, key=lambda name: not name.startswith("transformer_blocks.0."))
    assert "cached" not in activity.layer_calls[first]
    assert all(activity.layer_calls[name]["cached"] == skipped for name in later)
    assert f"calls: {computed} computed, {skipped} skipped (their blocks cached)" in activity.summary()
    assert f"{skipped} skipped (their blocks cached)" in str(agentsd.status(pipe))
    pipe.transformer.disable_cache()
    generate(pipe, "flux")
    assert agentsd.status(pipe).activity.cache_calls == {"computed": computed + STEPS, "skipped": skipped}


def test_a_step_whose_patched_layers_were_all_cached_keeps_its_phase():
    """TaylorSeer's lite mode on Wan predicts whole blocks between computed steps: on those steps
    no patched layer runs, yet the step's phase (read in `callback_on_step_end`) is the one it has
    without the cache, since it comes from the step's timestep; `status` names the layers cached."""

    def run(pipe):
        steps = []

        def record(pipe, step, timestep, kwargs):
            report = agentsd.status(pipe)
            steps.append((agentsd.current_phase(pipe), {layer.mode for layer in report.layers}, str(report)))
            return kwargs

        generator = torch.Generator().manual_seed(0)
        args = dict(
            num_inference_steps=STEPS, output_type="np", callback_on_step_end=record, **tiny_wan.CALL_KWARGS["wan"]
        )
        pipe("a red cube", generator=generator, **args)
        return steps

    pipe = pipeline("wan")
    agentsd.patch(pipe, **PATCH["wan"])
    alone = run(pipe)
    pipe.transformer.enable_cache(CACHES["taylorseer"](pipe, "wan"))
    stacked = run(pipe)
    assert [phase for phase, _, _ in stacked] == [phase for phase, _, _ in alone]
    assert {phase for phase, _, _ in stacked} == {"agent", "tome"}
    cached = [text for _, modes, text in stacked if modes == {"cached"}]
    assert cached and all("its block skipped by a step cache" in text for text in cached)
    assert all(modes <= {"agent", "tome"} for _, modes, _ in alone)


def test_the_readme_stacking_table_names_every_stack_tested_here():
    table = readme_stacking_table()
    for family, cache, order in STACKS:
        assert f"[{family}-{cache}-{order}]" in table
