"""Videos for `generate` and `compare` (Wan): what a video model's run is refused before any work
(a frame count the model cannot make, the `video` extra missing), and the files each video gets.

Each video is written as `NAME.json` (the sidecar, first), `NAME.png` (a contact sheet of its
frames, with the sidecar's record embedded as images have it) and `NAME.mp4` (last: it marks the
video as done, as the PNG marks an image). The MP4 is H.264 through diffusers' `export_to_video`
(imageio with imageio-ffmpeg's ffmpeg, `pip install "agentsd[video]"`) at quality `MP4_QUALITY`;
`compare` scores the frames decoded from it.
"""

from __future__ import annotations

import inspect
import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .loading import GenerationError
from .output import atomic_write, read_sidecar, save_image

DEFAULT_FPS = 16  # Wan 2.1's and Wan 2.2 A14B's frame rate (Wan 2.2 TI2V 5B makes 24)
# Wan's VAEs encode the first frame alone, then every 4 frames into one latent frame: its models
# make 4 k + 1 frames (diffusers' pipelines round any other count down, with a warning).
TEMPORAL_FACTOR = 4
# imageio's quality (1-10; libx264's crf = 51 (1 - quality / 10)): 8 is crf 10, visually lossless.
# `compare` scores the decoded frames, so the codec's (small) loss is in the scores of both videos;
# x264 is deterministic, so identical videos still decode identically.
MP4_QUALITY = 8
# The contact sheet shows every frame of a video of up to this many; of a longer one, every k-th
# frame (the first and the last always), at most this many: 81 frames -> 21 (every 4th).
SHEET_FRAMES = 25
SHEET_SIDE = 512  # px: frames are halved on the sheet until their longer side is at most this
EXTRA = 'pip install "agentsd[video]"'


def is_video(pipeline: Any) -> bool:
    """Whether a pipeline (or its class) makes videos: its call takes `num_frames` (Wan)."""
    return pipeline is not None and "num_frames" in inspect.signature(pipeline.__call__).parameters


def check_video_extra() -> None:
    """Refuse, before any work, to make videos without imageio and imageio-ffmpeg (the MP4 writer).

    Raises:
        GenerationError: naming what is missing and `pip install "agentsd[video]"`.
    """
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        raise GenerationError(
            f"this model makes videos, and writing them as MP4 needs imageio and imageio-ffmpeg ({err}): {EXTRA}."
        ) from None


def check_frames(frames: int | None, flag: str = "--frames") -> None:
    """Refuse a frame count Wan's models cannot make (they make 4 k + 1), naming the nearest counts.

    Raises:
        GenerationError: naming `flag` and the counts below and above that fit.
    """
    if frames is None or (frames > 0 and frames % TEMPORAL_FACTOR == 1):
        return
    if frames < 1:
        raise GenerationError(f"{flag} {frames} must be positive: use 1, 5, 9, ... (4k+1), e.g. 81.")
    below = (frames - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1
    raise GenerationError(
        f"{flag} {frames}: Wan makes 4k+1 frames (its VAE encodes the first frame, then 4 frames per latent "
        f"frame): use {below} or {below + TEMPORAL_FACTOR}."
    )


def check_fps(fps: int | None, flag: str = "--fps") -> None:
    if fps is not None and fps < 1:
        raise GenerationError(f"{flag} {fps} must be positive: use e.g. {DEFAULT_FPS}.")


def call_defaults(pipe: Any) -> dict[str, Any]:
    """What a call of a video pipeline runs with unless told: its own `num_frames`, `width` and
    `height` defaults (Wan: 81 frames of 832 x 480)."""
    takes = inspect.signature(pipe.__call__).parameters
    return {name: takes[name].default for name in ("num_frames", "width", "height")}


def video_record(pipe: Any, frames: int | None, fps: int | None) -> dict[str, Any]:
    """The fields a video's sidecar adds to the run's record: the frame count it was made with (the
    pipeline's default unless given) and the MP4's frame rate (`DEFAULT_FPS` unless given)."""
    return dict(frames=frames or call_defaults(pipe)["num_frames"], fps=fps or DEFAULT_FPS)


def sheet_frames(count: int) -> list[int]:
    """The frames (indices) a contact sheet shows: all of up to `SHEET_FRAMES`, else every k-th,
    k the smallest step that keeps them to `SHEET_FRAMES`, and the last frame always."""
    step = max(1, math.ceil((count - 1) / (SHEET_FRAMES - 1)))
    shown = list(range(0, count, step))
    return shown if shown[-1] == count - 1 else [*shown, count - 1]


def contact_sheet(frames: Sequence[Image.Image]) -> Image.Image:
    """The `sheet_frames` of a video in a near-square grid (ceil(sqrt(n)) columns), row by row,
    each frame halved until its longer side is at most `SHEET_SIDE`."""
    shown = [frames[i] for i in sheet_frames(len(frames))]
    width, height = shown[0].size
    while max(width, height) > SHEET_SIDE:
        width, height = width // 2, height // 2
    columns = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, frame in enumerate(shown):
        cell = frame.convert("RGB")
        cell = cell if cell.size == (width, height) else cell.resize((width, height), Image.LANCZOS)
        sheet.paste(cell, ((i % columns) * width, (i // columns) * height))
    return sheet


def write_mp4(frames: Sequence[Image.Image], path: Path, fps: int) -> None:
    """Write `frames` as an H.264 MP4 through a temporary file in the same folder, renamed into
    place when complete (ffmpeg creates it with the permissions `open()` gives)."""
    from diffusers.utils import export_to_video

    tmp = path.parent / f".{path.stem}.{secrets.token_hex(4)}.tmp.mp4"  # ffmpeg picks the format by suffix
    try:
        export_to_video(frames, str(tmp), fps=fps, quality=MP4_QUALITY)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_video(frames: Sequence[Image.Image], path: Path, metadata: dict[str, Any]) -> None:
    """Write a video's sidecar, contact sheet (`path` as .png, the record embedded) and MP4
    (`path`, last), each atomically; the sidecar records the frames the sheet shows."""
    metadata = dict(metadata, contact_sheet_frames=sheet_frames(len(frames)))
    save_image(contact_sheet(frames), path.with_suffix(".png"), metadata)
    write_mp4(frames, path, metadata["fps"])


def read_frames(path: Path) -> list[np.ndarray]:
    """The frames of a video file as (H, W, 3) uint8 arrays, as ffmpeg decodes them."""
    import imageio

    with imageio.v2.get_reader(str(path), format="FFMPEG") as reader:
        return [np.asarray(frame)[..., :3] for frame in reader]


def write_video_pair(left: Path, right: Path, pair: Path) -> None:
    """The side-by-side pair of two videos (`left` on the left), read from their files: their
    frames side by side as an MP4 (`pair`, at `right`'s recorded frame rate, written last) and
    the contact sheet of those frame pairs (`pair` as .png)."""
    frames = [np.concatenate(both, axis=1) for both in zip(read_frames(left), read_frames(right), strict=True)]
    frames = [Image.fromarray(frame) for frame in frames]
    sheet = contact_sheet(frames)
    atomic_write(pair.with_suffix(".png"), lambda f: sheet.save(f, format="PNG"))
    write_mp4(frames, pair, (read_sidecar(right) or {}).get("fps") or DEFAULT_FPS)
