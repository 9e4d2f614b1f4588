"""Agent attention in Flux's attention: rotary positions, double- and single-stream blocks.

diffusers' `FluxAttnProcessor` projects, normalizes (`norm_q`, `norm_k`; the text's
`norm_added_q`, `norm_added_k`), applies rotary position embeddings to every query and key,
and runs one attention over the sequence [text; image] through diffusers' attention dispatcher:

- a double-stream block's layer gets the image stream (`hidden_states`) and the text
  (`encoder_hidden_states`, its own projections) and returns both, through `to_out` and
  `to_add_out`;
- a single-stream block's layer gets [text; image] as one sequence, projected alike, and
  returns the attention output with no projection. It is not told where the text ends: the
  per-call plan is (`Sequence.text`, read from the transformer's call).

Here the image grid's tokens (the first h x w of the image stream, row-major) are merged and
their agents chosen as in the other families; the text tokens, and the tokens after the grid
(Kontext's reference image, `Sequence.extra`), are never merged. The agents gather from every
key; the grid's queries take the agents' broadcast plus their own value shortcut; the other
queries run exact attention over every key. In the ToMe phase every query attends exactly over
the merged sequence.

Rotary rule: a merged slot takes the rotary angle of its representative token: the destination
for a slot that holds merged sources, the token itself otherwise; an agent takes its group's
representative's (a pooled agent, its cell's destination's). The merged token is the mean of
its group, and the destination stands for the group in position as it does in value: an angle
averaged over the group would be no token's position (rotations do not average to a rotation),
and the relative angles between unmerged tokens stay exactly Flux's.

Under diffusers' context parallelism each rank holds a run of the text tokens and a run of whole
grid rows, with their rotary rows (the family's `shard`): the grid run is merged by the same
shard-local plan on every rank. In the agent phase the agents and the text queries of every rank
meet every rank's keys in one pass (`agentsd.core.sharded`); in the ToMe phase every query attends
exactly across the ranks' merged sequences through diffusers' Ulysses or ring.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.attention import agent_attention, attend
from ..core.sharded import sharded_agent_attention
from ..core.state import AGENT, CallPlan, LayerPlan
from .self_attention import ModuleAttentionProcessor
from .shared_weights import SharedWeights

try:  # diffusers 0.35 and later, with FluxAttention
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
except ImportError:
    FluxIPAdapterAttnProcessor = None

__all__ = ["FluxAgentSDProcessor", "FluxIPAgentSDProcessor", "flux_attention_class"]


def flux_attention_class() -> type | None:
    """diffusers' `FluxAttention` (the attention module of Flux from diffusers 0.35), or None."""
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention
    except ImportError:
        return None
    return FluxAttention


def _default_flux_processor() -> Any:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return FluxAttnProcessor()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, H, S, D) with angles (B or 1, 1, S, D), as diffusers'
    `apply_rotary_emb` computes it for Flux: interleaved pairs, in float32."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack((-imag, real), dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


