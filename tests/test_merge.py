"""Destination choice and the merge/unmerge index map."""

import torch

from agentsd.core.merge import bipartite_matching, destination_indices, source_indices


def cells_of(positions, w, sx, sy):
    return [((int(p) // w) // sy, (int(p) % w) // sx) for p in positions]


def test_fixed_destinations_are_top_left_of_each_whole_cell():
    dst = destination_indices(7, 10, sx=3, sy=2)
    expected = [r * 10 + c for r in (0, 2, 4) for c in (0, 3, 6)]
    assert dst.tolist() == expected


def test_random_destinations_one_per_whole_cell_and_seeded():
    h, w, sx, sy = 11, 9, 4, 2
    g = torch.Generator().manual_seed(5)
    dst = destination_indices(h, w, sx, sy, g)
    cells = cells_of(dst, w, sx, sy)
    assert sorted(cells) == [(i, j) for i in range(h // sy) for j in range(w // sx)]
    assert all(int(p) // w < (h // sy) * sy and int(p) % w < (w // sx) * sx for p in dst)
    again = destination_indices(h, w, sx, sy, torch.Generator().manual_seed(5))
    assert torch.equal(dst, again)
    draws = {tuple(destination_indices(h, w, sx, sy, g).tolist()) for _ in range(5)}
    assert len(draws) > 1


def test_grid_smaller_than_a_cell_has_no_destination():
    assert destination_indices(1, 3, sx=4, sy=4).numel() == 0


def test_merge_counts_and_unmerge_of_group_constant_field():
    torch.manual_seed(0)
    h, w = 8, 12
    x = torch.randn(3, h * w, 16)
    dst = destination_indices(h, w, 2, 2)
    matching = bipartite_matching(x, dst, source_indices(h * w, dst))
    r = matching.merge_count(h * w, 0.4)
    assert r == 38
    merge = matching.plan(r)
    assert merge.merge(x).shape == (3, h * w - r, 16)
    # Each slot holds exactly its group: a field constant per group survives merge+unmerge.
    field = torch.randn(3, h * w - r, 5).gather(1, merge.index.unsqueeze(-1).expand(-1, -1, 5))
    assert torch.allclose(merge.unmerge(merge.merge(field)), field)
    # r is capped at the number of sources.
    assert matching.merge_count(h * w, 0.99) == h * w - dst.numel()


def test_zero_tokens_do_not_produce_nan():
    x = torch.zeros(2, 64, 8)
    dst = destination_indices(8, 8, 2, 2)
    merge = bipartite_matching(x, dst, source_indices(64, dst)).plan(20)
    assert torch.isfinite(merge.merge(x)).all()
