"""The commands' start-up: Ctrl-C while importing or loading, and what is refused before any work."""

import os
import subprocess
import sys
import textwrap

import pytest

from agentsd.testing import tiny_pipeline

COMMANDS = {
    "generate": ["generate", "--prompt", "x", "--steps", "1"],
    "compare": ["compare", "--num-prompts", "1", "--steps", "1", "--no-memory"],
    "bench": ["bench", "--arch", "tiny", "--sizes", "64", "--methods", "baseline", "--repeats", "1"],
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "sd15"
    tiny_pipeline("sd15").save_pretrained(folder)
    return folder


def interrupted_run(tmp_path, argv, setup, entry):
    """`agentsd ARGV` in a new process where `setup` (Python source) has prepared a Ctrl-C: as
    `python -m agentsd` or as the console script (`from agentsd.cli.commands import main`)."""
    start = {
        "module": "import runpy\nrunpy.run_module('agentsd', run_name='__main__', alter_sys=True)",
        "script": "from agentsd.cli.commands import main\nsys.exit(main())",
    }[entry]
    source = f"import sys\nsys.argv = ['agentsd', *{[str(a) for a in argv]!r}]\n{textwrap.dedent(setup)}\n{start}\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=env, cwd=tmp_path)


# Ctrl-C as the first import of `module` starts (sys.meta_path is asked before anything is loaded).
INTERRUPT_IMPORT = """
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
"""
# Ctrl-C while the pipeline loads its weights.
INTERRUPT_LOADING = """
import diffusers
def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
diffusers.DiffusionPipeline.from_pretrained = interrupted
"""


@pytest.mark.parametrize("entry", ["module", "script"])
@pytest.mark.parametrize("module", ["torch", "diffusers"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_ctrl_c_while_importing_exits_130_with_one_line(model, tmp_path, command, module, entry):
    argv = [*COMMANDS[command], "--out", tmp_path / "out"] + ([] if command == "bench" else ["--model", model])
    result = interrupted_run(tmp_path, argv, INTERRUPT_IMPORT.format(module=module), entry)
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr.splitlines() == ["interrupted"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["generate", "compare"])
def test_ctrl_c_while_loading_the_model_exits_130_and_leaves_no_folder(model, tmp_path, command):
    argv = [*COMMANDS[command], "--model", model, "--out", tmp_path / "new" / "out"]
    result = interrupted_run(tmp_path, argv, INTERRUPT_LOADING, "script")
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == "interrupted" and "Traceback" not in result.stderr
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- refused before any work


def run_main(capsys, *args):
    """`agentsd ARGS` in this process: (exit code, the `agentsd: error:` lines)."""
    from agentsd.cli.commands import main

    code = main([str(a) for a in args])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("agentsd: error:")]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the model fails the test: what these check must be refused before."""
    from agentsd.cli import loading

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_pipeline", load)


def test_the_seed_range_is_torchs():
    import torch

    from agentsd.cli.loading import SEED_MAX, SEED_MIN

    for seed in (SEED_MIN, SEED_MAX):
        torch.Generator().manual_seed(seed)
    for seed in (SEED_MIN - 1, SEED_MAX + 1):
        with pytest.raises((RuntimeError, ValueError)):
            torch.Generator().manual_seed(seed)


BIG = 2**64 - 1  # the largest seed torch.Generator takes


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("generate", ["--steps", "1001"], "DDIMScheduler takes with this model: use --steps 1000 or fewer"),
        ("generate", ["--scheduler", "lcm", "--steps", "51"], "LCMScheduler takes with this model: use --steps 50 "),
        ("compare", ["--steps", "5000"], "--steps 5000 is more than DDIMScheduler takes"),
        ("generate", ["--seed", str(BIG + 1)], f"--seed {BIG + 1} gives image seeds up to {BIG + 1}"),
        ("generate", ["--seed", str(BIG), "--num-images", "3"], f"use --seed {BIG - 2} or less"),
        ("generate", ["--seed", str(-(2**63) - 1)], "below the smallest seed torch.Generator takes"),
        ("compare", ["--seed", str(BIG - 1), "--num-prompts", "3"], f"image seeds up to {BIG + 1}"),
    ],
)  # fmt: skip
def test_steps_and_seeds_are_refused_before_the_model_is_loaded(
    model, tmp_path, capsys, no_loading, command, args, message
):
    out = tmp_path / "new" / "out"
    base = {"generate": ["generate", "--prompt", "x"], "compare": ["compare", "--num-prompts", "1", "--no-memory"]}
    code, errors = run_main(capsys, *base[command], "--model", model, *args, "--out", out)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "new").exists()


def test_steps_are_refused_after_loading_when_the_scheduler_config_cannot_be_read_first(
    model, tmp_path, capsys, monkeypatch
):
    """A hub model that is not cached: its scheduler is known once loaded, still before any image
    and without leaving the output folder behind."""
    from agentsd.cli import generation, schedulers

    monkeypatch.setattr(schedulers, "model_scheduler", lambda model, name=None: None)
    monkeypatch.setattr(generation, "generate_runs", lambda *a, **k: pytest.fail("generation started"))
    out = tmp_path / "new" / "out"
    code, errors = run_main(capsys, "generate", "--prompt", "x", "--model", model, "--steps", "1001", "--out", out)
    assert code == 2 and "--steps 1001 is more than DDIMScheduler takes" in errors[0], errors
    assert not (tmp_path / "new").exists()


def test_the_library_refuses_steps_and_seeds_before_creating_anything(tmp_path):
    from agentsd.cli import compare, comparison
    from agentsd.cli.generation import GenerationError, GenerationSettings, ImageJob, generate

    pipe = tiny_pipeline("sd15")
    out = tmp_path / "out"
    with pytest.raises(GenerationError, match="steps 1001 is more than DDIMScheduler takes"):
        generate(pipe, [ImageJob(0, "x", 0)], out, GenerationSettings(model="tiny", steps=1001), None)
    with pytest.raises(GenerationError, match=f"image seeds up to {BIG + 1}"):
        generate(pipe, [ImageJob(0, "x", BIG), ImageJob(0, "x", BIG + 1)], out, GenerationSettings(model="t"), None)
    settings = GenerationSettings(model="tiny", steps=1001)
    scoring = comparison.ComparisonSettings(measure_memory=False)
    with pytest.raises(GenerationError, match="steps 1001"):
        compare.run_comparison(pipe, ["x"], [comparison.parse_method("paper")], out, settings, scoring, progress=False)
    assert not out.exists()


def test_bench_refuses_tomesd_without_the_package_before_building_a_unet(tmp_path, capsys, monkeypatch):
    from agentsd.bench import benchmark

    monkeypatch.setitem(sys.modules, "tomesd", None)  # import fails, find_spec says None
    monkeypatch.setattr(benchmark, "build_unet", lambda *a, **k: pytest.fail("a UNet was built"))
    out = tmp_path / "out"
    code, errors = run_main(capsys, *COMMANDS["bench"], "--methods", "baseline", "tomesd", "--out", out)
    assert code == 2 and len(errors) == 1 and "pip install tomesd" in errors[0], errors
    assert not out.exists()
