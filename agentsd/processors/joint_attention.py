"""Agent attention in joint attention: image and text tokens attending together (SD 3 / 3.5).

diffusers' `JointAttnProcessor2_0` projects the image tokens with `to_q/k/v` and the text tokens
with `add_q/k/v_proj`, normalizes each (SD 3.5: `norm_q`, `norm_k`, `norm_added_q`,
`norm_added_k`), runs one attention over [image; text] and splits the output: the image part
through `to_out`, the text part through `to_add_out` (unless the block is `context_pre_only`).
Called without text (SD 3.5's image-only `attn2`) it is plain self-attention.

Here the image tokens are merged on their patch grid and their agents chosen exactly as in the
UNet path; the text tokens are never merged:

- agent phase: the agents gather from every key, image (merged) and text; the image queries
  take the agents' broadcast plus the value shortcut of their own tokens; the text queries run
  exact attention over every key (a few hundred text tokens: cheap);
- ToMe phase: exact attention of every query over every key, the image tokens merged.

The image output is unmerged back to every image token; the text output is as diffusers gives it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models import attention_processor
from diffusers.models.attention_processor import Attention

from ..core.attention import agent_attention, attend
from ..core.state import AGENT, CallPlan, LayerPlan
from .self_attention import AgentSDProcessor
from .shared_weights import SharedWeights

__all__ = ["JointAgentSDProcessor", "JointIPAgentSDProcessor"]

# diffusers releases before SD 3 have no joint processor: such a processor is then never made;
# nor before SD 3's IP-Adapter.
_JOINT = getattr(attention_processor, "JointAttnProcessor2_0", None)
_JOINT_IP = getattr(attention_processor, "SD3IPAdapterJointAttnProcessor2_0", None)


class JointAgentSDProcessor(AgentSDProcessor):
    """Agent attention for one SD 3 / 3.5 joint-attention layer (see the module docstring).

    Takes the same arguments as `AgentSDProcessor`; it hands to the processor it replaced every
    call it does not act on (a masked call, a grid that does not fit, the phases' exact layers).
    """

    default_processor = _JOINT

    @classmethod
    def serving(cls, delegate: Any) -> type | None:
        """`JointIPAgentSDProcessor` for SD 3's IP-Adapter processor, else as `AgentSDProcessor.serving`."""
        if _JOINT_IP is not None and isinstance(delegate, _JOINT_IP):
            return JointIPAgentSDProcessor
        return super().serving(delegate)

    def unsupported_call(
        self, encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None, temb: torch.Tensor | None
    ) -> str | None:
        """Joint attention takes text (`encoder_hidden_states`); a mask or temb goes to the original."""
        if attention_mask is not None or temb is not None:
            return "called with a mask or temb"
        return None

    def _forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        plan: LayerPlan,
        call: CallPlan,
        context: torch.Tensor | None = None,
        added: torch.Tensor | None = None,
    ) -> Any:
        """Joint attention through merged image tokens and agents; `added` (B, N, C), an adapter's
        output, joins the image output before the output projection, per image token."""
        config = self.state.config
        batch = hidden_states.shape[0]
        merge, agent_merge = self.merges(hidden_states, plan, call)
        x = merge.merge(hidden_states) if merge is not None else hidden_states

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(t) for t in self.project_qkv(attn, x))
        query, key = _norm(attn, "norm_q", query), _norm(attn, "norm_k", key)
        keys, values = key, value
        text_query = None
        if context is not None:
            text_query, text_key, text_value = (heads(t) for t in self.project_added_qkv(attn, context))
            text_query, text_key = _norm(attn, "norm_added_q", text_query), _norm(attn, "norm_added_k", text_key)
            keys, values = torch.cat([key, text_key], dim=2), torch.cat([value, text_value], dim=2)
        out_dtype = query.dtype
        dtype = self.precision(attn) or out_dtype
        backend = self.backend(hidden_states.device)
        scale = query.shape[-1] ** -0.5  # what diffusers' joint processor uses (SDPA's default)
        keys, values = keys.to(dtype), values.to(dtype)
        if plan.mode == AGENT:
            agents = self.agents(attn, hidden_states, plan, agent_merge, heads).to(dtype)
            image = agent_attention(
                query.to(dtype), keys, values, agents, scale, config.k_scale2, config.k_shortcut, backend,
                shortcut=value.to(dtype),
            )  # fmt: skip
            text = None if text_query is None else attend(text_query.to(dtype), keys, values, scale, backend)
        else:
            queries = query if text_query is None else torch.cat([query, text_query], dim=2)
            out = attend(queries.to(dtype), keys, values, scale, backend)
            image, text = out[:, :, : query.shape[2]], (None if text_query is None else out[:, :, query.shape[2] :])

        image = image.to(out_dtype).transpose(1, 2).reshape(batch, -1, attn.heads * image.shape[-1])
        if added is not None:
            image = (merge.unmerge(image) if merge is not None else image) + added
            merge = None
        image = attn.to_out[1](attn.to_out[0](image))
        if merge is not None:
            image = merge.unmerge(image)
        if text is None:
            return image
        text = text.to(out_dtype).transpose(1, 2).reshape(batch, -1, attn.heads * text.shape[-1])
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


