"""`agentsd generate` and `agentsd compare` on a tiny Flux model saved locally: the family's preset,
the pipeline's own guidance, the step schedule over Flux's shifted sigmas, true CFG with a negative
prompt, and what Flux refuses before any work (a Fill model among it)."""

import json
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_main

from agentsd.api.presets import load_preset
from agentsd.testing import tiny_pipeline

tiny_flux = pytest.importorskip("agentsd.testing.tiny_flux", reason="this diffusers has no Flux")
flux = pytest.importorskip("agentsd.processors.flux_attention")
if flux.flux_attention_class() is None:
    pytest.skip("agentsd patches Flux from diffusers 0.35 (FluxAttention)", allow_module_level=True)

SIZE = ["--height", "128", "--width", "128", "--max-sequence-length", "16"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-flux"
    tiny_pipeline("flux").save_pretrained(folder)
    return folder


def test_generate_on_flux_acts_with_its_preset_and_the_pipelines_guidance(model, tmp_path, capsys):
    """Defaults: preset flux, guidance 3.5 (FluxPipeline's). 6 steps over Flux's shifted sigmas:
    the agent phase while 1 - sigma < 0.4, read here from the scheduler itself."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    out = tmp_path / "out"
    code, printed, errors = run_main(
        capsys, "generate", "--model", model, "--prompt", "a cat", "--steps", "6", *SIZE, "--compare", "--out", out
    )
    assert code == 0, errors
    record = json.loads((out / "p0000_s0.json").read_text())
    assert record["guidance"] == 3.5 and record["agentsd_config"] == load_preset("flux").to_dict()
    scheduler = FlowMatchEulerDiscreteScheduler(**tiny_flux.SCHEDULER_CONFIG)
    mu = calculate_shift(256, 256, 4096, 0.5, 1.15)  # a 16x16 grid: 256 image tokens
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
    agent = sum(1 - float(s) < 0.4 for s in scheduler.sigmas[:-1])
    assert 0 < agent < 6
    assert f"agentsd steps: 1-{agent} agent attention, {agent + 1}-6 token merging" in printed
    assert "agent attention on" in printed and "(3 of 3 layers)" in printed
    assert record["agentsd_phases"] == ["agent"] * agent + ["tome"] * (6 - agent)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scheduler", "flow-heun"], "FlowMatchHeunDiscreteScheduler cannot run Flux"),
        (["--scheduler", "ddim"], "is for noise-prediction models"),
        (["--max-sequence-length", "600"], "more than Flux's pipeline takes: use 512 or fewer"),
    ],
)
def test_what_flux_refuses_leaves_no_folder(model, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, _, errors = run_main(capsys, "generate", "--model", model, "--prompt", "a cat", *SIZE, *args, "--out", out)
    assert code == 2 and any(message in e for e in errors), errors
    assert not out.exists()


def test_compare_on_flux_runs_the_baseline_and_the_flux_preset(model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "cmp"
    code, printed, errors = run_main(
        capsys, "compare", "--model", model, "--prompts-file", prompts, "--steps", "3", *SIZE, "--out", out
    )
    assert code == 0, errors
    methods = [row["method"] for row in json.loads(Path(out, "results.json").read_text())["rows"]]
    assert methods == ["baseline", "flux"]
    assert "flux: agentsd: 3 transformer calls" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--negative-prompt", "blurry"], "add --true-cfg-scale above 1"),
        (["--negative-prompt", "blurry", "--true-cfg-scale", "1"], "--true-cfg-scale 1.0 does nothing"),
        (["--true-cfg-scale", "4"], "give both"),
    ],
)
def test_a_negative_prompt_without_true_cfg_is_refused_before_any_folder(model, tmp_path, capsys, args, message):
    """Flux's pipelines use the negative prompt only with true CFG: without it the images would be
    those of no negative prompt, with one recorded in their sidecars."""
    out = tmp_path / "new" / "out"
    code, _, errors = run_main(capsys, "generate", "--model", model, "--prompt", "a cat", *SIZE, *args, "--out", out)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "new").exists()


def test_true_cfg_runs_the_negative_prompt_and_counts_steps_not_calls(model, tmp_path, capsys):
    """With true CFG each step runs the transformer twice (the prompt, then the negative prompt):
    6 calls for 3 steps; the step line and the sidecar count the 3 steps."""
    out = tmp_path / "out"
    code, printed, errors = run_main(
        capsys, "generate", "--model", model, "--prompt", "a cat", "--negative-prompt", "blurry",
        "--true-cfg-scale", "4", "--steps", "3", *SIZE, "--out", out,
    )  # fmt: skip
    assert code == 0, errors
    record = json.loads((out / "p0000_s0.json").read_text())
    assert (record["negative_prompt"], record["true_cfg_scale"]) == ("blurry", 4.0)
    assert "agentsd: 6 transformer calls" in printed and len(record["agentsd_phases"]) == 3
    plain = tmp_path / "plain"
    code, printed, errors = run_main(
        capsys, "generate", "--model", model, "--prompt", "a cat", "--steps", "3", *SIZE, "--out", plain
    )
    assert code == 0 and "agentsd: 3 transformer calls" in printed, errors
    assert json.loads((plain / "p0000_s0.json").read_text())["true_cfg_scale"] == 1.0  # FluxPipeline's default


def test_true_cfg_on_a_pipeline_without_it_is_refused(tmp_path, capsys):
    model = tmp_path / "sd15"
    tiny_pipeline("sd15").save_pretrained(model)
    out = tmp_path / "out"
    argv = ["generate", "--model", model, "--prompt", "a cat", "--steps", "1", "--out", out]
    code, _, errors = run_main(capsys, *argv, "--negative-prompt", "blurry", "--true-cfg-scale", "4")
    assert code == 2 and "StableDiffusionPipeline does not have" in errors[0], errors
    code, _, errors = run_main(capsys, *argv, "--negative-prompt", "blurry", "--guidance", "1")
    assert code == 2 and "--negative-prompt does nothing with guidance 1" in errors[0], errors
    assert not out.exists()


@pytest.fixture(scope="module")
def fill_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-flux-fill"
    tiny_pipeline("flux-fill").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", [["generate", "--prompt", "a cat"], ["compare", "--num-prompts", "1"]])
@pytest.mark.parametrize("when", ["before loading", "once loaded"])
def test_an_image_conditioned_model_is_refused_naming_it(fill_model, tmp_path, capsys, monkeypatch, command, when):
    """Flux Fill makes images from an input image and a mask: called with a prompt alone it fails
    inside diffusers. Refused before any folder is made, from the model's model_index.json, or
    once loaded where that cannot be read first (a hub model not in the cache)."""
    from agentsd.cli import pipeline_checks

    if when == "once loaded":
        monkeypatch.setattr(pipeline_checks, "model_pipeline_class", lambda model: None)
    out = tmp_path / "new" / "out"
    code, _, errors = run_main(capsys, *command, "--model", fill_model, "--steps", "1", *SIZE, "--out", out)
    assert code == 2 and len(errors) == 1, errors
    assert "loads as FluxFillPipeline" in errors[0] and "text-to-image model" in errors[0]
    assert not (tmp_path / "new").exists()


def test_generate_from_python_refuses_an_image_conditioned_pipeline(tmp_path):
    from agentsd.cli.generation import GenerationError, GenerationSettings, generate, plan_jobs

    pipe = tiny_pipeline("flux-fill")
    settings = GenerationSettings(model="fill", width=128, height=128, steps=1)
    with pytest.raises(GenerationError, match="loads as FluxFillPipeline"):
        generate(pipe, plan_jobs(["a cat"], 1, 0), tmp_path / "out", settings, load_preset("flux"))
    assert not (tmp_path / "out").exists()
