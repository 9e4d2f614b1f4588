"""agentsd stacked with cache-dit's DBCache (`cache_dit.enable_cache(pipe, ...)`) on tiny Flux, Wan,
SD 3 and PixArt-Sigma, in either order: the same checks as diffusers' step caches get in
test_stack_caches.py. cache-dit wraps the pipeline's call and the transformer's blocks itself, so it
also serves SD 3 and PixArt, whose transformers have no `enable_cache` in diffusers."""

import pytest
from stacking import (
    BOTH,
    cache_dit_or_skip,
    check_stack_and_each_part_off,
    enable_dbcache,
    pipeline,
    readme_stacking_table,
)

cache_dit = cache_dit_or_skip()


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
