"""The attention processor that runs agent attention on one self-attention layer."""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models import attention_processor
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, XFormersAttnProcessor

from ..core.attention import DISPATCH, agent_attention, attend
from ..core.merge import TokenMerge, bipartite_matching, cell_means
from ..core.state import AGENT, TOME, AgentSDState, CallPlan, LayerPlan

__all__ = [
    "AGENT", "TOME", "AgentSDProcessor", "AgentSDState", "CallPlan", "LayerPlan", "ModuleAttentionProcessor",
    "choose_backend",
]  # fmt: skip

# Processors that project with the fused `to_qkv` (and `to_added_qkv`) of `fuse_qkv_projections()`.
FUSED_PROCESSORS = tuple(
    cls
    for cls in (
        getattr(attention_processor, "FusedAttnProcessor2_0", None),
        getattr(attention_processor, "FusedJointAttnProcessor2_0", None),
    )
    if cls is not None
)


# Why a layer hands its calls over under diffusers' context parallelism: each rank holds a shard of
# the tokens, which the delegate attends across the ranks (Ulysses or ring).
CONTEXT_PARALLEL = "context parallelism: diffusers attends exactly across the ranks' shards"


def choose_backend(configured: str | None, delegate: Any, device: torch.device) -> str:
    """The attention kernel of agentsd's calls: the configured one; else, where the processor
    agentsd delegates to goes through diffusers' attention dispatcher, the same dispatcher with
    the backend the user set on the model (`set_attention_backend`), or its active one; else
    xformers where that processor is xformers' and the device is CUDA; else SDPA."""
    if configured is not None:
        return configured
    if hasattr(delegate, "_attention_backend"):
        name = delegate._attention_backend
        return DISPATCH if name is None else f"{DISPATCH}:{getattr(name, 'value', name)}"
    return "xformers" if isinstance(delegate, XFormersAttnProcessor) and device.type == "cuda" else "sdpa"


