"""Named presets: YAML files of `AgentSDConfig` fields, shipped in the `configs/` folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..core.config import AgentSDConfig

PRESET_SUFFIX = ".yaml"


def _preset_dir() -> Path:
    """`configs/` of a source checkout, or its copy inside an installed wheel."""
    here = Path(__file__).resolve().parents[1]  # the package: agentsd/api/presets.py
    for folder in (here / "configs", here.parent / "configs"):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"agentsd's preset folder is missing next to {here}: reinstall agentsd.")


def preset_names() -> list[str]:
    """The shipped presets, by name."""
    return sorted(p.name[: -len(PRESET_SUFFIX)] for p in _preset_dir().iterdir() if p.name.endswith(PRESET_SUFFIX))


def is_preset_file(name_or_path: str | Path) -> bool:
    """Whether `name_or_path` names a YAML file rather than a shipped preset: it has a `.yaml` /
    `.yml` suffix or a path separator, or is an existing file. A folder of the same name (e.g.
    an earlier `--out sdxl`) does not hide the preset."""
    text = str(name_or_path)
    separators = {"/", os.sep, os.altsep} - {None}
    return Path(text).suffix in (".yaml", ".yml") or any(s in text for s in separators) or Path(text).is_file()


def _read(name_or_path: str | Path) -> tuple[str, dict[str, Any]]:
    path = Path(name_or_path)
    if is_preset_file(name_or_path):
        if not path.is_file():
            problem = "is a folder" if path.is_dir() else "does not exist"
            raise ValueError(
                f"preset file {str(name_or_path)!r} {problem}: pass an existing YAML file or a preset name."
            )
        source, text = str(path), path.read_text()
    else:
        resource = _preset_dir() / f"{name_or_path}{PRESET_SUFFIX}"
        if not resource.is_file():
            names = ", ".join(preset_names())
            raise ValueError(f"unknown preset {str(name_or_path)!r}: use one of {names} or a path to a YAML file.")
        source, text = f"preset {name_or_path}", resource.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source} is not valid YAML: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ValueError(f"{source} must be a YAML mapping with a `config:` mapping of AgentSDConfig fields.")
    return source, data


def load_preset(name_or_path: str | Path) -> AgentSDConfig:
    """The `AgentSDConfig` of a preset name (`paper`, `sd21`, `sdxl`, `highres`) or a YAML file.

    A name is a shipped preset unless it is a file (see `is_preset_file`): a folder named
    `paper` in the working directory does not change what `paper` means. The file holds a
    `config:` mapping of `AgentSDConfig` fields and optionally a one-line `description:`.
    Fields not given keep their defaults.

    Raises:
        ValueError: unknown preset, missing file, invalid YAML, unknown or invalid field.
    """
    source, data = _read(name_or_path)
    try:
        return AgentSDConfig().replace(**data["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


def describe_presets() -> dict[str, str]:
    """Preset name -> its one-line description."""
    return {name: str(_read(name)[1].get("description", "")) for name in preset_names()}
