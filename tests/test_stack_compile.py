"""A step cache and `torch.compile` together with agentsd: diffusers' FirstBlockCache on the patched
tiny Flux and Wan, cache-dit's DBCache on SD 3, the transformer compiled whole (aot_eager, as the
other compile tests)."""

import numpy as np
import pytest
import torch

import agentsd

hooks = pytest.importorskip("diffusers.hooks", reason="this diffusers has no step caches")
if not hasattr(hooks, "FirstBlockCacheConfig"):
    pytest.skip("this diffusers has no FirstBlockCache", allow_module_level=True)

from stacking import PATCH, enable_dbcache, generate, pipeline  # noqa: E402

# Slow (torch.compile with a step cache): `python -m pytest -m slow` runs it (README, Set-up).
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_a_compiled_stack_matches_eager_and_stops_recompiling_from_the_third_generation(family):
    """The cache's hook decides per call, in Python, whether to run the blocks after the first, so
    the compiled model breaks its graph at every block and dynamo guards on the cache's state
    (`should_compute`, `is_tail`, the input strides of a computed or a skipped call). The first
    generation compiles what it meets, the second some more (diffusers' cache alone does so too,
    agentsd or not), from the third none: the guards then cover every path. Compiled, agentsd still
    acts and `status` counts the same computed and skipped calls as eager."""
    torch._dynamo.reset()
    pipe = pipeline(family)
    agentsd.patch(pipe, **PATCH[family])
    pipe.transformer.enable_cache(hooks.FirstBlockCacheConfig(threshold=0.5))
    eager = generate(pipe, family)
    per_generation = agentsd.status(pipe).activity.cache_calls
    assert per_generation["skipped"] > 0

    pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
    compiled = [generate(pipe, family), generate(pipe, family)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled.append(generate(pipe, family))
    assert all(np.allclose(out, eager, atol=1e-4) for out in compiled)
    assert agentsd.status(pipe).activity.cache_calls == {kind: 4 * n for kind, n in per_generation.items()}


def test_a_compiled_cache_dit_stack_matches_eager_without_recompiling_after_the_first_generation():
    """Unlike diffusers' FirstBlockCache above, cache-dit's DBCache needs no second warm generation:
    on SD 3 (where diffusers offers no step cache) the first compiles every path, the second none."""
    torch._dynamo.reset()
    pipe = pipeline("sd3")
    agentsd.patch(pipe, **PATCH["sd3"])
    enable_dbcache(pipe)
    eager = generate(pipe, "sd3")
    per_generation = agentsd.status(pipe).activity.cache_calls
    assert per_generation["skipped"] > 0

    pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
    compiled = [generate(pipe, "sd3")]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled.append(generate(pipe, "sd3"))
    assert all(np.allclose(out, eager, atol=1e-4) for out in compiled)
    assert agentsd.status(pipe).activity.cache_calls == {kind: 3 * n for kind, n in per_generation.items()}
