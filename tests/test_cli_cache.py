"""`--cache NAME[:NUMBER]` of `agentsd generate` and `agentsd compare` on tiny Flux and Wan models
saved locally: the runs go under the step cache, each image's sidecar records the cache and the
model calls it computed and skipped, reruns never mix images made under other caches, `compare`
scores cache and cache+METHOD with their skip fractions, and bad input is refused before any work."""

import json

import numpy as np
import pytest
import torch
from cli_run import run_main
from PIL import Image

from agentsd.testing import tiny_pipeline

hooks = pytest.importorskip("diffusers.hooks", reason="this diffusers has no step caches")
tiny_flux = pytest.importorskip("agentsd.testing.tiny_flux", reason="this diffusers has no Flux")
tiny_wan = pytest.importorskip("agentsd.testing.tiny_wan", reason="this diffusers has no Wan")
if not hasattr(hooks, "TaylorSeerCacheConfig"):
    pytest.skip("diffusers' step caches with TaylorSeer come with diffusers 0.36", allow_module_level=True)

SIZE = ["--height", "128", "--width", "128", "--max-sequence-length", "16"]
STEPS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-flux"
    tiny_pipeline("flux").save_pretrained(folder)
    return folder


def cli(capsys, *args):
    """`run_main`, its error lines as one text."""
    code, printed, errors = run_main(capsys, *args)
    return code, printed, "\n".join(errors)


def generate(capsys, model, out, *extra):
    return cli(capsys, "generate", "--model", model, "--prompt", "a cat", "--steps", str(STEPS), *SIZE,
                    "--out", out, *extra)  # fmt: skip


def test_generate_runs_both_methods_under_the_cache_and_records_it(model, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed, errors = generate(capsys, model, out, "--compare", "--cache", "first-block:0.5")
    assert code == 0, errors
    agentsd_record = json.loads((out / "p0000_s0.json").read_text())
    baseline_record = json.loads((out / "baseline" / "p0000_s0.json").read_text())
    assert agentsd_record["cache"] == baseline_record["cache"] == "first-block:0.5"

    # The counts agree with agentsd's own (its processors record the calls they ran in).
    calls = agentsd_record["cache_calls"]
    assert calls["computed"] + calls["skipped"] == STEPS and calls["skipped"] > 0
    assert f"calls: {calls['computed']} computed, {calls['skipped']} skipped (their blocks cached)" in printed
    fraction = calls["skipped"] / STEPS
    assert f"{calls['computed']} model calls computed, {calls['skipped']} skipped (skip fraction {fraction:.2f})" in (
        printed
    )

    # The baseline under the cache is diffusers' pipeline with diffusers' cache, made here directly.
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(hooks.FirstBlockCacheConfig(threshold=0.5))
    image = pipe(
        "a cat", num_inference_steps=STEPS, height=128, width=128, max_sequence_length=16,
        generator=torch.Generator().manual_seed(0), guidance_scale=3.5,
    ).images[0]  # fmt: skip
    written = np.asarray(Image.open(out / "baseline" / "p0000_s0.png"), dtype=int)
    assert np.abs(written - np.asarray(image, dtype=int)).max() <= 1
    assert baseline_record["cache_calls"]["skipped"] > 0

    # A rerun under another cache (or none) does not mix its images with these.
    code, _, errors = generate(capsys, model, out, "--compare", "--cache", "first-block:0.3")
    assert code == 2 and "cache 'first-block:0.5' (now 'first-block:0.3')" in errors
    code, _, errors = generate(capsys, model, out, "--compare")
    assert code == 2 and "cache 'first-block:0.5' (now None)" in errors
    code, printed, errors = generate(capsys, model, out, "--compare", "--cache", "first-block:0.5")
    assert code == 0 and "0 written, 1 skipped" in printed, errors


@pytest.mark.parametrize(
    "cache, message",
    [
        ("nothing", "unknown cache 'nothing': use one of first-block, taylorseer"),
        ("first-block:x", "the number after first-block: is the threshold"),
        ("first-block:0", "must be positive"),
        ("taylorseer:1.5", "is a whole number >= 1, e.g. taylorseer:5"),
    ],
)
def test_a_bad_cache_is_refused_before_loading(tmp_path, capsys, cache, message):
    out = tmp_path / "out"
    code, _, errors = generate(capsys, tmp_path / "no-model", out, "--cache", cache)
    assert code == 2 and message in errors and not out.exists()


def test_a_cache_the_model_cannot_run_is_refused_before_any_work(model, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, errors = generate(capsys, model, out, "--cache", "sea")
    assert code == 2 and "cache 'sea' does not run on FluxTransformer2DModel" in errors and not out.exists()
    code, _, errors = generate(capsys, model, out, "--cache", "mag", "--no-agent")
    assert code == 0, errors  # diffusers ships MagCache's ratios for Flux


def test_compare_scores_the_cache_and_the_stack_with_their_skip_fractions(model, tmp_path, capsys):
    out = tmp_path / "cmp"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    args = ["compare", "--model", model, "--prompts-file", prompts, "--steps", str(STEPS), *SIZE, "--no-memory"]
    code, printed, errors = cli(capsys, *args, "--cache", "taylorseer:2", "--out", out)
    assert code == 0, errors
    rows = {row["method"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert list(rows) == ["baseline", "flux", "cache", "cache+flux"]  # the default methods under --cache
    assert rows["cache"]["cache"] == rows["cache+flux"]["cache"] == "taylorseer:2"
    assert rows["baseline"]["skip_fraction"] is None and rows["flux"]["skip_fraction"] is None
    for name in ("cache", "cache+flux"):
        sidecars = [json.loads(p.read_text()) for p in sorted((out / "images" / name.replace("+", "_")).glob("*.json"))]
        assert len(sidecars) == 2
        skipped = sum(s["cache_calls"]["skipped"] for s in sidecars)
        assert 0 < skipped < 2 * STEPS and rows[name]["skip_fraction"] == round(skipped / (2 * STEPS), 4)
    assert rows["cache+flux"]["agentsd_config"] == rows["flux"]["agentsd_config"]
    assert "| skipped |" in printed.replace("skipped | PSNR", "skipped |")

    code, _, errors = cli(capsys, *args, "--method", "cache", "--out", tmp_path / "x")
    assert code == 2 and "method 'cache' runs under a step cache: name it with --cache" in errors
    code, _, errors = cli(capsys, *args, "--cache", "first-block", "--method", "flux", "--out", tmp_path / "x")
    assert code == 2 and "add --method cache" in errors
    code, _, errors = cli(capsys, *args, "--cache", "first-block", "--method", "cache+baseline", "--out", tmp_path)
    assert code == 2 and "the baseline under the cache is the method 'cache'" in errors


def test_generate_on_wan_under_a_cache(tmp_path, capsys):
    """Wan runs guidance as separate model calls: two per step, each counted."""
    folder = tmp_path / "tiny-wan"
    tiny_wan.tiny_wan_pipeline().save_pretrained(folder)
    out = tmp_path / "out"
    code, printed, errors = run_main(
        capsys, "generate", "--model", folder, "--prompt", "a cat", "--steps", "4", "--frames", "17", *SIZE,
        "--cache", "first-block:0.5", "--out", out, "--st", "2", "--min-tokens", "0",
    )  # fmt: skip
    assert code == 0, errors
    record = json.loads((out / "p0000_s0.json").read_text())
    calls = record["cache_calls"]
    assert record["cache"] == "first-block:0.5" and calls["computed"] + calls["skipped"] == 8 and calls["skipped"] > 0
    assert f"calls: {calls['computed']} computed, {calls['skipped']} skipped" in printed
