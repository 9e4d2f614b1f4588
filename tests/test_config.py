"""Every field of AgentSDConfig is validated, with a message naming the field and the fix."""

import pytest

from agentsd import AgentSDConfig

BAD_VALUES = [
    ("ratio", -0.1),
    ("ratio", 1.0),
    ("ratio", "0.4"),
    ("ratio", float("nan")),
    ("agent_ratio", 1.5),
    ("agent_ratio", None),
    ("late_ratio", -1),
    ("agent_steps", 1.01),
    ("agent_steps", -0.01),
    ("k_scale2", 0.0),
    ("k_scale2", float("inf")),
    ("k_shortcut", -0.5),
    ("sx", 0),
    ("sx", 2.0),
    ("sy", -1),
    ("late_sx", 0),
    ("late_sy", True),
    ("seed", -1),
    ("seed", 1.5),
    ("max_downsample", 3),
    ("max_downsample", 0),
    ("use_rand", 1),
    ("attn_precision", "fp16"),
    ("attn_precision", 32),
    ("attention_backend", "flash"),
    ("min_tokens", -1),
    ("min_tokens", 256.0),
    ("share_matching", "yes"),
    ("agent_selection", "mean"),
]


@pytest.mark.parametrize("field, value", BAD_VALUES)
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(ValueError) as err:
        AgentSDConfig(**{field: value})
    message = str(err.value)
    assert f"AgentSDConfig.{field}=" in message
    assert "use " in message  # says what to use instead


def test_defaults_are_the_published_recipe():
    c = AgentSDConfig()
    assert (c.ratio, c.agent_ratio, c.sx, c.sy, c.max_downsample) == (0.4, 0.95, 4, 4, 1)
    assert (c.k_scale2, c.k_shortcut, c.use_rand, c.attn_precision) == (0.3, 0.075, True, None)
    assert (c.agent_steps, c.late_ratio, c.late_sx, c.late_sy) == (0.4, 0.4, 2, 2)
    assert (c.share_matching, c.agent_selection) == (False, "match")  # the opt-ins are off


def test_replace_validates_and_rejects_unknown_fields():
    assert AgentSDConfig().replace(ratio=0.5).ratio == 0.5
    with pytest.raises(ValueError, match="ratio"):
        AgentSDConfig().replace(ratio=2.0)
    with pytest.raises(TypeError, match="no field rato"):
        AgentSDConfig().replace(rato=0.5)


def test_boundaries_are_accepted():
    AgentSDConfig(ratio=0.0, agent_ratio=0.0, late_ratio=0.0, agent_steps=0.0, k_shortcut=0.0)
    AgentSDConfig(agent_steps=1.0, max_downsample=8, sx=1, sy=1, attn_precision="fp32")
