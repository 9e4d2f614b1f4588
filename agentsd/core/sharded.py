"""Agent attention over a sequence sharded across processes (diffusers' context parallelism).

Each rank holds a shard of the tokens, merged and given its agents by a plan that is the same on
every rank (the shard-local plan), so every rank holds the same number of merged tokens and of
agents. Then, per layer:

1. the agents of every rank are gathered (an all-gather of n_local x d per head and rank): every
   rank holds all n agents;
2. the gather step, softmax(s A K^T) V, is a softmax over keys that lie on every rank: each rank
   attends all agents over its own keys and keeps the log-sum-exp of each agent's weights; the
   partial outputs and log-sum-exps are gathered (n x (d + 1) per head and rank) and merged
   exactly, each rank's part weighted by exp(lse_rank - lse_total);
3. the broadcast step, softmax(s^k Q A^T) V_A, is local: every query meets every agent on its own rank.

So a layer sends O(n d) per rank, whatever the sequence length, where an exact attention across
the shards (Ulysses) moves every token's query, key, value and output. The collectives are those
of `torch.distributed` (NCCL on GPUs, gloo on CPUs) and not autograd-aware: this path serves
inference only (the processors hand a call that needs gradients to diffusers' exact path).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .attention import attend


def gather(t: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """`t` of every rank of `group`, in rank order (every rank's `t` has the same shape)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def attend_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * query @ key^T) @ value and the log-sum-exp of each query's scaled scores,
    (B, H, Lq, D) and (B, H, Lq) in float32, through a fused kernel that returns it (the CPU's
    flash attention, CUDA's memory-efficient attention), else plainly."""
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, scale=scale)[:2]
        return out, lse.float()
    if query.device.type == "cuda":
        efficient = torch.ops.aten._scaled_dot_product_efficient_attention
        out, lse = efficient(query, key, value, None, True, scale=scale)[:2]
        return out, lse[..., : query.shape[-2]].float()
    scores = torch.einsum("bhqd,bhkd->bhqk", query.float(), key.float()) * scale
    lse = scores.logsumexp(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", (scores - lse.unsqueeze(-1)).exp(), value.float()).to(query.dtype), lse


def sharded_agent_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    agents: torch.Tensor,
    scale: float,
    k_scale2: float,
    k_shortcut: float,
    group: dist.ProcessGroup | None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Agent attention (`agentsd.core.attention.agent_attention`) of this rank's queries, with the
    agents and keys of every rank of `group`.

    Args:
        query, key, value: (B, H, N_local, D), this rank's merged tokens.
        agents: (B, H, n_local, D), this rank's agents (the same count on every rank).
        backend: the kernel of the local broadcast step (see `attend`).
    """
    everyone = torch.cat(gather(agents, group), dim=2)  # (B, H, n, D)
    partial, lse = attend_with_lse(everyone, key, value, scale)
    parts = torch.stack(gather(partial.float(), group))  # (P, B, H, n, D)
    weights = F.softmax(torch.stack(gather(lse, group)), dim=0)  # (P, B, H, n): each rank's share
    agent_values = (parts * weights.unsqueeze(-1)).sum(dim=0).to(value.dtype)
    out = attend(query, everyone, agent_values, scale**k_scale2, backend)
    return torch.add(out, value, alpha=k_shortcut)
