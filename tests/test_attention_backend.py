"""`check_backend`: an attention backend that cannot run here is refused before any work."""

import importlib.util
import sys

import pytest

from agentsd.core.attention import check_backend


def xformers_installed(monkeypatch, installed: bool):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "xformers":
            return importlib.machinery.ModuleSpec("xformers", None) if installed else None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.delitem(sys.modules, "xformers", raising=False)


@pytest.mark.parametrize("name", [None, "sdpa", "einsum"])
def test_builtin_backends_run_anywhere(name):
    check_backend(name)
    check_backend(name, "cpu")


def test_xformers_not_installed_names_the_fix(monkeypatch):
    xformers_installed(monkeypatch, False)
    with pytest.raises(ValueError, match="pip install xformers") as err:
        check_backend("xformers")
    assert "sdpa" in str(err.value)


def test_xformers_needs_cuda_when_the_device_is_known(monkeypatch):
    xformers_installed(monkeypatch, True)
    check_backend("xformers")  # installed; the device is not known yet
    check_backend("xformers", "cuda:0")
    with pytest.raises(ValueError, match="CUDA") as err:
        check_backend("xformers", "cpu")
    assert "sdpa" in str(err.value)


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="sdpa, xformers, einsum"):
        check_backend("flash")


class DispatchingProcessor:
    """A processor that runs diffusers' attention dispatcher (as Flux's and the newer models'
    do): it carries `_attention_backend`, which `model.set_attention_backend(...)` sets."""

    _attention_backend = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states

        def heads(t):
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(context)), heads(attn.to_v(context))
        out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask, backend=self._attention_backend)
        return attn.to_out[1](attn.to_out[0](out.flatten(2)))


def test_the_backend_set_on_the_model_reaches_agentsds_calls_and_the_delegate(monkeypatch):
    """`set_attention_backend` after patching: the processors agentsd wraps keep getting it, and
    agentsd's own attention calls go through the dispatcher with that backend."""
    pytest.importorskip("diffusers.models.attention_dispatch")
    import torch
    from diffusers.models import attention_dispatch

    import agentsd
    import agentsd.core.attention
    from agentsd.api.follow import delegate_of as _delegate_of
    from agentsd.testing import tiny_pipeline

    seen = []
    real = attention_dispatch.dispatch_attention_fn

    def spy(*args, backend=None, **kwargs):
        seen.append(getattr(backend, "value", backend))
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn", spy)
    unet = tiny_pipeline("sd15").unet
    unet.set_attn_processor(DispatchingProcessor())
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)

    def run():
        seen.clear()
        with torch.no_grad():
            return unet(sample, torch.tensor(981), encoder_hidden_states=context).sample

    baseline = run()
    agentsd.patch(unet, min_tokens=0)
    run()
    assert seen and set(seen) == {None}  # no backend set: the dispatcher's active one, for every call
    assert {layer.backend for layer in agentsd.status(unet).layers} == {"dispatch"}
    unet.set_attention_backend("_native_math")
    patched = run()
    assert set(seen) == {"_native_math"}  # agentsd's calls and the delegates' (attn2, other levels)
    assert {layer.backend for layer in agentsd.status(unet).layers} == {"dispatch:_native_math"}
    agentsd.unpatch(unet)
    assert all(_delegate_of(p)._attention_backend.value == "_native_math" for p in unet.attn_processors.values())
    assert torch.allclose(run(), baseline, atol=1e-5) and not torch.allclose(patched, baseline, atol=1e-3)
