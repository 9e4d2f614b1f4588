"""The output folder of a suite run, kept within what a GPU machine lets come back.

A run stages every part's files outside OUT and, after every scenario, packs them into
`OUT/results.tar.gz`, written under a temporary name and renamed over the old one, so OUT
holds a valid archive at every moment, even after a hard kill. OUT itself holds only plain
files: the archive, `summary.md`, the run's log and the wrapper's install log
(`OUT_NAMES`), never a folder. `out_problems` checks the limits (`MAX_FILES` files, names
of letters, digits, `.`, `_` and `-`); `unpack` opens an archive again for the report.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

MAX_FILES = 8
NAME = re.compile(r"[A-Za-z0-9._-]+")
ARCHIVE, SUMMARY, LOG, INSTALL_LOG = "results.tar.gz", "summary.md", "suite.log", "install.log"
PARTIAL = ".partial"  # suffix of a file being written; renamed when complete
OUT_NAMES = (ARCHIVE, SUMMARY, LOG, INSTALL_LOG)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `path` whole or not at all: a temporary file beside it, then a rename."""
    partial = path.with_name(path.name + PARTIAL)
    partial.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(partial, path)


def prepare_out(out: Path) -> None:
    """Create OUT, or check that it holds nothing but an earlier run's own files."""
    out.mkdir(parents=True, exist_ok=True)
    own = set(OUT_NAMES) | {name + PARTIAL for name in OUT_NAMES}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own or not p.is_file())
    if foreign:
        raise ValueError(f"{out} holds other files ({', '.join(foreign[:5])}): give --out an empty or new folder.")


def pack(stage: Path, out: Path) -> Path:
    """Archive every file under `stage` (paths relative to it) into OUT/results.tar.gz, atomically."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(p for p in stage.rglob("*") if p.is_file() and not p.is_symlink()):
            tar.add(path, arcname=path.relative_to(stage).as_posix())
    archive = out / ARCHIVE
    write_atomic(archive, buffer.getvalue())
    return archive


def out_problems(out: Path) -> list[str]:
    """What in OUT breaks the limits of what comes back from a GPU machine (empty: nothing)."""
    entries = list(out.iterdir())
    problems = [f"{p.name} is a folder" for p in entries if p.is_dir()]
    problems += [f"{p.name}: not a plain file" for p in entries if p.is_symlink() or not (p.is_file() or p.is_dir())]
    problems += [f"{p.name}: a name of other characters than letters, digits, '.', '_', '-'" for p in entries
                 if not NAME.fullmatch(p.name)]  # fmt: skip
    files = [p for p in entries if p.is_file()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files, more than {MAX_FILES}")
    return problems


def find_archive(path: Path) -> Path | None:
    """The archive `path` is, or the one in the folder `path`; None for a folder of parts."""
    if path.is_file():
        return path
    inside = path / ARCHIVE
    return inside if inside.is_file() else None


def read_member(archive: Path, name: str) -> bytes | None:
    """One file of the archive, or None when it has none of that name."""
    with tarfile.open(archive, "r:gz") as tar:
        try:
            member = tar.getmember(name)
        except KeyError:
            return None
        found = tar.extractfile(member)
        return found.read() if found else None


def unpack(archive: Path, dest: Path) -> list[Path]:
    """Extract the archive's plain files into `dest`, refusing any path that would leave it."""
    written = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isdir():
                continue
            if not member.isfile() or member.name.startswith("/") or ".." in parts:
                raise ValueError(f"{archive} holds {member.name!r}, which is no plain file inside it: not unpacked.")
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            target.write_bytes(source.read() if source else b"")
            written.append(target)
    return written