class AgentSDProcessor:
    """Self-attention through merged tokens and agents, for one diffusers `Attention`.

    Runs agent attention (agent phase) or softmax attention over ToMe-merged tokens
    (ToMe-only phase) on the layer's self-attention, and hands every call it does not act
    on to the processor it replaced: cross-attention, masked attention, layers whose grid
    does not fit the latent, and merge settings that leave every token in place.

    diffusers rebuilds some processors from their class with no arguments (`load_ip_adapter`,
    `unload_ip_adapter`): such an unbound processor runs the default attention, and the patch
    wraps what it delegates to again at the next UNet call.

    diffusers passes a processor only the `cross_attention_kwargs` its `__call__` names: this
    processor's signature names those of the processor it delegates to as well, so a custom
    processor's own arguments still reach it (in the calls agentsd hands over; agent attention
    and token merging themselves take none).

    Args:
        original: the processor this one replaced; it keeps serving the other calls. None:
            diffusers' default (`AttnProcessor2_0`).
        state: the UNet's shared run-time state; None for an unbound processor.
        name: the layer's processor name in `unet.attn_processors`.
        downsample: how many times the layer's level is downsampled relative to the latent.
    """

    # What an unbound processor (rebuilt by diffusers from the class alone) runs.
    default_processor: type = AttnProcessor2_0

    def __init__(self, original: Any = None, state: AgentSDState | None = None, name: str = "", downsample: int = 1):
        self.original = self.default_processor() if original is None else original
        self.state = state
        self.name = name
        if state is not None:
            state.register(name, downsample)
        self._sign()

    @classmethod
    def serving(cls, delegate: Any) -> type | None:
        """The agentsd processor class that wraps `delegate`: this class, or one made for that kind of
        processor (an IP-Adapter's); None where agentsd cannot wrap it: it holds weights that no
        agentsd class keeps in the model (`agentsd.processors.shared_weights`)."""
        if isinstance(delegate, torch.nn.Module) and any(True for _ in delegate.parameters()):
            return None
        return cls

    def _sign(self) -> None:
        """Give this instance a `__call__` whose signature also names the delegate's keyword
        arguments (diffusers reads `inspect.signature(processor.__call__)` to filter them)."""
        own = inspect.signature(type(self).__call__).parameters
        params = dict(own)
        try:
            delegate = inspect.signature(self.original.__call__).parameters
        except (TypeError, ValueError):  # a callable without a signature: nothing to add
            delegate = {}
        for name, param in delegate.items():
            if name not in params and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                params[name] = param.replace(kind=param.KEYWORD_ONLY)
        if len(params) == len(own):
            return
        owner = type(self)

        def call(processor: AgentSDProcessor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return owner.__call__(processor, *args, **kwargs)

        call.__signature__ = inspect.Signature(sorted(params.values(), key=lambda p: p.kind))
        self.__dict__["__call__"] = types.MethodType(call, self)

    @property
    def _attention_backend(self) -> Any:
        """The delegate's dispatcher backend: `model.set_attention_backend(...)` sets it on every
        processor that has this attribute, so after patching it still reaches the delegate."""
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, backend: Any) -> None:
        if hasattr(self.original, "_attention_backend"):
            self.original._attention_backend = backend

    @property
    def _parallel_config(self) -> Any:
        """The delegate's context-parallel configuration: `model.enable_parallelism(...)` sets it on
        every processor that has this attribute, so before or after patching it reaches the
        delegate, which then attends across the ranks' shards."""
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, config: Any) -> None:
        if hasattr(self.original, "_parallel_config"):
            self.original._parallel_config = config

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "__call__"}  # rebuilt when loaded

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._sign()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        call = self.state.call if self.state is not None else None
        plan = self.plan(attn, hidden_states, encoder_hidden_states, attention_mask, temb, call)
        if plan is None:
            if temb is not None:
                kwargs["temb"] = temb
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
        return self._forward(attn, hidden_states, plan, call, encoder_hidden_states)

    def plan(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        call: CallPlan | None = None,
    ) -> LayerPlan | None:
        """This layer's plan in the UNet call (`AgentSDState.begin_call`; by default the current
        thread's); None hands the call to the original. A planned call that cannot run as
        planned is recorded in the call, with the reason."""
        if self.state is None or not self.state.active:
            return None
        call = call if call is not None else self.state.call
        if call is not None:
            call.ran.add(self.name)  # its block ran: no step cache skipped it in this call
        plan = None if call is None else call.plans.get(self.name)
        if plan is None:
            return None
        sharded = self._parallel_config is not None and call.sequence.ranks == 1  # not planned for shards
        reason = CONTEXT_PARALLEL if sharded else None
        reason = reason or self.unsupported_call(encoder_hidden_states, attention_mask, temb)
        if reason is None:
            reason = self.misfit(attn, hidden_states, encoder_hidden_states, plan, call)
        if reason is not None:
            self.state.hand_over(call, self.name, reason)
            return None
        return plan

    def unsupported_call(
        self, encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None, temb: torch.Tensor | None
    ) -> str | None:
        """Why a call with these inputs goes to the original (None: agentsd can run it): this
        processor runs self-attention only, unmasked."""
        if encoder_hidden_states is not None or attention_mask is not None or temb is not None:
            return "called with context, a mask or temb"
        return None

    def misfit(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None,
        plan: LayerPlan,
        call: CallPlan,
    ) -> str | None:
        """Why a supported call cannot run as planned (None: it can): its tokens are not the
        plan's grid, or the layer normalizes spatially."""
        if hidden_states.ndim != 3 or plan.tokens != hidden_states.shape[1]:
            return (
                f"{hidden_states.shape[1] if hidden_states.ndim == 3 else 'image-shaped'} tokens do not fit the "
                f"{plan.h}x{plan.w} grid (another patch changes this block's tokens?)"
            )
        if attn.spatial_norm is not None or attn.group_norm is not None:
            return "the layer normalizes spatially"
        return None

    def precision(self, attn: Attention) -> torch.dtype | None:
        """The dtype both softmaxes run in; None keeps the model's dtype."""
        wanted = self.state.config.attn_precision
        if wanted is None and (attn.upcast_attention or attn.upcast_softmax):
            wanted = "fp32"
        return torch.float32 if wanted == "fp32" else None

    def backend(self, device: torch.device) -> str:
        """The attention kernel on `device` (see `choose_backend`)."""
        configured = None if self.state is None else self.state.config.attention_backend
        return choose_backend(configured, self.original, device)

    def fused(self, attn: Attention) -> bool:
        """Whether the processor served projects with the fused `to_qkv` (`fuse_qkv_projections`)."""
        return isinstance(self.original, FUSED_PROCESSORS) and getattr(attn, "to_qkv", None) is not None

    def project_qkv(self, attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query, key and value of `x`: one fused product where the projections are fused."""
        if self.fused(attn):
            return attn.to_qkv(x).chunk(3, dim=-1)
        return attn.to_q(x), attn.to_k(x), attn.to_v(x)

    def project_added_qkv(self, attn: Attention, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The text tokens' query, key and value (SD 3's and Flux's added projections): one fused
        product where the projections are fused."""
        if self.fused(attn) and getattr(attn, "to_added_qkv", None) is not None:
            return attn.to_added_qkv(context).chunk(3, dim=-1)
        return attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context)

    def project_q(self, attn: Attention, x: torch.Tensor) -> torch.Tensor:
        """The query projection of `x`, from the fused weights where the projections are fused."""
        if self.fused(attn):
            inner = attn.to_qkv.out_features // 3
            bias = attn.to_qkv.bias
            return F.linear(x, attn.to_qkv.weight[:inner], None if bias is None else bias[:inner])
        return attn.to_q(x)

    def merges(
        self, hidden_states: torch.Tensor, plan: LayerPlan, call: CallPlan
    ) -> tuple[TokenMerge | None, TokenMerge | None]:
        """The ToMe merge (None when `r == 0`) and the agent merge (None unless agents come from
        merging); with `share_matching`, those of the grid's first layer in this UNet call."""
        shared = call.shared if self.state.config.share_matching else None
        key = (plan.f, plan.h, plan.w)
        if shared is not None and key in shared:
            return shared[key]
        merge = agent_merge = None
        if plan.matches:
            matching = bipartite_matching(hidden_states, plan.dst, plan.src)
            merge = matching.plan(plan.r) if plan.r > 0 else None
            if plan.mode == AGENT and not plan.pool:
                agent_merge = matching.plan(plan.r_agent)
        if shared is not None:
            shared[key] = (merge, agent_merge)
        return merge, agent_merge

    def agents(
        self, attn: Attention, hidden_states: torch.Tensor, plan: LayerPlan, agent_merge: TokenMerge | None, heads: Any
    ) -> torch.Tensor:
        """The agents, split into heads: the agent tokens (a merge, or the cell means) projected
        with the query projection, and normalized as queries are (`norm_q`)."""
        if plan.pool:
            tokens = cell_means(hidden_states, plan.h, plan.w, plan.sx, plan.sy, plan.f, plan.st)
        else:
            tokens = agent_merge.merge(hidden_states)
        agents = heads(self.project_q(attn, tokens))
        norm_q = getattr(attn, "norm_q", None)
        return agents if norm_q is None else norm_q(agents)

    def _forward(
        self, attn: Attention, hidden_states: torch.Tensor, plan: LayerPlan, call: CallPlan, context: Any = None
    ) -> torch.Tensor:
        config = self.state.config
        batch = hidden_states.shape[0]
        merge, agent_merge = self.merges(hidden_states, plan, call)
        x = merge.merge(hidden_states) if merge is not None else hidden_states

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        # norm_q / norm_k (QK normalization): diffusers 0.27's Attention has neither attribute.
        norm_q, norm_k = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
        query, key, value = (heads(t) for t in self.project_qkv(attn, x))
        if norm_q is not None:
            query = norm_q(query)
        if norm_k is not None:
            key = norm_k(key)
        out_dtype = query.dtype
        dtype = self.precision(attn) or out_dtype
        backend = self.backend(hidden_states.device)
        if plan.mode == AGENT:
            agents = self.agents(attn, hidden_states, plan, agent_merge, heads)
            out = agent_attention(
                query.to(dtype),
                key.to(dtype),
                value.to(dtype),
                agents.to(dtype),
                attn.scale,
                config.k_scale2,
                config.k_shortcut,
                backend,
            )
        else:
            out = attend(query.to(dtype), key.to(dtype), value.to(dtype), attn.scale, backend)
        out = out.to(out_dtype).transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        if merge is not None:
            out = merge.unmerge(out)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class ModuleAttentionProcessor(AgentSDProcessor):
    """The base of agentsd's processors for diffusers' newer attention modules (`AttentionModuleMixin`:
    Flux's `FluxAttention`, Wan's `WanAttention`): they have no upcast flags, and mark fused
    projections on the module itself."""

    def precision(self, attn: Any) -> torch.dtype | None:
        """No upcast flags: only the config's `attn_precision` upcasts."""
        return torch.float32 if self.state.config.attn_precision == "fp32" else None

    def fused(self, attn: Any) -> bool:
        """The module marks fused projections itself (`fused_projections`)."""
        return bool(getattr(attn, "fused_projections", False)) and getattr(attn, "to_qkv", None) is not None

    def attend_across_ranks(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Exact attention of this rank's queries (B, H, S, D) over every rank's keys, through
        diffusers' dispatcher with the model's backend and context-parallel configuration (Ulysses
        or ring), as the module's own processor attends across the shards."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out = dispatch_attention_fn(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )  # fmt: skip
        return out.transpose(1, 2)

    def shard_group(self) -> Any:
        """The process group of every rank holding a shard of the sequence (ring x Ulysses)."""
        return self._parallel_config.context_parallel_config._flattened_mesh.get_group()
