"""`agentsd generate` and `agentsd compare` on the diffusion transformers (SD 3, SD 3.5,
PixArt-Sigma): the model family picks the preset and the call arguments, what does not fit the
model is refused before any work, and the README's first command runs on a tiny SD 3."""

import json
import runpy
import sys
import types
from pathlib import Path

import pytest
from cli_run import run_main

from agentsd.api.presets import load_preset
from agentsd.cli import loading
from agentsd.cli.generation import GenerationError, GenerationSettings, ImageJob, generate
from agentsd.testing import tiny_pipeline

pytest.importorskip("agentsd.testing.tiny_dit", reason="this diffusers has no SD3 or PixArt-Sigma")

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--max-sequence-length", "8"]  # the tiny T5 prompts: 8 tokens instead of 256 (SD 3) or 300 (PixArt)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for kind in ("sd15", "sdxl", "sd3", "sd35", "pixart"):
        tiny_pipeline(kind).save_pretrained(root / kind)
    return root


def sidecar(path):
    return json.loads(Path(path).with_suffix(".json").read_text())


def test_the_readme_first_command_on_a_tiny_sd3(tmp_path, monkeypatch, capsys):
    """`python scripts/make_tiny_model.py tiny-sd3 --kind sd3 && agentsd generate --model tiny-sd3
    --prompt "a photo of a cat" --steps 8 --compare --out out3`, both in this process: the
    images, the sd3 preset, and what agentsd did, step by step over SD 3's noise levels."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["make_tiny_model.py", "tiny-sd3", "--kind", "sd3"])
    runpy.run_path(str(ROOT / "scripts" / "make_tiny_model.py"), run_name="__main__")
    command = ["generate", "--model", "tiny-sd3", "--prompt", "a photo of a cat", "--steps", "8", "--compare"]
    code, out, errors = run_main(capsys, *command, "--out", "out3")
    assert code == 0, errors
    # Flow matching passes t = 1000 sigma (shift 3): the agent phase while 1 - t / 1000 < 0.4.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(8)
    phases = ["agent" if 1 - float(t) / 1000 < 0.4 else "tome" for t in scheduler.timesteps]
    agent = phases.count("agent")
    assert 0 < agent < 8
    assert (
        f"agentsd: 8 transformer calls since patching ({agent} agent phase, {8 - agent} ToMe phase); "
        f"agent attention on {agent} calls (2 of 2 layers), token merging on {8 - agent} calls (2 of 2 layers)"
    ) in out
    assert f"agentsd steps: 1-{agent} agent attention, {agent + 1}-8 token merging" in out
    assert "speedup:" in out
    record = sidecar("out3/p0000_s0.png")
    assert record["agentsd_phases"] == phases and record["agentsd_config"] == load_preset("sd3").to_dict()
    assert record["scheduler"] == "FlowMatchEulerDiscreteScheduler" and record["max_sequence_length"] == 256
    assert sidecar("out3/baseline/p0000_s0.png")["method"] == "baseline"
    assert Image.open("out3/p0000_s0.png").size == (128, 128)
    assert Image.open("out3/compare/p0000_s0.png").size == (256, 128)


def test_pixart_runs_the_size_asked_with_its_own_preset(models, tmp_path, capsys):
    """Resolution binning off: 128 px runs on a 16x16 patch grid (binned, it would run at 256 px,
    32x32, and be resized to 128); with min_tokens 257 the summary names the grid it ran."""
    code, out, errors = run_main(
        capsys, "generate", "--model", models / "pixart", "--prompt", "a <b>red</b> cube", "--negative-prompt",
        "blurry", "--guidance", "4.5", "--steps", "2", *QUICK, "--min-tokens", "257", "--out", tmp_path,
    )  # fmt: skip
    assert code == 0, errors
    assert "agentsd: 2 transformer calls" in out and "(grid 16x16 = 256 tokens < min_tokens=257)" in out
    record = sidecar(tmp_path / "p0000_s0.png")
    assert record["agentsd_config"] == load_preset("pixart").replace(min_tokens=257).to_dict()
    assert (record["width"], record["height"], record["max_sequence_length"]) == (128, 128, 8)
    assert (record["negative_prompt"], record["guidance"], record["prompt"]) == ("blurry", 4.5, "a <b>red</b> cube")


def test_sd35_baseline_alone_with_another_flow_matching_scheduler(models, tmp_path, capsys):
    code, out, errors = run_main(
        capsys, "generate", "--model", models / "sd35", "--prompt", "x", "--no-agent", "--scheduler", "flow-heun",
        "--steps", "2", *QUICK, "--out", tmp_path,
    )  # fmt: skip
    assert code == 0, errors
    assert "baseline: 1 written" in out and "transformer calls" not in out
    record = sidecar(tmp_path / "p0000_s0.png")
    assert (record["method"], record["agentsd_config"], record["scheduler"]) == ("baseline", None, "flow-heun")
    assert record["scheduler_config"]["shift"] == 3.0  # the model's schedule, kept


@pytest.mark.parametrize(
    "kind, preset", [("sd15", "paper"), ("sdxl", "sdxl"), ("sd3", "sd3"), ("sd35", "sd3"), ("pixart", "pixart")]
)
def test_the_default_preset_follows_the_model_family(models, kind, preset):
    assert loading.model_default_preset(str(models / kind)) == preset  # from the config files alone
    assert loading.default_preset(tiny_pipeline(kind)) == preset


def test_a_model_whose_configs_cannot_be_read_has_no_default_preset_before_loading(tmp_path):
    assert loading.model_default_preset(str(tmp_path / "missing")) is None
    assert loading.model_family(str(tmp_path)) is None


def test_call_options_are_what_each_pipeline_takes():
    """PixArt runs the size asked (no resolution binning) and the prompt as written (no caption
    cleaning, which needs beautifulsoup4 and ftfy); the T5 prompt length only when given."""
    sd15, sd3, pixart = (tiny_pipeline(kind) for kind in ("sd15", "sd3", "pixart"))
    assert loading.call_options(sd15) == {} and loading.call_options(sd3) == {}
    assert loading.call_options(sd3, 16) == {"max_sequence_length": 16}
    assert loading.call_options(pixart, 16) == dict(
        use_resolution_binning=False, clean_caption=False, max_sequence_length=16
    )
    assert [loading.prompt_length(p) for p in (sd15, sd3, pixart)] == [None, 256, 300]
    assert loading.prompt_length(sd3, 16) == 16


def test_a_size_that_is_not_whole_patches_is_refused_before_any_work(tmp_path):
    pipe = tiny_pipeline("sd3")
    pipe.vae_scale_factor = 8  # as SD 3's own VAE: 16 px per 2x2 patch
    with pytest.raises(GenerationError, match=r"width 1000 is not a multiple of 16, .* use e\.g\. 992"):
        loading.check_size(pipe, 1000, 1024)
    loading.check_size(pipe, 1024, 512)
    with pytest.raises(GenerationError, match="height 520 is not a multiple of 16"):
        generate(pipe, [ImageJob(0, "x", 0)], tmp_path / "out", GenerationSettings("tiny", height=520), None)
    assert not (tmp_path / "out").exists()
    loading.check_size(tiny_pipeline("sd15"), 72, 56)  # a UNet: multiples of the VAE's factor


@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize(
    "command, kind, args, message",
    [
        ("generate", "sd3", ["--scheduler", "euler"],
         "scheduler 'euler' is for noise-prediction models (SD 1.x, 2.x, XL, PixArt); this model's "
         "FlowMatchEulerDiscreteScheduler does flow matching: use one of flow-euler, flow-heun, or leave out"),
        ("compare", "sd3", ["--scheduler", "dpm++2m"], "use one of flow-euler, flow-heun"),
        ("generate", "pixart", ["--scheduler", "flow-euler"], "use one of ddim, pndm, euler"),
        ("generate", "sd15", ["--max-sequence-length", "16"], "pipeline has no T5 encoder"),
        ("generate", "sd3", ["--max-sequence-length", "513"], "--max-sequence-length 513 is more than SD 3's"),
        ("compare", "sd3", ["--max-sequence-length", "0"], "--max-sequence-length 0 must be positive"),
    ],
)  # fmt: skip
def test_what_does_not_fit_the_model_is_refused_before_loading_it(
    models, tmp_path, capsys, no_loading, command, kind, args, message
):
    base = {"generate": ["generate", "--prompt", "x"], "compare": ["compare", "--num-prompts", "1", "--no-memory"]}
    out = tmp_path / "new" / "out"
    code, _, errors = run_main(capsys, *base[command], "--model", models / kind, *args, "--out", out)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "command, args, message",
    [
        (["generate", "--prompt", "x"], ["--scheduler", "euler"], "use one of flow-euler, flow-heun"),
        (["generate", "--prompt", "x"], ["--max-sequence-length", "600"], "use 512 or fewer"),
        (["compare", "--num-prompts", "1", "--no-memory"], ["--method", "tomesd:0.5"],
         "method 'tomesd:0.5': ToMe for SD patches Stable Diffusion UNets only, and this model is a "
         "SD3Transformer2DModel"),
    ],
)  # fmt: skip
def test_what_does_not_fit_is_refused_once_loaded_when_the_configs_cannot_be_read_first(
    models, tmp_path, capsys, monkeypatch, command, args, message
):
    """A hub model that is not cached: its family and scheduler are known once loaded, still
    before any image and without leaving the output folder behind."""
    from agentsd.cli import generation, schedulers

    monkeypatch.setattr(loading, "_model_config", lambda model: None)
    monkeypatch.setattr(schedulers, "model_scheduler", lambda model, name=None: None)
    monkeypatch.setattr(generation, "generate_runs", lambda *a, **k: pytest.fail("generation started"))
    monkeypatch.setitem(sys.modules, "tomesd", types.ModuleType("tomesd"))  # installed or not
    out = tmp_path / "new" / "out"
    code, _, errors = run_main(capsys, *command, "--model", models / "sd3", "--steps", "2", *args, "--out", out)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "new").exists()


def test_a_block_range_past_the_transformers_blocks_is_refused_once_loaded(models, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    argv = ["generate", "--model", models / "sd3", "--prompt", "x", "--block-range", "5", "9", "--out", out]
    code, _, errors = run_main(capsys, *argv)
    assert code == 2 and "selects none of this transformer's 2 blocks" in errors[0] and "--block-range" in errors[0]
    assert not (tmp_path / "new").exists()


def test_compare_on_sd3_scores_against_the_baseline_and_resumes(models, tmp_path, capsys):
    """Methods baseline, sd3 and paper:ratio=0.5: PSNR and SSIM to the baseline, no FID without a
    reference. A rerun without --method (the baseline and the family's preset) reuses the images;
    another prompt length or scheduler is refused, naming it."""
    pytest.importorskip("torchmetrics")
    command = ["compare", "--model", models / "sd3", "--num-prompts", "1", "--steps", "2", "--no-memory"]
    command += ["--samples", "1", "--out", tmp_path]
    code, out, errors = run_main(capsys, *command, *QUICK, "--method", "sd3", "--method", "paper:ratio=0.5")
    assert code == 0, errors
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["method"]: row for row in results["rows"]}
    assert list(rows) == ["baseline", "sd3", "paper:ratio=0.5"]
    for name in ("sd3", "paper:ratio=0.5"):
        assert rows[name]["psnr"] > 0 and 0 < rows[name]["ssim"] <= 1 and rows[name]["fid"] is None
    assert results["settings"]["max_sequence_length"] == 8
    assert "sd3: agentsd: 2 transformer calls" in out
    images = {p: p.stat().st_mtime_ns for p in (tmp_path / "images").rglob("*.png")}

    code, _, errors = run_main(capsys, *command, *QUICK)
    assert code == 0, errors
    assert [row["method"] for row in json.loads((tmp_path / "results.json").read_text())["rows"]] == ["baseline", "sd3"]
    assert {p: p.stat().st_mtime_ns for p in images} == images  # reused, not made again

    code, _, errors = run_main(capsys, *command, "--max-sequence-length", "16")
    assert code == 2 and "max_sequence_length 8 (now 16)" in errors[0], errors
    code, _, errors = run_main(capsys, *command, *QUICK, "--scheduler", "flow-heun")
    assert (
        code == 2 and "scheduler 'FlowMatchEulerDiscreteScheduler' (now 'FlowMatchHeunDiscreteScheduler')" in errors[0]
    )
    assert {p: p.stat().st_mtime_ns for p in images} == images
