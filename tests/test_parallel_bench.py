"""The traffic formulas of context parallelism (`agentsd.bench.traffic`) against counts worked out
by hand here."""

from agentsd.api.presets import load_preset
from agentsd.bench.traffic import shard_layout


def test_formulas_give_the_counts_worked_out_by_hand():
    """Flux.1-dev at 1024 px over 2 ranks: 64 x 64 image tokens, 2,048 and 256 of the 512 text tokens
    per rank, 24 heads of 128; the `flux` preset's 4x4 cells on a 32 x 64 shard make 8 x 16 = 128
    agents, its ToMe phase keeps 2,048 - floor(0.4 x 2,048) = 1,229 tokens. Wan 2.1 1.3B at 480x832
    px, 93 frames over 4 ranks: 24 x 30 x 52 tokens, 6 token frames per rank; 12 heads of 128;
    the `wan` preset's 2x4x4 boxes leave 9,360 - floor(0.97 x 9,360) = 281 agents (273 whole
    boxes, partial ones at the bottom and right). At the pipelines' 81 frames (21 token frames)
    no rank holds whole frames over 2 ranks: agentsd hands over."""
    flux = shard_layout("flux-dev", 1024, None, 2, load_preset("flux"))
    agent, tome = flux.plan("agentsd-agent"), flux.plan("agentsd-tome")
    assert (flux.tokens, flux.text, agent.agents, tome.merged, flux.layers) == (2048, 256, 128, 1229, 19 + 38)
    assert flux.layer_elements("ulysses") == 4 * 24 * 128 * (2048 + 256) == 28_311_552
    assert flux.layer_elements("ring") == 2 * 24 * 128 * (2048 + 256)
    assert flux.layer_elements("ulysses", agent) == 24 * ((128 + 256) * 128 + 2 * 128 * 129 + 2 * 256 * 129)
    assert flux.layer_elements("ring", agent) == flux.layer_elements("ulysses", agent) == 3_557_376
    assert flux.layer_elements("ulysses", tome) == 4 * 24 * 128 * (1229 + 256)
    assert flux.forward_elements("ulysses") == 57 * 28_311_552 + 2048 * 64  # and the output gather
    wan = shard_layout("wan2.1-1.3b", (480, 832), 93, 4, load_preset("wan"))
    agent = wan.plan("agentsd-agent")
    assert (wan.grid, wan.tokens, wan.text, agent.agents, wan.layers) == ((6, 30, 52), 9360, 0, 281, 30)
    assert wan.layer_elements("ulysses") == 4 * 12 * 128 * 9360
    assert wan.layer_elements("ulysses", agent) == 12 * (281 * 128 + 4 * 281 * 129) == 2_171_568
    assert wan.forward_elements("ring", agent) == 30 * 2_171_568 + 9360 * 64
    handed = shard_layout("wan2.1-1.3b", (480, 832), 81, 2, load_preset("wan"))
    assert handed.grid is None and handed.plan("agentsd-agent").action == "exact"
    assert handed.layer_elements("ulysses", handed.plan("agentsd-agent")) == 4 * 12 * 128 * 21 * 30 * 52 // 2
