"""`agentsd compare` resumes a run and never mixes two: each existing image's sidecar is checked
against the run's settings before any work."""

import json

import pytest

from agentsd.cli import compare, comparison
from agentsd.cli.generation import GenerationError, GenerationSettings
from agentsd.cli.schedulers import set_scheduler
from agentsd.testing import tiny_pipeline

PROMPTS = ["a red cube", "a blue ball"]


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline("sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, out, prompts=PROMPTS, methods=("baseline", "paper"), **settings):
    settings = GenerationSettings(**{"model": "tiny", "steps": 1, **settings})
    scoring = comparison.ComparisonSettings(measure_memory=False, samples=1)
    specs = [comparison.parse_method(str(m)) for m in methods]
    return compare.run_comparison(pipe, prompts, specs, out, settings, scoring, progress=False)


def files(out):
    return {p: p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


def refused(pipe, out, *, setup=None, **change):
    """Run with `change` over a finished run: it must be refused, leaving every file as it was."""
    before = files(out)
    with pytest.raises(GenerationError) as err:
        run(pipe, out, **change)
    assert files(out) == before
    message = str(err.value)
    assert "--overwrite" in message and "another --out" in message
    return message


def test_a_rerun_with_other_settings_is_refused_naming_them(pipe, tmp_path):
    out = tmp_path / "out"
    run(pipe, out)
    assert "steps 1 (now 2)" in refused(pipe, out, steps=2)
    assert "width 64 (now 72)" in refused(pipe, out, width=72)
    assert "guidance 7.5 (now 3.0)" in refused(pipe, out, guidance=3.0)
    assert "model 'tiny' (now 'other')" in refused(pipe, out, model="other")
    assert "prompt 'a blue ball' (now 'a green cone')" in refused(pipe, out, prompts=["a red cube", "a green cone"])
    # Same scheduler class, another config: DPM++ 2M and DPM++ 2M Karras.
    set_scheduler(pipe, "dpm++2m")
    out = tmp_path / "dpm"
    run(pipe, out)
    set_scheduler(pipe, "dpm++2m-karras")
    try:
        assert "scheduler_config.use_karras_sigmas False (now True)" in refused(pipe, out)
    finally:
        set_scheduler(pipe, "ddim")


def test_the_batch_size_and_the_device_are_settings_too(pipe, tmp_path):
    """Kernels round differently with the batch's size and on another device: images made with
    either changed are refused as the other settings are, and --overwrite makes them again."""
    out = tmp_path / "out"
    run(pipe, out)
    assert "batch_size 1 (now 2)" in refused(pipe, out, batch_size=2)
    made_elsewhere = out / "images" / "paper" / "p0000_s0.json"
    sidecar = json.loads(made_elsewhere.read_text())
    assert (sidecar["batch_size"], sidecar["device"]) == (1, "cpu")
    made_elsewhere.write_text(json.dumps(dict(sidecar, device="cuda")))
    message = refused(pipe, out)
    assert "1 image in" in message and "device 'cuda' (now 'cpu')" in message
    run(pipe, out, batch_size=2, overwrite=True)
    sidecars = [json.loads(p.read_text()) for p in (out / "images").rglob("*.json")]
    assert len(sidecars) == 4 and {(s["batch_size"], s["device"]) for s in sidecars} == {(2, "cpu")}


def test_a_method_whose_config_changed_is_refused(pipe, tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("config:\n  ratio: 0.3\n")
    out = tmp_path / "out"
    run(pipe, out, methods=("baseline", preset))
    preset.write_text("config:\n  ratio: 0.25\n")
    assert "agentsd_config.ratio 0.3 (now 0.25)" in refused(pipe, out, methods=("baseline", preset))


def test_an_interrupted_run_resumes_and_results_record_the_settings(pipe, tmp_path):
    out = tmp_path / "out"
    run(pipe, out, steps=2)
    removed = out / "images" / "paper" / "p0001_s1.png"
    removed.unlink()  # its sidecar stays: written first, as a run killed between the two leaves it
    kept = {p: t for p, t in files(out / "images").items() if p != removed.with_suffix(".json")}
    results = run(pipe, out, steps=2)
    assert removed.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    saved = json.loads((out / "results.json").read_text())["settings"]
    assert saved == json.loads(json.dumps(results["settings"]))
    assert (saved["steps"], saved["width"], saved["model"], saved["seed"]) == (2, 64, "tiny", 0)
    assert saved["scheduler"] == "DDIMScheduler" and saved["dtype"] == "float32"


def test_overwrite_makes_again_the_images_made_with_other_settings_only(pipe, tmp_path):
    out = tmp_path / "out"
    run(pipe, out, steps=1)
    run(pipe, out, steps=2, overwrite=True)
    sidecars = [json.loads(p.read_text()) for p in (out / "images").rglob("*.json")]
    assert len(sidecars) == 4 and {s["steps"] for s in sidecars} == {2}
    assert json.loads((out / "results.json").read_text())["settings"]["steps"] == 2
    # An interrupted --overwrite run continues with --overwrite: what it made is kept.
    made = files(out / "images")
    run(pipe, out, steps=2, overwrite=True)
    assert files(out / "images") == made


def test_the_command_names_the_setting_and_takes_overwrite(tmp_path, capsys):
    from agentsd.cli.commands import main

    model = tmp_path / "model"
    tiny_pipeline("sd15").save_pretrained(model)
    argv = ["compare", "--model", str(model), "--num-prompts", "2", "--no-memory", "--out", str(tmp_path / "out")]
    assert main([*argv, "--steps", "1"]) == 0
    capsys.readouterr()
    assert main([*argv, "--steps", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("agentsd: error:")]
    assert len(errors) == 1 and "4 images" in errors[0] and "steps 1 (now 2)" in errors[0], errors
    assert main([*argv, "--steps", "2", "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["steps"] == 2


def test_a_scheduler_config_holding_an_array_is_recorded_and_compared(pipe, tmp_path):
    """Sidecars record the scheduler's config: an array in it (`trained_betas`) is written as a
    list, and a rerun with the same array reuses the images."""
    import diffusers
    import numpy as np

    original = pipe.scheduler
    betas = np.linspace(0.00085, 0.012, 1000)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(original.config, trained_betas=betas)
    try:
        out = tmp_path / "out"
        run(pipe, out)
        sidecar = json.loads((out / "images" / "paper" / "p0000_s0.json").read_text())
        assert sidecar["scheduler_config"]["trained_betas"] == betas.tolist()
        made = files(out / "images")
        run(pipe, out)
        assert files(out / "images") == made
    finally:
        pipe.scheduler = original
