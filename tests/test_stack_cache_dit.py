"""agentsd stacked with cache-dit's DBCache (`cache_dit.enable_cache(pipe, ...)`) on tiny Flux, Wan,
SD 3 and PixArt-Sigma, in either order: the same checks as diffusers' step caches get in
test_stack_caches.py. cache-dit wraps the pipeline's call and the transformer's blocks itself, so it
also serves SD 3 and PixArt, whose transformers have no `enable_cache` in diffusers."""

import os

import pytest

# cache-dit logs each step's cache decisions at INFO through handlers of its own; its documented
# switch, read when it is first imported, keeps the test output to its warnings.
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
cache_dit = pytest.importorskip("cache_dit", reason="cache-dit not installed (pip install --no-deps cache-dit)")

from stacking import BOTH, check_stack_and_each_part_off, pipeline, readme_stacking_table  # noqa: E402


def enable_dbcache(pipe):
    """DBCache computing the first block only (F1B0) and skipping the rest while its residual changes
    less than 0.5: that skips at 4 steps with random weights; one warm-up step (nothing to reuse
    before it). cache-dit's adapter for Wan caches the guided and unguided calls apart."""
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.5, max_warmup_steps=1
    )
    cache_dit.enable_cache(pipe, cache_config=config)


# Both orders on Flux and Wan; one each on SD 3 and PixArt, alternating, to keep the file quick.
STACKS = [("flux", order) for order in BOTH] + [("wan", order) for order in BOTH]
STACKS += [("sd3", BOTH[0]), ("pixart", BOTH[1])]


@pytest.mark.parametrize("family, order", STACKS)
def test_dbcache_stacks_with_agentsd_and_each_comes_off_exactly(family, order):
    check_stack_and_each_part_off(pipeline(family), family, enable_dbcache, cache_dit.disable_cache, order)


def test_the_readme_stacking_table_names_every_stack_tested_here():
    table = readme_stacking_table()
    for family, order in STACKS:
        assert f"[{family}-{order}]" in table