class FluxAgentSDProcessor(ModuleAttentionProcessor):
    """Agent attention for one Flux attention layer (see the module docstring).

    Takes the same arguments as `AgentSDProcessor`. Calls it does not act on go to the
    processor it replaced: masked calls, IP-Adapter processors (their image-prompt attention is
    theirs), a sequence that does not hold the planned grid.
    """

    @property
    def default_processor(self) -> Any:  # diffusers rebuilds an unbound one from the class
        return _default_flux_processor

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        call = self.state.call if self.state is not None else None
        plan = self.plan(attn, hidden_states, encoder_hidden_states, attention_mask, None, call)
        if plan is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        return self._flux_forward(attn, hidden_states, encoder_hidden_states, image_rotary_emb, plan, call)

    @classmethod
    def serving(cls, delegate: Any) -> type | None:
        """`FluxIPAgentSDProcessor` for an IP-Adapter's processor, else as `AgentSDProcessor.serving`."""
        if FluxIPAdapterAttnProcessor is not None and isinstance(delegate, FluxIPAdapterAttnProcessor):
            return FluxIPAgentSDProcessor
        return super().serving(delegate)

    def unsupported_call(
        self, encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None, temb: torch.Tensor | None
    ) -> str | None:
        """A masked call, or any call to a processor other than Flux's own (a custom one), goes to
        the original."""
        if attention_mask is not None:
            return "called with an attention mask"
        if type(self.original).__name__ != "FluxAttnProcessor":
            return f"served by {type(self.original).__name__}, which agentsd hands every call to"
        return None

    def misfit(
        self, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor | None, plan: LayerPlan, call: CallPlan
    ) -> str | None:
        """Why the call's tokens are not the call's [text;] grid [; extra] (None: they are)."""
        text = 0 if context is not None else call.sequence.text
        expected = text + plan.h * plan.w + call.sequence.extra
        if hidden_states.ndim == 3 and hidden_states.shape[1] == expected:
            return None
        return (
            f"{hidden_states.shape[1] if hidden_states.ndim == 3 else 'image-shaped'} tokens are not the "
            f"{text} text + {plan.h}x{plan.w} grid + {call.sequence.extra} extra tokens of this call"
        )

    def _flux_forward(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None,
        rotary: Any,
        plan: LayerPlan,
        call: CallPlan,
    ) -> Any:
        config, sequence = self.state.config, call.sequence
        batch, grid_tokens = hidden_states.shape[0], plan.h * plan.w
        single = context is None
        text_len = sequence.text if single else context.shape[1]
        grid = hidden_states[:, text_len : text_len + grid_tokens] if single else hidden_states[:, :grid_tokens]
        merge, agent_merge = self.merges(grid, plan, call)
        merged = merge.merge(grid) if merge is not None else grid
        size = merged.shape[1]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        # The sequence in diffusers' order, with the grid merged: [text; merged grid; extra] (the
        # text with its own projections in a double-stream layer).
        if single:
            x = torch.cat([hidden_states[:, :text_len], merged, hidden_states[:, text_len + grid_tokens :]], dim=1)
        else:
            x = torch.cat([merged, hidden_states[:, grid_tokens:]], dim=1) if sequence.extra else merged
        query, key, value = (heads(t) for t in self.project_qkv(attn, x))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if not single:
            text_q, text_k, text_v = (heads(t) for t in self.project_added_qkv(attn, context))
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, dim=2) for pair in ((text_q, query), (text_k, key), (text_v, value)))
        angles = None
        if rotary is not None:
            angles = self.angles(rotary, text_len, grid_tokens, merge, plan, batch)
            query, key = rotate(query, *angles), rotate(key, *angles)

        out_dtype = query.dtype
        dtype = self.precision(attn) or out_dtype
        backend = self.backend(hidden_states.device)
        scale = query.shape[-1] ** -0.5  # what diffusers' dispatcher uses by default
        keys, values = key.to(dtype), value.to(dtype)
        start, stop = text_len, text_len + size  # the merged grid in the sequence
        if plan.mode == AGENT:
            agents = self.agents(attn, grid, plan, agent_merge, heads)
            if angles is not None:
                agents = rotate(agents, *self.agent_angles(rotary, text_len, agent_merge, plan, batch))
            image_q, agents = query[:, :, start:stop].to(dtype), agents.to(dtype)
            others = torch.cat([query[:, :, :start], query[:, :, stop:]], dim=2).to(dtype)
            if sequence.ranks > 1:  # this rank's shard; its text queries answered in the agents' pass
                image, others = sharded_agent_attention(
                    image_q, keys, values, agents, scale, config.k_scale2, config.k_shortcut, self.shard_group(),
                    backend, shortcut=values[:, :, start:stop], exact=others,
                )  # fmt: skip
            else:
                image = agent_attention(
                    image_q, keys, values, agents, scale, config.k_scale2, config.k_shortcut, backend,
                    shortcut=values[:, :, start:stop],
                )  # fmt: skip
                others = attend(others, keys, values, scale, backend)
            out = torch.cat([others[:, :, :start], image, others[:, :, start:]], dim=2)
        elif sequence.ranks > 1:  # exact over every rank's [text; merged grid], as diffusers shards it
            out = self.attend_across_ranks(query.to(dtype), keys, values, scale)
        else:
            out = attend(query.to(dtype), keys, values, scale, backend)
        out = out.to(out_dtype).transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1])

        if single:
            grid_out = out[:, start:stop]
            grid_out = merge.unmerge(grid_out) if merge is not None else grid_out
            return torch.cat([out[:, :start], grid_out, out[:, stop:]], dim=1)
        text, image = out[:, :text_len], out[:, text_len:]
        image = attn.to_out[1](attn.to_out[0](image))
        if merge is not None:
            image = torch.cat([merge.unmerge(image[:, :size]), image[:, size:]], dim=1)
        return image, attn.to_add_out(text)

    @staticmethod
    def angles(
        rotary: Any, text_len: int, grid_tokens: int, merge: Any, plan: LayerPlan, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the sequence [text; merged grid; extra], each (B or 1, 1, S, D): the
        merged grid's slots at their representatives' angles."""
        if merge is None:
            cos, sin = (table[None, None] for table in rotary)
            return cos, sin
        slots = merge.representatives(plan.dst)
        result = []
        for table in rotary:
            grid = table[text_len : text_len + grid_tokens][slots]  # (B, N', D)
            text, extra = table[:text_len].expand(batch, -1, -1), table[text_len + grid_tokens :].expand(batch, -1, -1)
            result.append(torch.cat([text, grid, extra], dim=1).unsqueeze(1))
        return result[0], result[1]

    @staticmethod
    def agent_angles(
        rotary: Any, text_len: int, agent_merge: Any, plan: LayerPlan, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The agents' (cos, sin): their groups' representatives' angles (pooled agents: their
        cells' destinations')."""
        tokens = plan.dst.expand(batch, -1) if agent_merge is None else agent_merge.representatives(plan.dst)
        cos, sin = (table[text_len:][tokens].unsqueeze(1) for table in rotary)
        return cos, sin


if FluxIPAdapterAttnProcessor is not None:

    class FluxIPAgentSDProcessor(SharedWeights, FluxAgentSDProcessor, FluxIPAdapterAttnProcessor):
        """Agent attention for a Flux layer served by an IP-Adapter (`FluxIPAdapterAttnProcessor`,
        which `load_ip_adapter` puts on the double-stream blocks).

        The attention over [text; image] runs as in `FluxAgentSDProcessor`; the adapter's
        image-prompt attention runs exactly as the adapter computes it (every image token's
        normalized query, before the rotary embedding, over each image prompt's keys and values,
        weighted by the adapter's `scale`) and is returned as the adapter returns it, a third
        output the block adds. So at scale 0 the output is the patched output without the adapter.
        The adapter's weights stay in the model under their names (`SharedWeights`);
        `set_ip_adapter_scale` and `unload_ip_adapter` reach it as they would unpatched.
        """

        def unsupported_call(
            self,
            encoder_hidden_states: torch.Tensor | None,
            attention_mask: torch.Tensor | None,
            temb: torch.Tensor | None,
        ) -> str | None:
            return "called with an attention mask" if attention_mask is not None else None

        def __call__(
            self,
            attn: Any,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            image_rotary_emb: Any = None,
            ip_hidden_states: list[torch.Tensor] | None = None,
            ip_adapter_masks: torch.Tensor | None = None,
        ) -> Any:
            call = self.state.call if self.state is not None else None
            plan = self.plan(attn, hidden_states, encoder_hidden_states, attention_mask, None, call)
            if plan is None or (encoder_hidden_states is not None and ip_hidden_states is None):
                return self.original(
                    attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, ip_hidden_states,
                    ip_adapter_masks,
                )  # fmt: skip
            out = self._flux_forward(attn, hidden_states, encoder_hidden_states, image_rotary_emb, plan, call)
            if encoder_hidden_states is None:  # a single-stream block: the adapter adds nothing there
                return out
            return (*out, self.image_prompt(attn, hidden_states, ip_hidden_states))

        def image_prompt(self, attn: Any, hidden_states: torch.Tensor, ip_hidden_states: list) -> torch.Tensor:
            """The adapter's output: the sum over its image prompts of `scale` times the attention of
            the image tokens' queries over the prompt's projected tokens."""
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            adapter, batch = self.original, hidden_states.shape[0]
            query = attn.norm_q(self.project_q(attn, hidden_states).unflatten(-1, (attn.heads, -1)))
            out = query.new_zeros(batch, query.shape[1], attn.heads * attn.head_dim)
            for states, scale, to_k, to_v in zip(
                ip_hidden_states, adapter.scale, adapter.to_k_ip, adapter.to_v_ip, strict=False
            ):
                key = to_k(states).view(batch, -1, attn.heads, attn.head_dim)
                value = to_v(states).view(batch, -1, attn.heads, attn.head_dim)
                prompt = dispatch_attention_fn(
                    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                    backend=adapter._attention_backend, parallel_config=adapter._parallel_config,
                )  # fmt: skip
                out += scale * prompt.reshape(batch, -1, attn.heads * attn.head_dim).to(query.dtype)
            return out

else:
    FluxIPAgentSDProcessor = None
