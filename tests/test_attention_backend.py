"""`check_backend`: an attention backend that cannot run here is refused before any work."""

import importlib.util
import sys

import pytest

from agentsd.attention import check_backend


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
