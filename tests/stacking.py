"""What the stacking tests share (test_stack_caches.py, test_stack_cache_dit.py, ...): the tiny Flux,
Wan, SD 3 and PixArt pipelines, one generation of each, and the check that a step cache stacked with agentsd runs,
leaves the schedule alone, and comes off (either part) leaving exactly the other."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import agentsd
from agentsd.api.status import recording_phases
from agentsd.testing import tiny_pipeline

# Skips the importing test module where diffusers lacks one of the models.
tiny_dit = pytest.importorskip("agentsd.testing.tiny_dit", reason="this diffusers has no SD3 or PixArt-Sigma")
tiny_flux = pytest.importorskip("agentsd.testing.tiny_flux", reason="this diffusers has no Flux")
tiny_wan = pytest.importorskip("agentsd.testing.tiny_wan", reason="this diffusers has no Wan")

STEPS = 4
# Act at the tiny sizes (16x16 token grids for the images).
PATCH = {"flux": dict(min_tokens=0), "wan": dict(min_tokens=0, st=2), "sd3": dict(min_tokens=0)}
PATCH["pixart"] = PATCH["sd3"]
BOTH = ("patch-then-cache", "cache-then-patch")


def readme_stacking_table():
    """The README's section "Stacking", whose table names the tests behind each stack."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return readme[readme.index("## Stacking") : readme.index("## Compatibility")]


def pipeline(family):
    pipe = tiny_wan.tiny_wan_pipeline() if family == "wan" else tiny_pipeline(family)
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, family):
    if family == "wan":
        args = tiny_wan.CALL_KWARGS["wan"]
    else:
        size, kwargs = (tiny_flux.SIZE, tiny_flux.CALL_KWARGS) if family == "flux" else (128, tiny_dit.CALL_KWARGS)
        args = dict(height=size, width=size, **kwargs[family])
    generator = torch.Generator().manual_seed(0)
    out = pipe("a red cube", generator=generator, num_inference_steps=STEPS, output_type="np", **args)
    return out.frames if family == "wan" else out.images


def cache_dit_or_skip():
    """cache-dit, or the test skipped where it is not installed. It logs each generation's cache
    decisions at INFO through handlers of its own; its documented switch, read when it is first
    imported, keeps the test output to its warnings."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
    return pytest.importorskip("cache_dit", reason="cache-dit not installed (pip install --no-deps cache-dit)")


def enable_dbcache(pipe):
    """cache-dit's DBCache computing the first block only (F1B0) and skipping the rest while its
    residual changes less than 0.5: that skips at 4 steps with random weights; one warm-up step
    (nothing to reuse before it). cache-dit's adapter for Wan caches the guided and unguided calls
    apart."""
    cache_dit = cache_dit_or_skip()
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.5, max_warmup_steps=1
    )
    cache_dit.enable_cache(pipe, cache_config=config)


def stack(pipe, family, enable_cache, order):
    """agentsd and the cache (`enable_cache(pipe)`) on `pipe`, put on in `order`."""
    if order == "patch-then-cache":
        agentsd.patch(pipe, **PATCH[family])
        enable_cache(pipe)
    else:
        enable_cache(pipe)
        agentsd.patch(pipe, **PATCH[family])


def check_stack_and_each_part_off(pipe, family, enable_cache, disable_cache, order):
    """The stack in `order` is finite and differs from either part alone; the cache skipped the
    blocks of patched layers on some calls while each call kept the phase it has without the cache;
    `agentsd.unpatch` leaves the cache-only output and `disable_cache(pipe)` the agentsd-only one,
    bit for bit."""
    enable_cache(pipe)
    cache_only = generate(pipe, family)
    disable_cache(pipe)
    with agentsd.patched(pipe, **PATCH[family]), recording_phases(pipe) as phases_alone:
        agentsd_only = generate(pipe, family)

    stack(pipe, family, enable_cache, order)
    with recording_phases(pipe) as phases:
        stacked = generate(pipe, family)
    assert np.isfinite(stacked).all()
    assert not np.array_equal(stacked, cache_only) and not np.array_equal(stacked, agentsd_only)
    activity = agentsd.status(pipe).activity
    assert activity.skipped_calls > 0 and activity.cache_calls["computed"] + activity.skipped_calls == len(phases)
    assert phases == phases_alone and set(phases) == {"agent", "tome"}

    agentsd.unpatch(pipe)
    assert np.array_equal(generate(pipe, family), cache_only)
    disable_cache(pipe)

    stack(pipe, family, enable_cache, order)
    disable_cache(pipe)
    assert np.array_equal(generate(pipe, family), agentsd_only)
    assert agentsd.status(pipe).activity.skipped_calls == 0  # a new patch counts afresh: none skipped
