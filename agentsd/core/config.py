"""The configuration of agent attention: one validated dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

ATTN_PRECISIONS = (None, "fp32")
ATTENTION_BACKENDS = (None, "sdpa", "xformers", "einsum")
AGENT_SELECTIONS = ("match", "pool")
# Fields whose None means "choose automatically"; these words (any case) stand for None, as
# `--attn-precision auto` does on the command line and `null` in YAML.
AUTOMATIC_FIELDS = ("attn_precision", "attention_backend")
AUTOMATIC_WORDS = ("none", "auto", "null")


@dataclass(frozen=True)
class AgentSDConfig:
    """How and where agent attention replaces the UNet's self-attention.

    The defaults are the published Stable Diffusion 1.5 recipe: agent attention through
    256 merged agents for the first 40 % of the trajectory, then ToMe at 2x2 strides.

    Args:
        ratio: fraction of the tokens merged away (ToMe) before attention in the agent
            phase, in [0, 1).
        agent_ratio: fraction of the tokens merged away to form the agents, in [0, 1).
            Agents are used only when twice their count is below the merged token count;
            otherwise the layer runs exact attention over the merged tokens.
        sx: destination-cell width in tokens (one destination per sx x sy cell), >= 1.
        sy: destination-cell height in tokens, >= 1.
        st: destination-cell depth in frames, >= 1, for video models (Wan): one destination per
            st x sy x sx box of the frames x rows x columns token grid. A video of fewer token
            frames than `st` uses boxes as deep as the video. Image models have one frame and
            ignore it.
        max_downsample: patch only levels downsampled at most this many times relative to
            the latent: 1, 2, 4 or 8. SD 1.x/2.x: 1; SDXL has no attention at 1 and needs 2.
        k_scale2: exponent of the attention scale in the broadcast step (temperature
            `d ** (-0.5 * k_scale2)`), > 0.
        k_shortcut: weight of the value shortcut added to the agent output, >= 0.
        use_rand: draw the destination inside each cell at random: one draw per model call from `seed`
            and the timestep, the same for every image of the batch.
        seed: seed of the library's own generator for the destination draws, >= 0.
        attn_precision: `"fp32"` computes both softmaxes in float32; `None` chooses fp32
            for layers whose diffusers `Attention` upcasts (SD 2.x) and the model dtype
            elsewhere. The strings "none", "auto" and "null" (any case) mean None here and in
            `attention_backend`.
        agent_steps: fraction of the denoising trajectory, from the noisiest end, that runs
            the agent phase, in [0, 1]: 1.0 always, 0.0 never. Measured as
            `1 - t / num_train_timesteps` for schedulers that pass training timesteps, so it
            does not depend on the sampler; for those that pass a noise level (EDM), as its
            place on the scheduler's own schedule (`agentsd.core.progress`).
        late_ratio: merge ratio of the ToMe-only phase after the agent phase, in [0, 1);
            0 runs exact attention (the layer's original processor) there.
        late_sx: destination-cell width of the late phase, >= 1.
        late_sy: destination-cell height of the late phase, >= 1.
        late_st: destination-cell depth of the late phase in frames (video models), >= 1.
        attention_backend: the kernel of both attention products: `"sdpa"` (torch's fused
            scaled_dot_product_attention), `"xformers"` (CUDA), `"einsum"` (unfused, with
            materialised weights: the published code's way, for comparison), or None: xformers
            where the replaced processor was xformers' and the tensors are on CUDA, else SDPA.
        min_tokens: layers whose grid has fewer tokens than this run exact attention (their
            original processor), >= 0: there the fixed cost of matching and merging outweighs
            what it saves. 256 (a 16x16 grid) is the smallest grid measured on the CPU to
            win clearly; see the README's "Never slower".
        share_matching: opt-in, changes outputs. Compute the bipartite matching once per
            token grid and UNet call, in the first patched layer of that grid, and reuse its
            merges in the other layers of the same grid (SD 1.5: 5 layers share one).
        agent_selection: `"match"` (the published method: agents are the tokens merged at
            `agent_ratio`) or `"pool"` (opt-in, changes outputs: agents are the means of the
            whole `sx x sy` cells, no matching; with `ratio=0` the agent phase needs no
            matching at all).
        block_range: which transformer blocks of a diffusion transformer (SD 3 / 3.5, PixArt,
            Flux, Wan) are patched: `(start, stop)` block indices, stop excluded, as in
            `range(start, stop)`; Flux counts its double-stream blocks first, then its
            single-stream ones. None: every block. UNets choose their layers by
            `max_downsample` and ignore it.

    numpy scalars (`np.float32(0.5)`, `np.int64(4)`, `np.bool_(True)`) are stored as the
    Python float, int or bool they hold, and validated as such.

    Example:
        >>> from agentsd import AgentSDConfig
        >>> AgentSDConfig(ratio=0.5).agent_ratio
        0.95
        >>> AgentSDConfig(sx=0)
        Traceback (most recent call last):
        ...
        ValueError: AgentSDConfig.sx=0 is out of range: use an integer >= 1.
    """

    ratio: float = 0.4
    agent_ratio: float = 0.95
    sx: int = 4
    sy: int = 4
    max_downsample: int = 1
    k_scale2: float = 0.3
    k_shortcut: float = 0.075
    use_rand: bool = True
    seed: int = 0
    attn_precision: str | None = None
    agent_steps: float = 0.4
    late_ratio: float = 0.4
    late_sx: int = 2
    late_sy: int = 2
    attention_backend: str | None = None
    min_tokens: int = 256
    share_matching: bool = False
    agent_selection: str = "match"
    block_range: tuple[int, int] | None = None
    st: int = 1
    late_st: int = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (np.bool_, np.integer, np.floating)):
                object.__setattr__(self, f.name, value.item())  # frozen: set through object
            elif f.name in AUTOMATIC_FIELDS and isinstance(value, str) and value.strip().lower() in AUTOMATIC_WORDS:
                object.__setattr__(self, f.name, None)
        for name in ("ratio", "agent_ratio", "late_ratio"):
            _check_real(name, getattr(self, name), "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
        _check_real("agent_steps", self.agent_steps, "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check_real("k_scale2", self.k_scale2, "a number > 0", lambda v: v > 0.0)
        _check_real("k_shortcut", self.k_shortcut, "a number >= 0", lambda v: v >= 0.0)
        for name in ("sx", "sy", "st", "late_sx", "late_sy", "late_st"):
            _check_int(name, getattr(self, name), "an integer >= 1", lambda v: v >= 1)
        _check_int("seed", self.seed, "an integer >= 0", lambda v: v >= 0)
        _check_int("min_tokens", self.min_tokens, "an integer >= 0", lambda v: v >= 0)
        _check_int("max_downsample", self.max_downsample, "one of 1, 2, 4, 8", lambda v: v in (1, 2, 4, 8))
        for name in ("use_rand", "share_matching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AgentSDConfig.{name}={getattr(self, name)!r} is not a bool: use True or False.")
        if self.attn_precision not in ATTN_PRECISIONS:
            raise ValueError(
                f"AgentSDConfig.attn_precision={self.attn_precision!r} is not supported: "
                "use None (automatic; also 'auto') or 'fp32'."
            )

        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"AgentSDConfig.attention_backend={self.attention_backend!r} is not supported: "
                "use None (automatic; also 'auto'), 'sdpa', 'xformers' or 'einsum'."
            )
        self._check_block_range()
        if self.agent_selection not in AGENT_SELECTIONS:
            raise ValueError(
                f"AgentSDConfig.agent_selection={self.agent_selection!r} is not supported: use 'match' or 'pool'."
            )

    def _check_block_range(self) -> None:
        value = self.block_range
        if value is None:
            return
        if isinstance(value, (list, tuple)) and len(value) == 2:
            pair = tuple(v.item() if isinstance(v, np.integer) else v for v in value)
            if all(isinstance(v, int) and not isinstance(v, bool) for v in pair) and 0 <= pair[0] < pair[1]:
                object.__setattr__(self, "block_range", pair)
                return
        raise ValueError(
            f"AgentSDConfig.block_range={value!r} is not a block range: use None (every block) or two integers "
            "(start, stop) with 0 <= start < stop, e.g. (0, 12) for the first 12 blocks."
        )

    def replace(self, **overrides: Any) -> AgentSDConfig:
        """A copy with the given fields changed (validated); unknown names raise `TypeError`."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"AgentSDConfig has no field {', '.join(unknown)}: the fields are {known}.")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (`block_range` as a list, as JSON and YAML hold it)."""
        fields = dataclasses.asdict(self)
        if fields["block_range"] is not None:
            fields["block_range"] = list(fields["block_range"])
        return fields


def _check_real(name: str, value: Any, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"AgentSDConfig.{name}={value!r} is not a finite number: use {allowed}.")
    if not ok(value):
        raise ValueError(f"AgentSDConfig.{name}={value!r} is out of range: use {allowed}.")


def _check_int(name: str, value: Any, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"AgentSDConfig.{name}={value!r} is not an integer: use {allowed}.")
    if not ok(value):
        raise ValueError(f"AgentSDConfig.{name}={value!r} is out of range: use {allowed}.")