def _norm(attn: Attention, name: str, t: torch.Tensor) -> torch.Tensor:
    norm = getattr(attn, name, None)
    return t if norm is None else norm(t)


if _JOINT_IP is not None:

    class JointIPAgentSDProcessor(SharedWeights, JointAgentSDProcessor, _JOINT_IP):
        """Agent attention for an SD 3 layer served by an IP-Adapter (`SD3IPAdapterJointAttnProcessor2_0`,
        which `load_ip_adapter` puts on every attention layer).

        The joint attention runs as in `JointAgentSDProcessor`; the adapter's image-prompt attention
        runs exactly as the adapter computes it (every image token's query, normalized by the
        adapter, over every image token's key and the image prompt's, with their values), weighted
        by the adapter's `scale` and added to the image output before the output projection, where
        the adapter adds it; at scale 0 (or with no image prompt) it is skipped, as the adapter
        skips it. That branch attends over every image token, so with an IP-Adapter agentsd saves
        only the joint attention's work. The adapter's weights stay in the model under their names
        (`SharedWeights`); `set_ip_adapter_scale` and `unload_ip_adapter` reach it as they would
        unpatched.
        """

        def unsupported_call(
            self,
            encoder_hidden_states: torch.Tensor | None,
            attention_mask: torch.Tensor | None,
            temb: torch.Tensor | None,
        ) -> str | None:
            return "called with a mask" if attention_mask is not None else None  # temb is the adapter's

        def __call__(
            self,
            attn: Attention,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            ip_hidden_states: torch.Tensor | None = None,
            temb: torch.Tensor | None = None,
        ) -> Any:
            call = self.state.call if self.state is not None else None
            plan = self.plan(attn, hidden_states, encoder_hidden_states, attention_mask, None, call)
            if plan is None:
                return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, ip_hidden_states, temb)
            added = None
            if self.original.scale != 0 and ip_hidden_states is not None:
                added = self.image_prompt(attn, hidden_states, ip_hidden_states, temb) * self.original.scale
            return self._forward(attn, hidden_states, plan, call, encoder_hidden_states, added)

        def image_prompt(
            self, attn: Attention, hidden_states: torch.Tensor, ip_hidden_states: torch.Tensor, temb: torch.Tensor
        ) -> torch.Tensor:
            """The adapter's attention of the image tokens over [image tokens; image prompt], (B, N, C)."""
            adapter, batch = self.original, hidden_states.shape[0]

            def heads(t: torch.Tensor) -> torch.Tensor:
                return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

            query, key, value = (heads(p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
            prompt = adapter.norm_ip(ip_hidden_states, temb=temb)
            prompt_key, prompt_value = heads(adapter.to_k_ip(prompt)), heads(adapter.to_v_ip(prompt))
            query = adapter.norm_q(query)
            keys = torch.cat([adapter.norm_k(key), adapter.norm_ip_k(prompt_key)], dim=2)
            out = F.scaled_dot_product_attention(query, keys, torch.cat([value, prompt_value], dim=2))
            return out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)

else:
    JointIPAgentSDProcessor = None
