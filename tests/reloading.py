"""What a pipeline saved with `save_pretrained` and loaded back keeps, on any machine.

Its weights, bit for bit: `assert_same_components` compares every tensor of every model's state
dict (and the scheduler's class and config). Not its images, bit for bit: the loaded weights
are read from the mapped file, at other addresses than freshly allocated tensors (64-byte
aligned), and matrix kernels round differently with their operands' alignment and the CPU. On
some CPUs (seen on an AMD EPYC) the text encoders' pooled outputs then move by one rounding step
(5e-7) and the images by up to 3e-6; on others nothing moves. `IMAGE_ATOL` allows for that and
is still far under what anything wrong does to the tiny pipelines' images: agentsd left on, a step
more or another prompt move them by 1e-2 to 0.4.
"""

import numpy as np
import torch

IMAGE_ATOL = 1e-5  # images in [0, 1]


def assert_same_components(loaded, original):
    """Every model component's state dict equal tensor for tensor (names, dtypes and values), and
    the same scheduler (class and config)."""
    assert loaded.components.keys() == original.components.keys()
    for name, component in original.components.items():
        other = loaded.components[name]
        if isinstance(component, torch.nn.Module):
            mine, theirs = component.state_dict(), other.state_dict()
            assert theirs.keys() == mine.keys(), name
            for key, tensor in mine.items():
                assert theirs[key].dtype == tensor.dtype and torch.equal(theirs[key], tensor), f"{name}: {key}"
        elif name == "scheduler":
            assert type(other) is type(component)
            assert public(other.config) == public(component.config)


def public(config):
    """A diffusers config without its bookkeeping (`_use_default_values`, `_class_name`, ...)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


def assert_images_close(loaded, original):
    """The images of a reloaded pipeline within `IMAGE_ATOL` of the original's (numpy arrays or
    tensors)."""
    loaded, original = (np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x) for x in (loaded, original))
    assert loaded.shape == original.shape
    np.testing.assert_allclose(loaded, original, rtol=0, atol=IMAGE_ATOL)
