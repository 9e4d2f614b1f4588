"""The comparison flow on a tiny pipeline, with a tiny feature extractor standing in for Inception."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from agentsd.cli import compare, comparison, metrics
from agentsd.cli.generation import GenerationSettings
from agentsd.testing import tiny_pipeline


class TinyFeatures(torch.nn.Module):
    """uint8 images -> 12 features: mean colour of each image quadrant."""

    num_features = 12

    def forward(self, images):
        x = images.float() / 255
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def scipy_fid(features_a, features_b):
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def features_of(folder):
    paths = metrics.image_paths(folder)
    with torch.no_grad():
        return TinyFeatures()(torch.stack([metrics.load_uint8(p) for p in paths])).double().numpy()


def write_images(folder, count, seed, shift=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 200, (32, 32, 3)) + shift
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_imagenet_protocol_prompts():
    classes = compare.imagenet_classes()
    assert len(classes) == 1000 and len(set(classes)) == 1000
    prompts = compare.imagenet_prompts()
    assert len(prompts) == 2000 and len(set(prompts)) == 1000
    assert prompts[0] == prompts[1] == "A high quality photograph of a tench."


def test_fid_matches_a_direct_scipy_computation(tmp_path):
    reference = write_images(tmp_path / "ref", 40, seed=0)
    shifted = write_images(tmp_path / "shifted", 40, seed=1, shift=40)
    metric = metrics.fid_metric(TinyFeatures())
    metrics.load_reference(metric, reference)
    assert metrics.fid_score(metric, metrics.image_paths(reference)) == pytest.approx(0.0, abs=1e-6)
    fid = metrics.fid_score(metric, metrics.image_paths(shifted))
    assert fid > 0.01
    assert fid == pytest.approx(scipy_fid(features_of(reference), features_of(shifted)), rel=1e-5)

    # The same reference as pytorch-fid-style statistics.
    feats = features_of(reference)
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    from_stats = metrics.fid_metric(TinyFeatures())
    metrics.load_reference(from_stats, tmp_path / "ref.npz")
    assert metrics.fid_score(from_stats, metrics.image_paths(shifted)) == pytest.approx(fid, rel=1e-6)


def test_parse_method():
    assert comparison.parse_method("baseline").config is None
    paper = comparison.parse_method("paper:ratio=0.5,use_rand=false")
    assert paper.config.ratio == 0.5 and paper.config.use_rand is False and paper.ratio == 0.5
    assert comparison.parse_method("agentsd:agent_ratio=0.9").config.agent_ratio == 0.9
    # The opt-in selection shortcuts, as their quality is measured.
    shortcut = comparison.parse_method("paper:share_matching=true,agent_selection=pool,ratio=0").config
    assert (shortcut.share_matching, shortcut.agent_selection, shortcut.ratio) == (True, "pool", 0)
    with pytest.raises(ValueError, match="ratio"):
        comparison.parse_method("paper:ratio=3")
    with pytest.raises(compare.GenerationError, match="no field"):
        comparison.parse_method("paper:raito=0.3")
    with pytest.raises(ValueError, match="unknown preset"):
        comparison.parse_method("fastest")
    with pytest.raises(compare.GenerationError, match=r"in \[0, 1\)"):
        comparison.parse_method("tomesd:1.5")


@pytest.mark.parametrize("word", ["None", "none", "null", "AUTO", "auto"])
def test_automatic_is_spelled_alike_in_method_specs_and_flags(word):
    """`paper:attn_precision=None` means what `generate --attn-precision auto` means, and so do
    `none`, `null` and `auto` in any case, for both optional fields, in a spec and as a flag."""
    from agentsd.cli.commands import agent_config, build_parser

    for field in ("attn_precision", "attention_backend"):
        base = "sd21" if field == "attn_precision" else "paper"  # sd21 sets fp32: the override must clear it
        assert getattr(comparison.parse_method(f"{base}:{field}={word}").config, field) is None
        flag = "--" + field.replace("_", "-")
        args = build_parser().parse_args(["generate", "--prompt", "p", "--preset", base, flag, word])
        assert getattr(agent_config(args), field) is None
    args = build_parser().parse_args(
        ["generate", "--prompt", "p", "--attn-precision", "FP32", "--agent-selection", "Pool"]
    )
    assert (agent_config(args).attn_precision, agent_config(args).agent_selection) == ("fp32", "pool")


def test_missing_inception_weights_fail_at_once_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(compare.MetricsError, match=metrics.INCEPTION_FILE) as err:
        metrics.inception_weights_path(None)
    assert metrics.INCEPTION_URL in str(err.value) and "--inception-weights" in str(err.value)
    with pytest.raises(compare.MetricsError, match="not found"):
        metrics.inception_weights_path(tmp_path / "absent.pth")


def test_whole_flow_scores_from_disk_and_resumes(tmp_path):
    pipe = tiny_pipeline("sd15")
    pipe.set_progress_bar_config(disable=True)
    reference = write_images(tmp_path / "ref", 12, seed=3)
    prompts = [f"a photo of thing {i}" for i in range(6)]
    methods = [comparison.parse_method(s) for s in ("baseline", "paper", "paper:ratio=0.2,agent_steps=1.0")]
    settings = GenerationSettings(model="tiny", steps=2, batch_size=4)
    scoring = comparison.ComparisonSettings(reference=reference, feature_extractor=TinyFeatures(), samples=3)
    out = tmp_path / "out"
    results = compare.run_comparison(pipe, prompts, methods, out, settings, scoring, seed=10, progress=False)

    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["baseline", "paper", "paper:ratio=0.2,agent_steps=1.0"]
    for name, row in rows.items():
        folder = out / "images" / comparison.MethodSpec(name).folder_name
        assert sorted(p.name for p in folder.glob("*.png")) == [f"p{i:04d}_s{10 + i}.png" for i in range(6)]
        assert row["fid"] == pytest.approx(scipy_fid(features_of(reference), features_of(folder)), rel=1e-5)
        assert row["seconds_per_image"] > 0 and row["speedup"] > 0 and row["gb_per_image"] is not None
        if name != "baseline":
            assert np.isfinite(row["psnr"]) and 0 < row["ssim"] <= 1
    assert "psnr" not in rows["baseline"] and rows["paper"]["ratio"] == 0.4
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    table = (out / "results.md").read_text()
    assert "| method | r | FID | s/image |" in table
    assert Image.open(out / "samples.png").size == (3 * 256, 3 * 256)
    assert (out / "fid_vs_time.png").read_bytes()[:4] == b"\x89PNG"

    # Resume: delete two images, rerun: exactly those come back, the rest stay untouched.
    folder = out / "images" / "paper"
    removed = [folder / "p0001_s11.png", folder / "p0004_s14.png"]
    for path in removed:
        path.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    again = compare.run_comparison(pipe, prompts, methods, out, settings, scoring, seed=10, progress=False)
    assert all(p.exists() for p in removed)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert again["rows"][0]["fid"] == results["rows"][0]["fid"]


def test_accelerate_shards_the_jobs_exactly_once(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(
        textwrap.dedent(f"""
        import json
        from accelerate import PartialState
        from agentsd.cli.compare import shard_jobs
        from agentsd.cli.generation import ImageJob
        jobs = [ImageJob(i, "p", i) for i in range(11)]
        mine = shard_jobs(jobs)
        rank = PartialState().process_index
        open(r"{tmp_path}/rank%d.json" % rank, "w").write(json.dumps([j.prompt_index for j in mine]))
    """)
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", str(script)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    shards = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert shards[0] and shards[1]
    assert sorted(shards[0] + shards[1]) == list(range(11))


def test_cli_compare_end_to_end(tmp_path):
    tiny_pipeline("sd15").save_pretrained(tmp_path / "model")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "agentsd", "compare", "--model", str(tmp_path / "model"), "--num-prompts", "3",
            "--steps", "2", "--out", str(tmp_path / "out")]  # fmt: skip
    methods = ["--method", "baseline", "--method", "paper", "--method", "tomesd:0.4"]
    result = subprocess.run(base + methods, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    assert set(rows) == {"baseline", "paper", "tomesd:0.4"}
    # 3 prompts, 2 steps each: both past progress 0.4, so the ToMe phase only, and said so.
    summary = "paper: agentsd: 6 UNet calls since patching (0 agent phase, 6 ToMe phase); token merging on 6 calls"
    assert summary in result.stdout
    assert "no layer ran agent attention in the paper run" in result.stderr
    assert rows["tomesd:0.4"]["ratio"] == 0.4 and np.isfinite(rows["tomesd:0.4"]["psnr"])
    prompts = [json.loads(p.read_text())["prompt"] for p in sorted((tmp_path / "out/images/paper").glob("*.json"))]
    assert prompts == [
        "A high quality photograph of a tench.",
        "A high quality photograph of a tench.",
        "A high quality photograph of a goldfish.",
    ]
    # FID with the Inception network: where it cannot run, the error comes before any generation.
    ref = write_images(tmp_path / "ref", 4, seed=0)
    failing = subprocess.run(
        base[:-1] + [str(tmp_path / "out2"), "--reference", str(ref), "--inception-weights", str(tmp_path / "no.pth")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert failing.returncode == 2 and "agentsd: error:" in failing.stderr
    assert not (tmp_path / "out2").exists()


# ---------------------------------------------------------------- what is checked before generating


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "sd15"
    tiny_pipeline("sd15").save_pretrained(folder)
    return folder


def run_compare(capsys, tiny_model, out, *extra):
    """`agentsd compare` in this process: (exit code, stdout, the `agentsd: error:` lines)."""
    from agentsd.cli.commands import main

    argv = ["compare", "--model", tiny_model, "--num-prompts", "2", "--steps", "1", "--out", out, *extra]
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("agentsd: error:")]


def uninstalled(monkeypatch, *packages):
    for name in packages:
        monkeypatch.setitem(sys.modules, name, None)  # import fails, find_spec says None


@pytest.mark.parametrize(
    "missing, extra, message",
    [
        (["torchmetrics"], [], "pip install 'agentsd[metrics]'"),
        (["torchvision"], ["--lpips"], "LPIPS needs torchvision"),
        (["torch_fidelity"], ["--reference", "{ref}"], "torch-fidelity"),
        (["psutil"], [], "--no-memory"),
    ],
    ids=["torchmetrics", "lpips-torchvision", "fid-torch-fidelity", "memory-psutil"],
)
def test_a_missing_package_fails_before_anything_is_generated(
    tiny_model, tmp_path, capsys, monkeypatch, missing, extra, message
):
    ref = write_images(tmp_path / "ref", 2, seed=0)
    uninstalled(monkeypatch, *missing)
    out = tmp_path / "out"
    code, _, errors = run_compare(capsys, tiny_model, out, *[e.format(ref=ref) for e in extra])
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_missing_lpips_weights_fail_before_anything_is_generated(tiny_model, tmp_path, capsys, monkeypatch):
    import importlib.machinery

    monkeypatch.setitem(sys.modules, "torchvision", None)
    real = metrics.importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("torchvision", None)
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda n, *a: spec if n == "torchvision" else real(n, *a))
    monkeypatch.setattr(metrics, "_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    out = tmp_path / "out"
    code, _, errors = run_compare(capsys, tiny_model, out, "--lpips")
    assert code == 2 and "alexnet-owt-7be5be79.pth" in errors[0], errors
    assert not out.exists()


def test_an_unreachable_clip_model_fails_before_anything_is_generated(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics, "_reachable", lambda host, timeout=3.0: False)
    out = tmp_path / "out"
    code, _, errors = run_compare(capsys, tiny_model, out, "--clip-model", "openai/clip-vit-base-patch32")
    assert code == 2 and "--clip-model" in errors[0], errors
    assert not out.exists()


def test_without_matplotlib_the_table_and_json_are_still_written(tiny_model, tmp_path, capsys, monkeypatch, caplog):
    uninstalled(monkeypatch, "matplotlib", "matplotlib.pyplot")
    out = tmp_path / "out"
    code, stdout, errors = run_compare(capsys, tiny_model, out, "--no-memory")
    assert code == 0 and not errors
    assert "| method |" in stdout and "fid_vs_time.png" not in stdout.splitlines()[-1]
    assert (out / "results.json").exists() and (out / "results.md").exists() and (out / "samples.png").exists()
    assert not (out / "fid_vs_time.png").exists()
    assert any("pip install matplotlib" in r.getMessage() for r in caplog.records)


def test_run_comparison_checks_before_creating_the_folder(tmp_path, monkeypatch):
    uninstalled(monkeypatch, "torchvision")
    pipe = tiny_pipeline("sd15")
    methods = [comparison.parse_method("paper")]
    settings = GenerationSettings(model="tiny", steps=1)
    scoring = comparison.ComparisonSettings(lpips=True, measure_memory=False)
    with pytest.raises(compare.MetricsError, match="torchvision"):
        compare.run_comparison(pipe, ["x"], methods, tmp_path / "out", settings, scoring, progress=False)
    assert not (tmp_path / "out").exists()


def test_image_seed_and_config_seed_stay_apart(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, errors = run_compare(capsys, tiny_model, out, "--seed", "5", "--method", "paper:seed=3", "--no-memory")
    assert code == 0, errors
    assert sorted(p.name for p in (out / "images" / "paper_seed=3").glob("*.png")) == ["p0000_s5.png", "p0001_s6.png"]
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["paper:seed=3"]["agentsd_config"]["seed"] == 3


def test_duplicate_methods_are_refused_before_anything_is_created(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, errors = run_compare(capsys, tiny_model, out, "--method", "paper", "--method", "paper")
    assert code == 2 and "methods must be distinct" in errors[0], errors
    assert not out.exists()


def test_methods_sharing_an_image_folder_are_refused_before_anything_is_created(tiny_model, tmp_path, capsys):
    """`x/a.yaml` and `x_a.yaml` sanitize to one folder: they would write into it and get the same
    scores. So would names differing only in case, on a case-insensitive file system."""
    (tmp_path / "x").mkdir()
    for path in (tmp_path / "x" / "a.yaml", tmp_path / "x_a.yaml", tmp_path / "Mine.yaml", tmp_path / "mine.yaml"):
        path.write_text("config:\n  ratio: 0.3\n")
    for first, second in (("x/a.yaml", "x_a.yaml"), ("Mine.yaml", "mine.yaml")):
        specs = [str(tmp_path / first), str(tmp_path / second)]
        with pytest.raises(compare.GenerationError, match="would share the image folder") as err:
            comparison.with_baseline([comparison.parse_method(s) for s in specs])
        assert all(repr(s) in str(err.value) for s in specs)
    out = tmp_path / "out"
    methods = ["--method", tmp_path / "x" / "a.yaml", "--method", tmp_path / "x_a.yaml"]
    code, _, errors = run_compare(capsys, tiny_model, out, *methods)
    assert code == 2 and "would share the image folder" in errors[0], errors
    assert not out.exists()


def test_the_metrics_extra_installs_every_package_compare_checks_for(tmp_path, monkeypatch):
    """`pip install 'agentsd[metrics]'` is the fix the errors name: it must bring every package
    the up-front check asks for with every output chosen (torchvision comes with torch-fidelity,
    which requires it)."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    asked = set()

    def installed(name):
        asked.add(name)
        return True

    for module in (compare, metrics):
        monkeypatch.setattr(module, "_installed", installed)
    monkeypatch.setattr(metrics, "_reachable", lambda host, timeout=3.0: True)
    scoring = comparison.ComparisonSettings(reference=tmp_path, clip_model=tmp_path, lpips=True, measure_memory=True)
    assert compare.check_scoring([comparison.parse_method("paper")], scoring, "cpu") == []
    compare.report_files()
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["metrics"]
    provided = {re.split(r"[<>=!~\[; ]", requirement)[0].replace("-", "_") for requirement in extra}
    assert {"torch_fidelity", "torchvision", "psutil", "matplotlib"} <= asked
    assert asked <= provided | {"torchvision"}
