"""Agent attention in Wan's video self-attention: a 3-D token grid with 3-D rotary positions.

diffusers' `WanAttnProcessor` serves both attentions of a Wan block. The self-attention (`attn1`,
the one agentsd patches) projects the video tokens, normalizes queries and keys with RMS norms
over all heads at once (`norm_q`, `norm_k`: before the heads are split), rotates them by Wan's
3-D rotary embedding (frame, row and column angles in one table, one row per token), and runs one
attention through diffusers' attention dispatcher with the model's backend. The cross-attention
(`attn2`, the text, and an I2V model's image keys) is never patched.

Here the tokens, a frames x rows x columns grid in frame-major order, are merged and their agents
chosen as in the image families, over boxes of `st` frames x `sy` rows x `sx` columns; both
attention products go through the same dispatcher and backend as Wan's own call.

Rotary rule (as Flux's, see `flux_attention`): a merged slot takes the angle of its
representative token, the destination of its group (the token itself for a source left alone);
an agent takes its group's representative's (a pooled agent, its box's destination's). The
relative angles between unmerged tokens stay exactly Wan's, and a merged token sits where the
token standing for its group sits, in time as in space.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.attention import agent_attention, attend
from ..core.merge import TokenMerge, cell_means
from ..core.sharded import sharded_agent_attention
from ..core.state import AGENT, CallPlan, LayerPlan
from .self_attention import ModuleAttentionProcessor

__all__ = ["WanAgentSDProcessor", "wan_attention_class", "wan_rotate"]


def wan_attention_class() -> type | None:
    """diffusers' `WanAttention` (Wan's attention module from diffusers 0.35), or None."""
    try:
        from diffusers.models.transformers.transformer_wan import WanAttention
    except ImportError:
        return None
    return WanAttention


def _default_wan_processor() -> Any:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    return WanAttnProcessor()


def wan_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding of x (B, S, H, D) by tables (B or 1, S, 1, D) whose entries repeat
    per interleaved pair, computed as diffusers' Wan processor does (in the tables' dtype, then
    back to x's), so that unmerged tokens rotate bit for bit as unpatched."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


class WanAgentSDProcessor(ModuleAttentionProcessor):
    """Agent attention for one Wan self-attention layer (see the module docstring).

    Takes the same arguments as `AgentSDProcessor`. Calls it does not act on go to the processor
    it replaced: cross-attention, masked calls, a custom processor, tokens that are not the
    planned grid.
    """

    @property
    def default_processor(self) -> Any:  # diffusers rebuilds an unbound one from the class
        return _default_wan_processor

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        call = self.state.call if self.state is not None else None
        plan = self.plan(attn, hidden_states, encoder_hidden_states, attention_mask, None, call)
        if plan is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        return self._wan_forward(attn, hidden_states, rotary_emb, plan, call)

    def unsupported_call(
        self, encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None, temb: torch.Tensor | None
    ) -> str | None:
        """Cross-attention, a masked call, or any processor other than Wan's own goes to the original."""
        if encoder_hidden_states is not None or attention_mask is not None:
            return "called with context or a mask"
        if type(self.original).__name__ != "WanAttnProcessor":
            return f"served by {type(self.original).__name__}, which agentsd hands every call to"
        return None

    def misfit(
        self, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor | None, plan: LayerPlan, call: CallPlan
    ) -> str | None:
        if hidden_states.ndim == 3 and hidden_states.shape[1] == plan.tokens:
            return None
        got = hidden_states.shape[1] if hidden_states.ndim == 3 else "video-shaped"
        around = f" with {plan.lead} + {plan.tail} cut-frame tokens" if plan.lead or plan.tail else ""
        return f"{got} tokens are not the {plan.f}x{plan.h}x{plan.w} token grid{around} of this call"

    def _wan_forward(
        self, attn: Any, hidden_states: torch.Tensor, rotary: Any, plan: LayerPlan, call: CallPlan
    ) -> torch.Tensor:
        config = self.state.config
        batch = hidden_states.shape[0]
        merge, agent_merge = self.merges(hidden_states, plan, call)
        x = merge.merge(hidden_states) if merge is not None else hidden_states
        query, key, value = self.project_qkv(attn, x)
        query, key = attn.norm_q(query), attn.norm_k(key)  # over every head at once, as Wan does
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # (B, S', H, D)
        if rotary is not None:
            cos, sin = self.angles(rotary, merge, plan, batch)
            query, key = wan_rotate(query, cos, sin), wan_rotate(key, cos, sin)

        out_dtype = query.dtype
        dtype = self.precision(attn) or out_dtype
        backend = self.backend(hidden_states.device)
        scale = query.shape[-1] ** -0.5  # what diffusers' dispatcher uses by default
        query, key, value = (t.transpose(1, 2).to(dtype) for t in (query, key, value))  # (B, H, S', D)
        if plan.mode == AGENT:
            agents = self.wan_agents(attn, hidden_states, plan, agent_merge, rotary).transpose(1, 2).to(dtype)
            if call.sequence.ranks > 1:  # this rank's shard: the agents of every rank, over every key
                out, _ = sharded_agent_attention(
                    query, key, value, agents, scale, config.k_scale2, config.k_shortcut, self.shard_group(), backend
                )
            else:
                out = agent_attention(query, key, value, agents, scale, config.k_scale2, config.k_shortcut, backend)
        elif call.sequence.ranks > 1:  # exact over every rank's merged tokens, as diffusers shards it
            out = self.attend_across_ranks(query, key, value, scale)
        else:
            out = attend(query, key, value, scale, backend)
        out = out.transpose(1, 2).flatten(2, 3).to(out_dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return merge.unmerge(out) if merge is not None else out

    def wan_agents(
        self, attn: Any, hidden_states: torch.Tensor, plan: LayerPlan, agent_merge: TokenMerge | None, rotary: Any
    ) -> torch.Tensor:
        """The agents (B, n, H, D): the agent tokens (a merge, or the box means) through the query
        projection and `norm_q`, rotated by their representatives' angles."""
        if plan.pool:
            grid = hidden_states[:, plan.lead : plan.tokens - plan.tail]
            tokens = cell_means(grid, plan.h, plan.w, plan.sx, plan.sy, plan.f, plan.st)
        else:
            tokens = agent_merge.merge(hidden_states)
        agents = attn.norm_q(self.project_q(attn, tokens)).unflatten(2, (attn.heads, -1))
        if rotary is None:
            return agents
        batch = hidden_states.shape[0]
        slots = plan.dst.expand(batch, -1) if agent_merge is None else agent_merge.representatives(plan.dst)
        return wan_rotate(agents, *_rows(rotary, slots))

    @staticmethod
    def angles(rotary: Any, merge: TokenMerge | None, plan: LayerPlan, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the merged sequence, each (B or 1, S', 1, D): a slot at its representative's angle."""
        if merge is None:
            return rotary[0], rotary[1]
        return _rows(rotary, merge.representatives(plan.dst))


def _rows(rotary: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) rows of Wan's rotary tables (1, N, 1, D) at `tokens` (B, S): (B, S, 1, D) each."""
    cos, sin = (table[0, :, 0][tokens].unsqueeze(2) for table in rotary)
    return cos, sin
