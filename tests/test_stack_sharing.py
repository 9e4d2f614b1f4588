"""Copies and threads of a patched model with a step cache (diffusers' FirstBlockCache on tiny Flux).

diffusers' cache hooks keep their state, and the cache context the pipeline sets for each call, per
model: one cached model serves one call at a time (two threads on it clear each other's context:
"No cache context is set"), and its deep copy runs the original's hooks (below). A copy made before
the cache goes on is an independent stack, and threads with one each get what they get alone."""

import copy
import threading
import time

import numpy as np
import pytest

import agentsd

hooks = pytest.importorskip("diffusers.hooks", reason="this diffusers has no step caches")
if not hasattr(hooks, "FirstBlockCacheConfig"):
    pytest.skip("this diffusers has no FirstBlockCache", allow_module_level=True)

from stacking import PATCH, generate, pipeline  # noqa: E402


def cached(pipe):
    pipe.transformer.enable_cache(hooks.FirstBlockCacheConfig(threshold=0.5))
    return pipe


def test_a_deep_copy_of_a_cached_model_runs_the_originals_cache_hooks():
    """diffusers' hooks replace each block's `forward` with a closure over the hook; deepcopy copies
    no function, so the copy's blocks call the original's hooks, whose state manager has no cache
    context while the copy runs: the copy cannot generate (agentsd or not)."""
    pipe = cached(agentsd.patch(pipeline("flux"), **PATCH["flux"]))
    twin = copy.deepcopy(pipe)
    with pytest.raises(ValueError, match="No cache context is set"):
        generate(twin, "flux")


def test_a_patched_pipeline_copied_before_the_cache_goes_on_is_an_independent_stack():
    pipe = agentsd.patch(pipeline("flux"), **PATCH["flux"])
    twin = cached(copy.deepcopy(pipe))
    stacked = generate(cached(pipe), "flux")
    assert np.array_equal(generate(twin, "flux"), stacked)
    assert agentsd.status(twin).activity.skipped_calls == agentsd.status(pipe).activity.skipped_calls > 0

    agentsd.unpatch(twin)  # the original stays patched, its cache on
    twin.transformer.disable_cache()
    assert agentsd.is_patched(pipe) and not agentsd.is_patched(twin)
    assert np.array_equal(generate(pipe, "flux"), stacked)
    assert not np.array_equal(generate(twin, "flux"), stacked)


def test_threads_each_with_its_own_copy_get_what_they_get_alone():
    base = agentsd.patch(pipeline("flux"), **PATCH["flux"])
    copies = [cached(copy.deepcopy(base)) for _ in range(3)]
    alone = generate(cached(base), "flux")
    for pipe in copies:
        # A pause after the pipeline set its cache context lets the other threads' calls start in between.
        pipe.transformer.register_forward_pre_hook(lambda *_: time.sleep(0.002))
    results, errors = {}, []
    start = threading.Barrier(len(copies))

    def serve(index):
        try:
            start.wait()
            results[index] = generate(copies[index], "flux")
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=serve, args=(index,)) for index in range(len(copies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == len(copies) and all(np.array_equal(out, alone) for out in results.values())
