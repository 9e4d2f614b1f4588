"""Files `generate` and `compare` write: PNGs with their metadata and JSON sidecars, each written
atomically with the permissions `open()` would give, and side-by-side pairs."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo


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
