"""Files `generate` and `compare` write: PNGs with their metadata and JSON sidecars, each written
atomically with the permissions `open()` would give, and side-by-side pairs; reading a sidecar
back, telling whether it was made with given settings, and saying so (counts in words: `plural`)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..api.words import plural


def save_image(image: Image.Image, path: Path, metadata: dict[str, Any]) -> None:
    """Write a PNG with `metadata` as text chunks and a JSON sidecar, each atomically."""
    info = PngInfo()
    info.add_text("prompt", str(metadata.get("prompt", "")))
    info.add_text("agentsd", json.dumps(metadata))
    # The sidecar first: a PNG on disk always has its sidecar, and marks the image as done.
    atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(metadata, indent=2).encode()))
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write `path` through a temporary file in the same folder, renamed into place when complete.

    The temporary file is created with mode 0o666 filtered by the umask, as `open()` does (not
    `mkstemp`'s owner-only 0o600), so the image gets the permissions the user expects.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    grid = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
    grid.paste(left, (0, 0))
    grid.paste(right, (left.width, 0))
    return grid


# The sidecar fields that say how an image was made: a rerun reuses an image only when they match.
# The batch size and the device change an image too: kernels round differently with the batch's
# size and on another device (in the last bits, which the sampling steps then carry on).
SETTING_KEYS = (
    "model", "scheduler", "scheduler_config", "steps", "guidance", "true_cfg_scale", "width", "height",
    "negative_prompt", "batch_size", "device", "dtype", "method", "agentsd_config", "prompt", "seed",
    "max_sequence_length", "frames", "fps", "context_parallel", "cache",
)  # fmt: skip
# Keys added to the sidecar later whose absence meant no value (None): an image's sidecar has no
# `frames` and `fps` (a video's has); one made before `--context-parallel` was made in one process,
# one made before `--cache` without a step cache.
# Not `batch_size` and `device`: an older sidecar does not say what they were, so its image cannot
# be reused.
NEWER_KEYS = ("max_sequence_length", "true_cfg_scale", "frames", "fps", "context_parallel", "cache")


def read_sidecar(image: Path) -> dict[str, Any] | None:
    """The JSON sidecar of `image`, or None when it is missing or unreadable."""
    try:
        data = json.loads(image.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def setting_differences(recorded: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> list[str]:
    """How the `SETTING_KEYS` of a sidecar (`recorded`) differ from `wanted`, one item each:
    "steps 2 (now 3)", "agentsd_config.ratio 0.4 (now 0.5)"; empty when they do not. Mappings are
    compared key by key, on the keys both have (a newer diffusers adds scheduler config keys)."""
    if recorded is None:
        return ["no readable sidecar"]
    wanted = json.loads(json.dumps({k: wanted.get(k) for k in SETTING_KEYS}))  # as it reads back from a sidecar
    parts = []
    for key in SETTING_KEYS:
        old, new = recorded.get(key, None if key in NEWER_KEYS else "missing"), wanted[key]
        if isinstance(old, dict) and isinstance(new, dict):
            parts += [f"{key}.{k} {old[k]!r} (now {new[k]!r})" for k in old if k in new and old[k] != new[k]]
        elif old != new:
            parts.append(f"{key} {old!r} (now {new!r})")
    return parts


def stale_message(stale: Mapping[Path, list[str]], folder: Path) -> str:
    """The error for existing images in `folder` made with other settings (`stale`: each image
    with its `setting_differences`), naming the settings that differ and the three ways on."""
    differences = list(dict.fromkeys(d for found in stale.values() for d in found))
    shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
    example = next(iter(stale)).with_suffix(".json")
    one = len(stale) == 1
    return (
        f"{plural(len(stale), 'image')} in {folder} {'was' if one else 'were'} made with other settings than this "
        f"run's ({shown}; e.g. {example}): rerun with those settings to resume, pass --overwrite to make "
        f"{'it' if one else 'them'} again with these settings, or choose another --out."
    )
