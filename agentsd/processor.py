"""The attention processor that runs agent attention, and the per-UNet state it reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, XFormersAttnProcessor

from .attention import agent_attention, attend
from .config import AgentSDConfig
from .merge import TokenMerge, bipartite_matching, cell_means, destination_indices, merge_count, source_indices

AGENT = "agent"
TOME = "tome"


@dataclass(frozen=True)
class PhaseSettings:
    """Merge settings of one phase; `agent_ratio` is None in the ToMe-only phase."""

    sx: int
    sy: int
    ratio: float
    agent_ratio: float | None


@dataclass
class LayerPlan:
    """What one layer does in the current UNet call: the mode, the grid and its cells, the
    destination and source positions, the merge sizes (`r` ToMe-merged, `r_agent` merged into
    agents) and whether the agents are cell means (`pool`) rather than a merge."""

    mode: str
    h: int
    w: int
    sx: int
    sy: int
    dst: torch.Tensor
    src: torch.Tensor
    r: int
    r_agent: int
    pool: bool = False

    @property
    def matches(self) -> bool:
        """Whether this plan needs the bipartite matching (a merge, or agents by merging)."""
        return self.r > 0 or (self.mode == AGENT and not self.pool)


class AgentSDState:
    """Run-time state shared by every patched layer of one UNet.

    The UNet's forward pre-hook calls `begin_call` with the latent and the timestep. Every
    decision that depends only on them (the phase, each layer's grid, its destination draw
    and merge sizes) is made there, once per UNet call, outside any compiled graph; the
    processors only look their plan up. Nothing else carries over between UNet calls: the
    generator is reseeded from `config.seed` and the timestep, so a pipeline call is
    reproducible.

    Args:
        config: the agent-attention configuration.
        num_train_timesteps: the scheduler's T; the phase is decided by `1 - t / T`.
    """

    def __init__(self, config: AgentSDConfig, num_train_timesteps: int = 1000):
        self.config = config
        self.num_train_timesteps = num_train_timesteps
        self.latent_hw: tuple[int, int] | None = None
        self.agent_phase = False
        self.generator = torch.Generator()
        self.layers: dict[str, int] = {}
        self.plans: dict[str, LayerPlan | None] = {}
        # With `share_matching`: the merges of each grid in the current UNet call.
        self.shared: dict[tuple[int, int], tuple[TokenMerge | None, TokenMerge | None]] = {}
        self._fixed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def register(self, name: str, downsample: int) -> None:
        """Declare a patched layer and the downsampling of its level relative to the latent."""
        self.layers[name] = downsample

    def progress(self, timestep: float) -> float:
        return 1.0 - timestep / self.num_train_timesteps

    def is_agent_phase(self, timestep: float) -> bool:
        agent_steps = self.config.agent_steps
        return agent_steps >= 1.0 or self.progress(timestep) < agent_steps

    @torch.compiler.disable
    def begin_call(self, sample: torch.Tensor, timestep: torch.Tensor | float) -> None:
        """Decide the phase and every layer's plan for the UNet call about to run."""
        self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        self.agent_phase = self.is_agent_phase(t)
        self.generator.manual_seed((self.config.seed * 1_000_003 + round(t * 1000)) % (2**63))
        randomize = self.config.use_rand and sample.shape[0] % 2 == 0
        self.shared.clear()
        self.plans = {
            name: self._plan(downsample, randomize, sample.device) for name, downsample in sorted(self.layers.items())
        }

    @property
    def settings(self) -> PhaseSettings:
        c = self.config
        if self.agent_phase:
            return PhaseSettings(c.sx, c.sy, c.ratio, c.agent_ratio)
        return PhaseSettings(c.late_sx, c.late_sy, c.late_ratio, None)

    def _plan(self, downsample: int, randomize: bool, device: torch.device) -> LayerPlan | None:
        """A layer's plan at `downsample`; None hands its calls to the original processor."""
        if downsample > self.config.max_downsample:
            return None
        height, width = self.latent_hw
        h, w = -(-height // downsample), -(-width // downsample)
        num_tokens = h * w
        if num_tokens < self.config.min_tokens:
            return None
        s = self.settings
        dst, src = self.destinations(h, w, s.sx, s.sy, randomize, device)
        if dst.numel() == 0:
            return None
        r = merge_count(src.numel(), num_tokens, s.ratio)
        if s.agent_ratio is not None:
            pool = self.config.agent_selection == "pool"
            r_agent = 0 if pool else merge_count(src.numel(), num_tokens, s.agent_ratio)
            num_agents = dst.numel() if pool else num_tokens - r_agent
            if 2 * num_agents < num_tokens - r:
                return LayerPlan(AGENT, h, w, s.sx, s.sy, dst, src, r, r_agent, pool)
        if r == 0:
            return None
        return LayerPlan(TOME, h, w, s.sx, s.sy, dst, src, r, 0)

    def destinations(
        self, h: int, w: int, sx: int, sy: int, randomize: bool, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Destination and source positions on `device`; drawn anew when `randomize`."""
        if randomize:
            dst = destination_indices(h, w, sx, sy, self.generator)
            return dst.to(device), source_indices(h * w, dst).to(device)
        key = (h, w, sx, sy, device)
        if key not in self._fixed:
            dst = destination_indices(h, w, sx, sy)
            self._fixed[key] = (dst.to(device), source_indices(h * w, dst).to(device))
        return self._fixed[key]


class AgentSDProcessor:
    """Self-attention through merged tokens and agents, for one diffusers `Attention`.

    Runs agent attention (agent phase) or softmax attention over ToMe-merged tokens
    (ToMe-only phase) on the layer's self-attention, and hands every call it does not act
    on to the processor it replaced: cross-attention, masked attention, layers whose grid
    does not fit the latent, and merge settings that leave every token in place.

    Args:
        original: the processor this one replaced; it keeps serving the other calls.
        state: the UNet's shared run-time state.
        name: the layer's processor name in `unet.attn_processors`.
        downsample: how many times the layer's level is downsampled relative to the latent.
    """

    def __init__(self, original: Any, state: AgentSDState, name: str, downsample: int = 1):
        self.original = original
        self.state = state
        self.name = name
        state.register(name, downsample)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        plan = None
        if encoder_hidden_states is None and attention_mask is None and temb is None:
            plan = self.plan(attn, hidden_states)
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
        return self._forward(attn, hidden_states, plan)

    def plan(self, attn: Attention, hidden_states: torch.Tensor) -> LayerPlan | None:
        """This call's plan (made in `AgentSDState.begin_call`); None hands it to the original."""
        plan = self.state.plans.get(self.name)
        if plan is None or hidden_states.ndim != 3 or plan.h * plan.w != hidden_states.shape[1]:
            return None
        if attn.spatial_norm is not None or attn.group_norm is not None:
            return None
        return plan

    def precision(self, attn: Attention) -> torch.dtype | None:
        """The dtype both softmaxes run in; None keeps the model's dtype."""
        wanted = self.state.config.attn_precision
        if wanted is None and (attn.upcast_attention or attn.upcast_softmax):
            wanted = "fp32"
        return torch.float32 if wanted == "fp32" else None

    def backend(self, x: torch.Tensor) -> str:
        if self.state.config.attention_backend is not None:
            return self.state.config.attention_backend
        return "xformers" if isinstance(self.original, XFormersAttnProcessor) and x.is_cuda else "sdpa"

    def merges(self, hidden_states: torch.Tensor, plan: LayerPlan) -> tuple[TokenMerge | None, TokenMerge | None]:
        """The ToMe merge (None when `r == 0`) and the agent merge (None unless agents come from
        merging); with `share_matching`, those of the grid's first layer in this UNet call."""
        shared = self.state.shared if self.state.config.share_matching else None
        key = (plan.h, plan.w)
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

    def _forward(self, attn: Attention, hidden_states: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
        config = self.state.config
        batch = hidden_states.shape[0]
        merge, agent_merge = self.merges(hidden_states, plan)
        x = merge.merge(hidden_states) if merge is not None else hidden_states

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        # norm_q / norm_k (QK normalization): diffusers 0.27's Attention has neither attribute.
        norm_q, norm_k = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
        query, key, value = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
        if norm_q is not None:
            query = norm_q(query)
        if norm_k is not None:
            key = norm_k(key)
        out_dtype = query.dtype
        dtype = self.precision(attn) or out_dtype
        backend = self.backend(hidden_states)
        if plan.mode == AGENT:
            if plan.pool:
                agent_tokens = cell_means(hidden_states, plan.h, plan.w, plan.sx, plan.sy)
            else:
                agent_tokens = agent_merge.merge(hidden_states)
            agents = heads(attn.to_q(agent_tokens))
            if norm_q is not None:
                agents = norm_q(agents)
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
