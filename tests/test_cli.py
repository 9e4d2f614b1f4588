"""`agentsd` as a user runs it: a subprocess against tiny models saved to a folder."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from agentsd.testing import tiny_pipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for kind in ("sd15", "sdxl"):
        tiny_pipeline(kind).save_pretrained(root / kind)
    return root


def agentsd_cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "agentsd", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd
    )


def test_generate_writes_images_with_metadata_and_sidecars(models, tmp_path):
    out = tmp_path / "out"
    result = agentsd_cli(
        "generate", "--model", models / "sd15", "--prompt", "a red cube", "--prompt", "a blue ball",
        "--num-images", "2", "--batch-size", "3", "--steps", "3", "--width", "72", "--height", "56",
        "--scheduler", "euler", "--ratio", "0.5", "--agent-seed", "7", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["p0000_s0.png", "p0000_s1.png", "p0001_s0.png", "p0001_s1.png"]
    image = Image.open(out / "p0001_s1.png")
    assert image.size == (72, 56)
    meta = json.loads(image.text["agentsd"])
    assert image.text["prompt"] == "a blue ball"
    assert meta["prompt"] == "a blue ball" and meta["seed"] == 1 and meta["steps"] == 3
    assert meta["scheduler"] == "euler" and meta["model"] == str(models / "sd15")
    assert meta["agentsd_config"]["ratio"] == 0.5 and meta["method"] == "agentsd"
    assert meta["agentsd_config"]["seed"] == 7  # --agent-seed: the config's seed, not the images'
    assert meta["seconds"] > 0 and meta["agentsd_version"]
    assert json.loads((out / "p0001_s1.json").read_text()) == meta
    assert "agentsd: 4 written" in result.stdout


def test_generate_never_overwrites_unless_asked(models, tmp_path):
    args = ["generate", "--model", models / "sd15", "--prompt", "x", "--steps", "2", "--out", tmp_path]
    assert agentsd_cli(*args).returncode == 0
    png = tmp_path / "p0000_s0.png"
    png.write_bytes(b"mine")
    result = agentsd_cli(*args)
    assert result.returncode == 0 and "1 skipped" in result.stdout
    assert png.read_bytes() == b"mine"
    assert agentsd_cli(*args, "--overwrite").returncode == 0
    assert Image.open(png).size == (64, 64)


def test_compare_saves_both_a_side_by_side_and_the_speedup(models, tmp_path):
    result = agentsd_cli(
        "generate", "--model", models / "sdxl", "--preset", "sdxl", "--prompt", "x", "--steps", "2",
        "--compare", "--out", tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p0000_s0.png").exists()
    baseline = json.loads((tmp_path / "baseline" / "p0000_s0.json").read_text())
    assert baseline["method"] == "baseline" and baseline["agentsd_config"] is None
    assert Image.open(tmp_path / "compare" / "p0000_s0.png").size == (128, 64)
    assert "speedup:" in result.stdout and "s/image" in result.stdout


def test_no_agent_and_prompts_file(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffone\r\n\r\ntwo café\n".encode())  # a BOM, as Windows editors write
    result = agentsd_cli(
        "generate", "--model", models / "sd15", "--prompts-file", prompts, "--no-agent", "--steps", "2",
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metas = [json.loads(p.read_text()) for p in sorted((tmp_path / "o").glob("*.json"))]
    assert [m["prompt"] for m in metas] == ["one", "two café"]
    assert all(m["method"] == "baseline" for m in metas)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{models}/missing"], "does not exist"),
        (["--model", "no-such-org/no-such-model"], "cannot load model 'no-such-org/no-such-model'"),
        (["--width", "100"], "width 100 is not a positive multiple of 8"),
        (["--steps", "0"], "steps 0 must be positive"),
        (["--scheduler", "heun9"], "unknown scheduler 'heun9'"),
        (["--preset", "fastest"], "unknown preset 'fastest'"),
        (["--ratio", "1.5"], "AgentSDConfig.ratio=1.5 is out of range"),
        (["--out", "{tmp}/file.txt/sub"], "cannot write to output folder"),
        (["--model", "{models}/sdxl", "--preset", "paper"], "--preset sdxl or --max-downsample 2"),
        (["--num-images", "0"], "--num-images 0 must be positive"),
        (["--sx", "two"], "invalid int value"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(models, tmp_path, capsys, args, message):
    (tmp_path / "file.txt").write_text("")
    base = {"--model": str(models / "sd15"), "--prompt": "x", "--steps": "2", "--out": str(tmp_path / "o")}
    given = [a.format(models=models, tmp=tmp_path) for a in args]
    for flag in given[::2]:
        base.pop(flag, None)
    argv = [x for pair in base.items() for x in pair] + given
    if "no-such-org/no-such-model" in given:  # the hub client reads HF_HUB_OFFLINE on import: a new process
        result = agentsd_cli("generate", *argv)
        code, stderr = result.returncode, result.stderr
    else:
        code, stderr = run_main("generate", *argv), capsys.readouterr().err
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("agentsd: error:")]
    assert len(lines) == 1 and message in lines[0], stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "o").exists()  # nothing created, even where the model loaded first


def stderr_lines(result):
    """The lines of a run's stderr, less the notices transformers prints on import where torchvision
    is missing (`... requires torchvision (not installed) ...`): the machine's, not the run's. They
    come through transformers' own handler (`[transformers] ...`), or, where the environment says
    CI=true (CI does), through the root logger (`WARNING: ...`)."""
    notice = "requires torchvision (not installed)"
    return [line for line in result.stderr.strip().splitlines() if notice not in line]


def test_a_model_that_cannot_be_loaded_gets_one_line_alone(tmp_path):
    """Not the hub client's retries, fallbacks and deprecation warnings before it, and its reason
    (the hub's nested parentheses) in balanced parentheses."""
    result = agentsd_cli("generate", "--model", "no-such-org/no-such-model", "--prompt", "x", "--out", tmp_path / "o")
    assert result.returncode == 2
    (line,) = stderr_lines(result)
    assert line.startswith("agentsd: error: cannot load model 'no-such-org/no-such-model' (")
    assert "hf auth login" in line
    depth = 0
    for char in line:
        depth += {"(": 1, ")": -1}.get(char, 0)
        assert depth >= 0, line
    assert depth == 0, line


def test_a_scheduler_refused_for_flux_gets_one_line_alone(tmp_path):
    """FlowMatchHeun built from Flux's FlowMatchEuler config: diffusers warns that config attributes
    will be ignored; agentsd, which refuses it, says only why."""
    pytest.importorskip("agentsd.testing.tiny_flux", reason="this diffusers has no Flux")
    model = tmp_path / "flux"
    tiny_pipeline("flux").save_pretrained(model)
    result = agentsd_cli("generate", "--model", model, "--prompt", "x", "--scheduler", "flow-heun", "--out",
                         tmp_path / "o")  # fmt: skip
    assert result.returncode == 2
    assert stderr_lines(result) == [
        "agentsd: error: --scheduler: FlowMatchHeunDiscreteScheduler cannot run Flux, whose pipelines set their own "
        "shifted sigmas: use flow-euler, or leave out --scheduler to keep the model's own."
    ]
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(models, tmp_path):
    result = agentsd_cli("generate", "--model", models / "sd15", "--prompt", "x", "--steps", "0", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_no_subcommand_prints_help_and_exits_1():
    result = agentsd_cli()
    assert result.returncode == 1 and "generate" in result.stderr


def test_presets_and_env():
    presets = agentsd_cli("presets")
    assert presets.returncode == 0
    assert {line.split()[0] for line in presets.stdout.splitlines()} >= {"paper", "sd21", "sdxl", "highres"}
    env = agentsd_cli("env")
    assert env.returncode == 0 and "diffusers:" in env.stdout and "torch:" in env.stdout


def test_ctrl_c_keeps_every_finished_image(models, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    argv = ["generate", "--model", models / "sd15", "--prompt", "x", "--num-images", "50", "--steps", "10"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentsd", *map(str, argv), "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.png"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    finished = sorted(out.glob("*.png"))
    assert 2 <= len(finished) < 50
    for png in finished:
        assert Image.open(png).size == (64, 64)
        assert png.with_suffix(".json").exists()
    assert not list(out.glob(".*tmp"))


def test_every_config_field_has_a_flag_that_reaches_the_config():
    """A value different from the default, for every AgentSDConfig field, parsed from its flag."""
    import dataclasses

    from agentsd import AgentSDConfig
    from agentsd.cli.commands import FLAG_NAMES, agent_config, build_parser

    other = dict(attn_precision="fp32", attention_backend="einsum", agent_selection="pool")
    argv = ["generate", "--model", "m", "--prompt", "p"]
    expected = {}
    for f in dataclasses.fields(AgentSDConfig):
        flag = "--" + FLAG_NAMES.get(f.name, f.name.replace("_", "-"))
        if isinstance(f.default, bool):
            argv.append(flag if not f.default else "--no-" + flag[2:])
            expected[f.name] = not f.default
        elif f.name == "block_range":  # two values: START STOP
            argv += [flag, "1", "3"]
            expected[f.name] = [1, 3]  # as to_dict writes it
        else:
            value = other.get(f.name, 2 if isinstance(f.default, int) else 0.25)
            argv += [flag, str(value)]
            expected[f.name] = value
    config = agent_config(build_parser().parse_args(argv))
    assert config.to_dict() == expected


def test_generate_says_what_agentsd_did(models, tmp_path):
    """One line from `agentsd.status`, summed over the pipeline calls: the UNet calls of each
    phase and in how many of them and of the 3 patched layers agent attention and token merging
    ran (2 images one at a time; DDIM, 5 steps: 801 and 601 are before progress 0.4)."""
    result = agentsd_cli(
        "generate", "--model", models / "sd15", "--prompt", "x", "--steps", "5", "--num-images", "2", "--out", tmp_path
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "agentsd: 10 UNet calls since patching (4 agent phase, 6 ToMe phase); "
        "agent attention on 4 calls (3 of 3 layers), token merging on 6 calls (3 of 3 layers)"
    ) in result.stdout
    assert "agentsd steps: 1-2 agent attention, 3-5 token merging" in result.stdout
    sidecar = json.loads((tmp_path / "p0000_s1.json").read_text())
    assert sidecar["agentsd_phases"] == ["agent", "agent", "tome", "tome", "tome"]
    assert "no layer ran agent attention" not in result.stderr


def test_a_run_without_agent_attention_warns(models, tmp_path):
    """A tiny SDXL at 64 px: its first attention level is 8x8, under min_tokens."""
    result = agentsd_cli(
        "generate", "--model", models / "sdxl", "--preset", "sdxl", "--prompt", "x", "--steps", "2",
        "--compare", "--out", tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "no layer ran agent attention in the agentsd run" in result.stderr
    assert "8x8 = 64 tokens < min_tokens=256" in result.stderr


def test_sdxl_runs_the_sdxl_preset_unless_told(models, tmp_path, capsys):
    """The default preset follows the model: SDXL's (max_downsample 2, its first attention level),
    with the flags on top; the paper's patches no layer of it (the case above)."""
    from agentsd.api.presets import load_preset

    assert run_main("generate", "--model", models / "sdxl", "--prompt", "x", "--steps", "1", "--ratio", "0.3",
                    "--out", tmp_path) == 0  # fmt: skip
    record = json.loads((tmp_path / "p0000_s0.json").read_text())
    assert record["agentsd_config"] == load_preset("sdxl").replace(ratio=0.3).to_dict()


def test_image_seed_and_agent_seed_are_independent(tmp_path):
    """--seed seeds the images, --agent-seed the config; a preset's seed stays unless --agent-seed."""
    from agentsd.cli.commands import agent_config, build_parser

    preset = tmp_path / "seeded.yaml"
    preset.write_text("config:\n  seed: 3\n")
    preset = str(preset)

    def parse(*extra):
        args = build_parser().parse_args(["generate", "--prompt", "p", *extra])
        return args.seed, agent_config(args).seed

    assert parse() == (0, 0)
    assert parse("--seed", "5") == (5, 0)
    assert parse("--agent-seed", "7") == (0, 7)
    assert parse("--seed", "5", "--agent-seed", "7") == (5, 7)
    assert parse("--preset", preset) == (0, 3)
    assert parse("--preset", preset, "--seed", "5") == (5, 3)
    assert parse("--preset", preset, "--agent-seed", "7") == (0, 7)


def run_main(*args):
    """`agentsd ARGS` in this process (for errors raised before any model is loaded)."""
    from agentsd.cli.commands import main

    return main([str(a) for a in args])


def error_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("agentsd: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt", "x", "--steps", "1"],
        ["compare", "--num-prompts", "1", "--steps", "1"],
        ["bench", "--arch", "tiny", "--sizes", "64", "--methods", "baseline", "--repeats", "1", "--warmup", "0"],
    ],
    ids=lambda c: c[0],
)
@pytest.mark.parametrize("device", ["gpu0", "cuda:x"])
def test_an_invalid_device_is_refused_before_anything_is_created(models, tmp_path, capsys, command, device):
    out = tmp_path / "new" / "out"
    model = [] if command[0] == "bench" else ["--model", models / "sd15"]
    assert run_main(*command, *model, "--device", device, "--out", out) == 2
    assert repr(device) in error_line(capsys)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_refuses_cuda_without_cuda(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main("bench", "--arch", "tiny", "--sizes", "64", "--device", "cuda", "--out", out) == 2
    assert "CUDA is not available" in error_line(capsys)
    assert not out.exists()


def test_a_model_that_fails_to_load_leaves_no_empty_output_folder(tmp_path, capsys):
    (tmp_path / "not-a-model").mkdir()
    out = tmp_path / "new" / "out"
    assert run_main("generate", "--model", tmp_path / "not-a-model", "--prompt", "x", "--out", out) == 2
    assert "cannot load model" in error_line(capsys)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command", ["generate", "compare"])
def test_xformers_backend_without_xformers_is_refused_at_argument_time(models, tmp_path, capsys, monkeypatch, command):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real(name, *a))
    monkeypatch.delitem(sys.modules, "xformers", raising=False)
    out = tmp_path / "out"
    if command == "generate":
        argv = ["generate", "--prompt", "x", "--attention-backend", "xformers"]
    else:
        argv = ["compare", "--num-prompts", "1", "--method", "paper:attention_backend=xformers"]
    assert run_main(*argv, "--model", models / "sd15", "--steps", "1", "--out", out) == 2
    line = error_line(capsys)
    assert "pip install xformers" in line and "sdpa" in line
    assert not out.exists()


def test_xformers_backend_on_the_cpu_is_refused_at_argument_time(models, tmp_path, capsys, monkeypatch):
    import importlib.machinery
    import importlib.util

    real = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("xformers", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "xformers" else real(name, *a))
    out = tmp_path / "out"
    argv = ["generate", "--prompt", "x", "--attention-backend", "xformers", "--device", "cpu", "--out", out]
    assert run_main(*argv, "--model", models / "sd15", "--steps", "1") == 2
    assert "runs on CUDA only" in error_line(capsys)
    assert not out.exists()


def test_a_prompts_file_that_is_not_utf8_is_named(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("caf\xe9\n".encode("latin-1"))
    assert run_main("generate", "--prompts-file", prompts, "--out", tmp_path / "out") == 2
    line = error_line(capsys)
    assert str(prompts) in line and "UTF-8" in line
    assert not (tmp_path / "out").exists()


def subcommands():
    import argparse

    from agentsd.cli.commands import build_parser

    parser = build_parser()
    (group,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return group.choices


@pytest.mark.parametrize("command", ["generate", "bench", "compare", "presets", "env"])
def test_every_flag_has_help_and_shows_its_default(command):
    import argparse

    parser = subcommands()[command]
    text = "".join(parser.format_help().split())  # argparse wraps lines inside words with hyphens
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        shown = action.default not in (None, False) and action.default is not argparse.SUPPRESS
        if shown and not isinstance(action.default, list):
            assert f"(default:{action.default})" in text, f"{command} {action.option_strings[0]}"
    assert "(default:None)" not in text


def test_bench_help_lists_the_default_methods_and_the_output_files():
    from agentsd.bench import benchmark

    text = " ".join(subcommands()["bench"].format_help().split())
    for method in benchmark.METHODS + benchmark.OPTIONAL_METHODS:
        assert method in text
    for name in ("results.json", "results.csv", "results.md", "speedup.png"):
        assert name in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--repeats", "0"], "--repeats 0 must be positive"),
        (["--warmup", "-1"], "--warmup -1 must be >= 0"),
        (["--sizes", "100"], "--sizes 100 is not a positive multiple of 8"),
        (["--batches", "0"], "--batches 0 must be positive"),
        (["--arch", "sd16"], "invalid choice: 'sd16'"),
        (["--methods", "agentsd-fast"], "invalid choice: 'agentsd-fast'"),
        (["--preset", "fastest"], "unknown preset 'fastest'"),
        (["--compile", "no-such-backend"], "unknown torch.compile backend 'no-such-backend'"),
    ],
)
def test_bench_refuses_bad_input_before_anything_is_created(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert run_main("bench", "--arch", "tiny", "--sizes", "64", "--methods", "baseline", *args, "--out", out) == 2
    assert message in error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "arch, size, message",
    [
        ("tiny-sd35", 2048, "tiny-sd35 takes sizes up to 1024 px (its positional table covers 64x64 patches)"),
        ("sd35-large", 4096, "sd35-large takes sizes up to 3072 px"),
        ("tiny-flux", 264, "tiny-flux takes multiples of 16 (whole 2x2 patches of the VAE's 8x latent): use e.g. 256"),
    ],
)
def test_bench_names_the_sizes_a_transformer_takes(tmp_path, capsys, arch, size, message):
    """Past SD 3's positional table the model itself fails mid-run ("Height (128) cannot be greater
    than `pos_embed_max_size`"): refused first, naming the largest size; the help lists them."""
    out = tmp_path / "out"  # --blocks 1: where nothing refused it, SD 3.5 Large would be built whole
    assert run_main("bench", "--arch", arch, "--blocks", "1", "--sizes", "256", size, "--out", out) == 2
    assert f"agentsd: error: --sizes {size}: {message}" in error_line(capsys)
    assert not out.exists()
    text = " ".join(subcommands()["bench"].format_help().split())
    assert "sd35-large up to 3072, tiny-sd35 up to 1024" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "x", "--compare", "--no-agent"], "--compare"),
        (["compare", "--images-per-class", "0"], "--images-per-class 0 must be positive"),
        (["compare", "--samples", "0"], "--samples 0 must be positive"),
    ],
)
def test_contradictory_or_out_of_range_options_are_refused(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert run_main(*argv, "--out", out) == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_env_lists_the_optional_packages_and_version_prints_the_version(capsys):
    import agentsd
    from agentsd.cli.commands import environment

    info = environment()
    for package in (
        "peft",
        "tomesd",
        "DeepCache",
        "cache-dit",
        "torchmetrics",
        "torch-fidelity",
        "matplotlib",
        "xformers",
    ):
        assert package in info
    with pytest.raises(SystemExit) as stop:
        from agentsd.cli.commands import build_parser

        build_parser().parse_args(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"agentsd {agentsd.__version__}"
