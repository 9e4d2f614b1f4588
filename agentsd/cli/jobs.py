"""What a run of `generate` or `compare` is made of: the images to make (`ImageJob`, `plan_jobs`),
the settings they share (`GenerationSettings`), each method's run with its timings (`MethodRun`),
and the speed-up between two runs. `generation` makes them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..api.caches import CacheSpec, enabled_cache
from ..api.patch import patched
from ..api.status import Activity
from ..core.config import AgentSDConfig
from .loading import GenerationError, check_max_sequence_length
from .video import check_fps, check_frames


@dataclass(frozen=True)
class ImageJob:
    """One image to make: a prompt and a seed; `name` is its file stem."""

    prompt_index: int
    prompt: str
    seed: int

    @property
    def name(self) -> str:
        return f"p{self.prompt_index:04d}_s{self.seed}"


def plan_jobs(prompts: Sequence[str], num_images: int, seed: int) -> list[ImageJob]:
    """`num_images` per prompt with seeds `seed, seed + 1, ...` (the same seeds for every prompt)."""
    return [ImageJob(i, p, seed + k) for i, p in enumerate(prompts) for k in range(num_images)]


@dataclass
class GenerationSettings:
    """What every image of a run shares. `max_sequence_length`: the T5 prompt length of SD 3 /
    3.5, PixArt and Flux pipelines (None: the pipeline's default). `true_cfg_scale`: Flux's true
    classifier-free guidance, which its negative prompt needs (None: the pipeline's default, off).
    `frames`, `fps`: a video model's frame count (4 k + 1; None: the pipeline's default) and the
    MP4's frame rate (None: `video.DEFAULT_FPS`); refused for image models. `context_parallel`: the
    run's `parallel.Layout` under `--context-parallel` (None: each process makes whole images)."""

    model: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int = 50
    guidance: float | None = None  # None: the pipeline's own default (`loading.guidance_scale`)
    batch_size: int = 1
    overwrite: bool = False
    max_sequence_length: int | None = None
    true_cfg_scale: float | None = None
    frames: int | None = None
    fps: int | None = None
    context_parallel: Any = None

    @property
    def writes(self) -> bool:
        """Whether this process writes the files: every process, but under context parallelism rank 0 alone."""
        return self.context_parallel is None or self.context_parallel.writes

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                raise GenerationError(f"{name} {value} is not a positive multiple of 8: use e.g. 512 or 768.")
        if self.steps <= 0:
            raise GenerationError(f"steps {self.steps} must be positive: use e.g. 50.")
        if self.batch_size <= 0:
            raise GenerationError(f"batch size {self.batch_size} must be positive.")
        check_max_sequence_length(self.max_sequence_length, None, "max_sequence_length")
        check_frames(self.frames, "frames")
        check_fps(self.fps, "fps")


@dataclass
class MethodRun:
    """One method of a run: its label, how the pipeline runs (an agentsd config, or any
    `context(pipe)` such as another accelerator's patch), its folder and its timings; `video`:
    it makes videos (files `NAME.mp4`, see `video`), not images (`NAME.png`). `cache`: a step cache
    the pipeline runs under, with the patch or `context` (`api.caches`); `cache_calls` counts the
    model calls it computed and skipped over the run's timed pipeline calls, `latest_cache_calls`
    those of the latest."""

    label: str
    config: AgentSDConfig | None
    folder: Path
    context: Callable[[Any], AbstractContextManager] | None = None
    seconds: dict[ImageJob, float] = field(default_factory=dict)  # of each image this run timed
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    activity: Activity = field(default_factory=Activity)
    phases: list[str] = field(default_factory=list)  # of each scheduler step of the latest pipeline call
    parallel: str | None = None  # agentsd's context-parallel layout in the latest pipeline call (`status`)
    video: bool = False
    cache: CacheSpec | None = None
    cache_calls: Counter = field(default_factory=Counter)
    latest_cache_calls: dict[str, int] | None = None

    @property
    def noun(self) -> str:
        return "video" if self.video else "image"

    def path(self, job: ImageJob) -> Path:
        """The file that holds `job`'s output once it is done (written last)."""
        return self.folder / f"{job.name}{'.mp4' if self.video else '.png'}"

    @property
    def seconds_per_image(self) -> float | None:
        return sum(self.seconds.values()) / len(self.seconds) if self.seconds else None

    @contextmanager
    def enter(self, pipe: Any, steps: int) -> Iterator[None]:
        """The context a pipeline call of `steps` steps runs in: under `cache` (None: none), `context`,
        else patched by `config` (None: as is)."""
        with enabled_cache(pipe, self.cache, steps) if self.cache is not None else nullcontext():
            if self.context is not None:
                with self.context(pipe):
                    yield
            else:
                with nullcontext() if self.config is None else patched(pipe, self.config):
                    yield

    @property
    def skip_fraction(self) -> float | None:
        """The fraction of the model calls (of the timed pipeline calls) the cache skipped; None without one."""
        calls = sum(self.cache_calls.values())
        return self.cache_calls["skipped"] / calls if self.cache is not None and calls else None


def speedup(baseline: MethodRun, other: MethodRun) -> tuple[float, int] | None:
    """How many times faster `other` made the images both runs timed (an image only one of them
    made, as when a run resumes, has nothing to be compared with), and how many those were;
    None when there were none."""
    both = baseline.seconds.keys() & other.seconds.keys()
    if not both:
        return None
    return sum(baseline.seconds[j] for j in both) / sum(other.seconds[j] for j in both), len(both)
