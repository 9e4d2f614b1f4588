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
    `python -m agentsd` or as the console script (`from agentsd.cli import main`)."""
    start = {
        "module": "import runpy\nrunpy.run_module('agentsd', run_name='__main__', alter_sys=True)",
        "script": "from agentsd.cli import main\nsys.exit(main())",
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
