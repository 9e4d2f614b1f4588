import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def pipes():
    """One tiny pipeline per kind (`agentsd.testing.tiny_pipeline`), built when a test of the
    module first asks for it."""
    from agentsd.testing import tiny_pipeline

    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = tiny_pipeline(kind)
            built[kind].set_progress_bar_config(disable=True)
        return built[kind]

    return get


@pytest.fixture
def sdpa_dtypes(monkeypatch):
    """The (query, key, value) dtypes of every call of torch's `scaled_dot_product_attention`
    while the test runs: the dtypes the softmaxes run in, for agentsd's SDPA backend and for
    diffusers' attention dispatcher (its native backend calls it with keywords)."""
    import torch

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    names = ("query", "key", "value")

    def spy(*args, **kwargs):
        given = dict(zip(names, args, strict=False)) | {name: kwargs[name] for name in names if name in kwargs}
        seen.append(tuple(given[name].dtype for name in names))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


@pytest.fixture(autouse=True)
def dispatcher_backend():
    """`model.set_attention_backend(...)` also sets diffusers' process-wide active backend, which
    every later model call without a backend of its own then uses (and `_native_math` switches
    torch's SDPA kernel globally, which two threads at once disturb): put it back after each test."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:  # a diffusers without the dispatcher
        yield
        return
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)
