"""`agentsd generate` and `agentsd compare` on a tiny Flux model saved locally: the family's preset,
the pipeline's own guidance, the step schedule over Flux's shifted sigmas, and what Flux refuses
before any work."""

import json
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_main

from agentsd.presets import load_preset
from agentsd.testing import tiny_pipeline

tiny_flux = pytest.importorskip("agentsd.tiny_flux", reason="this diffusers has no Flux")
flux = pytest.importorskip("agentsd.flux")
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
