"""Agent attention as two fused attention calls.

Tensors are laid out (batch, heads, tokens, head_dim), as diffusers' SDPA processor does.
With the fused backends neither the agents x tokens nor the tokens x agents weight matrix
is ever materialised: each step is one call to a fused kernel with an explicit scale.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "xformers", "einsum")
# diffusers' attention dispatcher (`dispatch_attention_fn`): "dispatch" runs its active backend,
# "dispatch:<name>" the named one. agentsd picks it where the processor it delegates to dispatches
# (it has `_attention_backend`, which `model.set_attention_backend(...)` sets).
DISPATCH = "dispatch"


def check_backend(name: str | None, device: torch.device | str | None = None) -> None:
    """Refuse an attention backend that cannot run here, before any work starts.

    `None`, `"sdpa"` and `"einsum"` run anywhere. `"xformers"` needs the xformers package
    (checked always, without importing it) and CUDA tensors (checked only when `device` is
    given: a model patched on the CPU may be moved to CUDA before it runs).

    Args:
        name: an `AgentSDConfig.attention_backend` value.
        device: where the attention will run, when known.

    Raises:
        ValueError: unknown backend, xformers not installed, or xformers on a non-CUDA device;
            the message says what to do instead.
    """
    if name is None or name in ("sdpa", "einsum"):
        return
    if name != "xformers":
        raise ValueError(f"unknown attention backend {name!r}: use one of {', '.join(BACKENDS)} (or None).")
    if importlib.util.find_spec("xformers") is None:
        raise ValueError(
            "attention backend 'xformers' needs the xformers package, which is not installed: "
            "pip install xformers (it runs on CUDA only), or use the 'sdpa' backend."
        )
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(
            f"attention backend 'xformers' runs on CUDA only, not on {str(device)!r}: "
            "use the 'sdpa' backend, or a CUDA device."
        )


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, backend: str = "sdpa"
) -> torch.Tensor:
    """softmax(scale * query @ key^T) @ value through a fused kernel.

    Args:
        query: (B, H, Lq, D).
        key: (B, H, Lk, D).
        value: (B, H, Lk, D).
        scale: the softmax scale, applied as given.
        backend: `"sdpa"` (torch's scaled_dot_product_attention), `"xformers"`
            (`xformers.ops.memory_efficient_attention`, CUDA only), `"einsum"` (unfused:
            the Lq x Lk weights are materialised, as in the published AgentSD code), or
            `"dispatch"` / `"dispatch:<name>"` (diffusers' attention dispatcher, its active
            backend or the named one).
    """
    if backend.startswith(DISPATCH):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        name = backend.partition(":")[2] or None
        out = dispatch_attention_fn(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale, backend=name
        )
        return out.transpose(1, 2)
    if backend == "einsum":
        weights = torch.einsum("bhqd,bhkd->bhqk", query, key).mul_(scale).softmax(dim=-1)
        return torch.einsum("bhqk,bhkd->bhqd", weights, value)
    if backend == "xformers":
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(query, key, value, scale=scale)


def agent_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    agents: torch.Tensor,
    scale: float,
    k_scale2: float,
    k_shortcut: float,
    backend: str = "sdpa",
    shortcut: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention through a few agent tokens.

    The agents first gather from all tokens, then broadcast back to every query:
    `softmax(scale**k_scale2 * Q @ A^T) @ (softmax(scale * A @ K^T) @ V) + k_shortcut * V`.

    Args:
        query: (B, H, N, D).
        key, value: (B, H, M, D): what the agents gather from (M = N for self-attention; in
            joint attention the queries' own tokens and the text's).
        agents: (B, H, n, D), the agent tokens projected with the query projection.
        scale: the layer's attention scale (`head_dim ** -0.5`).
        k_scale2: exponent of `scale` in the broadcast step.
        k_shortcut: weight of the value shortcut.
        backend: see `attend`.
        shortcut: (B, H, N, D), the values of the queries' own tokens; `value` when None.
    """
    agent_values = attend(agents, key, value, scale, backend)
    out = attend(query, agents, agent_values, scale**k_scale2, backend)
    # Out of place: fused kernels save their output for the backward pass.
    return torch.add(out, value if shortcut is None else shortcut, alpha=k_shortcut)
