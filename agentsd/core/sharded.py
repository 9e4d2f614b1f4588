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

Queries that must attend exactly over every rank's keys (Flux's text tokens, m_local per rank)
ride along: they are gathered with the agents, answered by every rank over its own keys in the
same pass, and each rank's partial answers go back to the queries' owner only (an all-to-all of
m_local x (d + 1) per rank pair), merged there by their log-sum-exps.

So a layer sends O((n + m) d) per rank, whatever the image or video length, where an exact
attention across the shards (Ulysses) moves every token's query, key, value and output. The
collectives are torch.distributed's (NCCL on GPUs, gloo on CPUs), each with its backward here:
gradients flow back through them to every rank's tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .attention import attend


class _Gather(torch.autograd.Function):
    """All-gather along a new leading dim; backward: each rank's gradient is the sum over ranks of
    the gradient of its row (an all-to-all of the rows, summed)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        ranks = dist.get_world_size(group)
        out = t.new_empty((ranks * t.shape[0], *t.shape[1:]))  # every rank's t along dim 0
        # torch 2.13 names it all_gather_single; earlier releases all_gather_into_tensor.
        collective = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        collective(out, t.contiguous(), group=group)
        return out.unflatten(0, (ranks, t.shape[0]))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _Exchange.forward(ctx, grad, ctx.group).sum(dim=0), None


class _Exchange(torch.autograd.Function):
    """All-to-all along dim 0; its backward is the all-to-all of the gradient back."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        t = t.contiguous()  # the collective reads and writes rows of contiguous memory
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _Exchange.forward(ctx, grad, ctx.group), None


def gather(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """`t` of every rank of `group` stacked in rank order, (P, *t.shape) (every rank's `t` has the
    same shape); gradients go back to each rank's `t`."""
    return _Gather.apply(t, group)


def exchange(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-to-all along dim 0 (P, ...): row r goes to rank r; row r of the result came from rank r."""
    return _Exchange.apply(t, group)


def attend_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * query @ key^T) @ value and the log-sum-exp of each query's scaled scores,
    (B, H, Lq, D) and (B, H, Lq) in float32, through a fused kernel that returns it (the CPU's
    flash attention, CUDA's memory-efficient attention), else plainly: plainly too where gradients
    are wanted (the fused kernels' log-sum-exp carries none)."""
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if query.device.type == "cpu" and not wants_grad:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, scale=scale)[:2]
        return out, lse.float()
    if query.device.type == "cuda" and not wants_grad:
        efficient = torch.ops.aten._scaled_dot_product_efficient_attention
        out, lse = efficient(query, key, value, None, True, scale=scale)[:2]
        return out, lse[..., : query.shape[-2]].float()
    scores = torch.einsum("bhqd,bhkd->bhqk", query.float(), key.float()) * scale
    lse = scores.logsumexp(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", (scores - lse.unsqueeze(-1)).exp(), value.float()).to(query.dtype), lse


def merge_partials(parts: torch.Tensor) -> torch.Tensor:
    """The exact attention output from per-rank partial ones: `parts` (P, ..., D + 1), each rank's
    output over its keys with its log-sum-exp last; each weighted by its share of the softmax."""
    weights = F.softmax(parts[..., -1], dim=0)
    return (parts[..., :-1] * weights.unsqueeze(-1)).sum(dim=0)


def sharded_agent_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    agents: torch.Tensor,
    scale: float,
    k_scale2: float,
    k_shortcut: float,
    group: dist.ProcessGroup,
    backend: str = "sdpa",
    shortcut: torch.Tensor | None = None,
    exact: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Agent attention (`agentsd.core.attention.agent_attention`) of this rank's queries, with the
    agents and keys of every rank of `group`; and `exact`'s attention over every rank's keys.

    Args:
        query: (B, H, N_local, D), this rank's queries served by the agents.
        key, value: (B, H, M_local, D), this rank's keys and values (`query`'s tokens among them).
        agents: (B, H, n_local, D), this rank's agents (the same count on every rank).
        backend: the kernel of the local broadcast step (see `attend`).
        shortcut: (B, H, N_local, D), the values of the queries' own tokens; `value` when None.
        exact: (B, H, m_local, D) queries attending exactly over every rank's keys (the same count
            on every rank), or None.

    Returns the agent attention output (B, H, N_local, D), and `exact`'s output or None.
    """
    ranks, n_local = dist.get_world_size(group), agents.shape[2]
    asked = agents if exact is None else torch.cat([agents, exact], dim=2)
    everyone = gather(asked, group)  # (P, B, H, n_local + m_local, D): every rank's questions
    partial, lse = attend_with_lse(everyone.movedim(0, 2).flatten(2, 3), key, value, scale)
    answers = torch.cat([partial.float(), lse.unsqueeze(-1)], dim=-1).unflatten(2, (ranks, -1))  # (B, H, P, *, D+1)
    agent_values = merge_partials(gather(answers[:, :, :, :n_local], group)).flatten(2, 3).to(value.dtype)
    all_agents = everyone[:, :, :, :n_local].movedim(0, 2).flatten(2, 3)  # (B, H, n, D) in rank order
    out = attend(query, all_agents, agent_values, scale**k_scale2, backend)
    out = torch.add(out, value if shortcut is None else shortcut, alpha=k_shortcut)
    if exact is None:
        return out, None
    mine = exchange(answers[:, :, :, n_local:].movedim(2, 0), group)  # (P, B, H, m_local, D+1): my queries' parts
    return out, merge_partials(mine).to(exact.dtype)
