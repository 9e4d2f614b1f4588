"""Every field of AgentSDConfig is validated, with a message naming the field and the fix."""

import json

import numpy as np
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
    ("ratio", np.float32("nan")),
    ("k_scale2", np.float64("inf")),
    ("sx", np.bool_(True)),
    ("sx", np.float32(2.0)),
    ("seed", np.int64(-1)),
    ("use_rand", np.int64(1)),
    ("attn_precision", "automatic"),
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


def test_numpy_scalars_are_stored_as_python_numbers():
    """Values read from numpy (a sweep over np.linspace, a loaded .npz) are the Python numbers
    they hold: equal to a config of Python values, of the same types, JSON-serialisable."""
    config = AgentSDConfig(
        ratio=np.float32(0.5), k_shortcut=np.float64(0.1), sx=np.int64(2), seed=np.int32(7), use_rand=np.bool_(False)
    )
    assert config == AgentSDConfig(ratio=0.5, k_shortcut=0.1, sx=2, seed=7, use_rand=False)
    types = {name: type(getattr(config, name)) for name in ("ratio", "k_shortcut", "sx", "seed", "use_rand")}
    assert types == dict(ratio=float, k_shortcut=float, sx=int, seed=int, use_rand=bool)
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert type(AgentSDConfig().replace(min_tokens=np.uint16(64)).min_tokens) is int


@pytest.mark.parametrize("word", ["None", "none", "AUTO", "auto", "null", "Null", " none "])
def test_words_for_automatic_mean_none(word):
    config = AgentSDConfig(attn_precision=word, attention_backend=word)
    assert config.attn_precision is None and config.attention_backend is None
    assert config == AgentSDConfig()
