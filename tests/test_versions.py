"""What keeps agentsd working across the diffusers releases it supports, and the version records
(.ci/stacks.txt, README's table, pyproject's bounds, the changelog) in step. Cheap: no pipelines
but one tiny save and load."""

import importlib.util
import re
import sys
from pathlib import Path

import diffusers
import pytest
import torch

import agentsd
from agentsd.cli import compat
from agentsd.cli.generation import SCHEDULERS, GenerationError, load_pipeline, set_scheduler
from agentsd.testing import tiny_pipeline, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


stacks_table = load_script("stacks_table")


def test_readme_table_is_generated_from_the_stacks_file():
    readme = (ROOT / "README.md").read_text()
    section = readme.split(stacks_table.START)[1].split(stacks_table.END)[0]
    assert section.strip() == stacks_table.render(stacks_table.read_stacks()), (
        "README's tested-stacks table differs from .ci/stacks.txt: run python scripts/stacks_table.py"
    )


def test_stacks_file_has_the_main_job_and_older_pinned_stacks():
    stacks = stacks_table.read_stacks()
    jobs = [s.job for s in stacks]
    assert jobs[0] == "main" and len(jobs) >= 3
    assert all(s.versions["torch"] == "2.13.0" for s in stacks), "CI's CPU wheel is torch 2.13.0"
    newest = stacks_table.version_tuple(stacks[0].versions["diffusers"])
    assert all(stacks_table.version_tuple(s.versions["diffusers"]) < newest for s in stacks[1:])


def test_stacks_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "stacks.txt"
    bad.write_text("main 0.42.1 5.23.0 2.4.0 1.15.0 2.13.0\nold 0.19.3 4.31.0\n")
    with pytest.raises(ValueError, match=r"stacks.txt:2: expected a job name and 5 versions"):
        stacks_table.read_stacks(bad)
    bad.write_text("old 0.19.3 4.31.0 0.16.4 0.21.0 2.13.0\n")
    with pytest.raises(ValueError, match="needs one `main` line"):
        stacks_table.read_stacks(bad)


def dependency_floors() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    matches = (re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", r.replace(" ", "")) for r in project["dependencies"])
    return {m.group(1): m.group(2) for m in matches if m}


def test_pyproject_floors_are_the_oldest_tested_stack():
    oldest = stacks_table.oldest(stacks_table.read_stacks())
    floors = dependency_floors()
    for package in ("diffusers", "transformers", "accelerate"):
        assert stacks_table.version_tuple(floors[package]) == stacks_table.version_tuple(oldest.versions[package]), (
            f"pyproject says {package}>={floors[package]}, the oldest stack CI tests has {oldest.versions[package]}"
        )


def test_the_version_is_written_once_and_the_changelog_has_its_section():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "agentsd.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", agentsd.__version__)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(agentsd.__version__)}\b", changelog, re.MULTILINE), (
        f"CHANGELOG.md has no `## {agentsd.__version__}` section"
    )


def test_license_is_the_apache_2_text_pyproject_names():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert '\nlicense = "Apache-2.0"\n' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.parametrize(
    "version, keyword",
    [("0.19.3", "torch_dtype"), ("0.39.1", "torch_dtype"), ("0.40.0", "dtype"), ("1.0.0.dev0", "dtype")],
)
def test_from_pretrained_dtype_keyword_follows_the_diffusers_release(version, keyword, monkeypatch):
    monkeypatch.setattr(diffusers, "__version__", version)
    assert compat.dtype_kwargs(torch.float16) == {keyword: torch.float16}


def test_unreadable_diffusers_version_is_an_error_with_the_fix(monkeypatch):
    monkeypatch.setattr(diffusers, "__version__", "unknown")
    with pytest.raises(RuntimeError, match="cannot read the diffusers version 'unknown': reinstall diffusers"):
        compat.diffusers_version()


def test_load_pipeline_honours_the_dtype_on_this_diffusers(tmp_path, monkeypatch):
    # Older diffusers releases ignore an unknown keyword with a warning: the weights would stay fp32.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_pipeline("sd15").save_pretrained(tmp_path)
    pipe = load_pipeline(str(tmp_path), dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16


def test_a_scheduler_this_diffusers_lacks_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setitem(SCHEDULERS, "lcm", ("NoSuchScheduler", {}))
    with pytest.raises(GenerationError, match=r"scheduler 'lcm' needs diffusers' NoSuchScheduler.*upgrade diffusers"):
        set_scheduler(object(), "lcm")


def test_tiny_tokenizer_knows_every_byte():
    # A byte symbol missing from the vocabulary would turn into the unknown token (<|endoftext|>, id 1).
    tokenizer = tiny_tokenizer()
    text = "".join(chr(c) for c in range(33, 127)) + " café ñ ¬® \t 🐱 ü"
    ids = tokenizer(text).input_ids
    assert ids[0] == 0 and ids[-1] == 1
    assert 1 not in ids[1:-1] and len(ids) > 100


def test_every_package_folder_is_listed_for_the_wheel():
    """setuptools ships only the packages pyproject names: a new subpackage left out installs
    from a checkout (editable) but is missing from the wheel and from CI's pinned stacks."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "agentsd").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
