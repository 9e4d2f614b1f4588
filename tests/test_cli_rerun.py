"""`agentsd generate` run again into the same folder: images made with other settings stop it (as in
`compare`), and an interrupted `--compare` run gets every pair when it resumes."""

import json

import pytest
from cli_run import run_main
from PIL import Image

from agentsd.testing import tiny_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "sd15"
    tiny_pipeline("sd15").save_pretrained(folder)
    return folder


def files(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "change, difference",
    [
        (["--steps", "3"], "steps 2 (now 3)"),
        (["--batch-size", "2"], "batch_size 1 (now 2)"),
        (["--ratio", "0.5"], "agentsd_config.ratio 0.4 (now 0.5)"),
        (["--no-agent"], "method 'agentsd' (now 'baseline')"),
    ],
)
def test_a_rerun_with_other_settings_is_refused_naming_them(model, tmp_path, capsys, change, difference):
    """Rerun into the same --out, it used to skip the images made with the other settings; it now
    stops before any work, naming the setting, and --overwrite makes the images again."""
    argv = ["generate", "--model", model, "--prompt", "x", "--steps", "2", "--out", tmp_path]
    assert run_main(capsys, *argv)[0] == 0
    before = files(tmp_path)
    code, _, errors = run_main(capsys, *argv, *change)
    assert code == 2 and len(errors) == 1, errors
    assert "1 image in" in errors[0] and "was made with other settings" in errors[0] and difference in errors[0]
    assert "--overwrite" in errors[0] and "another --out" in errors[0]
    assert files(tmp_path) == before
    code, printed, errors = run_main(capsys, *argv, *change, "--overwrite")
    assert code == 0 and "1 written, 0 skipped" in printed, errors
    record = json.loads((tmp_path / "p0000_s0.json").read_text())
    assert not run_main(capsys, *argv, *change)[2]  # made with these settings now: reused
    assert record == json.loads((tmp_path / "p0000_s0.json").read_text())


def test_a_rerun_with_the_same_settings_skips_what_is_made(model, tmp_path, capsys):
    argv = ["generate", "--model", model, "--prompt", "x", "--steps", "2", "--out", tmp_path]
    assert run_main(capsys, *argv)[0] == 0
    before = files(tmp_path)
    code, printed, _ = run_main(capsys, *argv, "--num-images", "2")
    assert code == 0 and "1 written, 1 skipped" in printed
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())


def test_an_interrupted_compare_run_gets_every_pair_and_a_speedup_over_the_same_images(model, tmp_path, capsys):
    """Three images, one at a time. As a run interrupted in two places leaves it: p0000_s1 has its
    baseline image but not its agentsd image (nor its pair), p0000_s2 has neither. The rerun makes
    both pairs, the one of p0000_s1 from a baseline image made before; the speed-up is read off
    p0000_s2 alone, the one image both methods made in this run."""
    argv = ["generate", "--model", model, "--prompt", "x", "--num-images", "3", "--steps", "2", "--compare",
            "--out", tmp_path]  # fmt: skip
    assert run_main(capsys, *argv)[0] == 0
    for path in ("p0000_s1", "compare/p0000_s1", "p0000_s2", "baseline/p0000_s2", "compare/p0000_s2"):
        (tmp_path / f"{path}.png").unlink()
        (tmp_path / f"{path}.json").unlink(missing_ok=True)  # pairs have no sidecar
    code, printed, errors = run_main(capsys, *argv)
    assert code == 0, errors
    assert "baseline: 1 written, 2 skipped" in printed and "agentsd: 2 written, 1 skipped" in printed
    assert "(baseline / agentsd, over the 1 image both made)" in printed
    for name in ("p0000_s0", "p0000_s1", "p0000_s2"):
        pair = Image.open(tmp_path / "compare" / f"{name}.png")
        assert pair.size == (128, 64)
        for folder, box in ((tmp_path / "baseline", (0, 0, 64, 64)), (tmp_path, (64, 0, 128, 64))):
            assert pair.crop(box).tobytes() == Image.open(folder / f"{name}.png").convert("RGB").tobytes()


def test_a_missing_pair_of_two_finished_images_is_made(model, tmp_path, capsys):
    """Interrupted between an image and its pair: the rerun has no image to make, and makes the pair."""
    argv = ["generate", "--model", model, "--prompt", "x", "--steps", "2", "--compare", "--out", tmp_path]
    assert run_main(capsys, *argv)[0] == 0
    (tmp_path / "compare" / "p0000_s0.png").unlink()
    code, printed, _ = run_main(capsys, *argv)
    assert code == 0 and "speedup" not in printed  # nothing timed in this run
    assert Image.open(tmp_path / "compare" / "p0000_s0.png").size == (128, 64)


def test_the_speedup_compares_the_images_both_runs_timed():
    from agentsd.cli.generation import ImageJob, MethodRun, speedup

    a, b, c = (ImageJob(0, "x", seed) for seed in range(3))
    baseline = MethodRun("baseline", None, None, seconds={a: 2.0, b: 4.0})
    agentsd = MethodRun("agentsd", None, None, seconds={b: 1.0, c: 100.0})
    assert speedup(baseline, agentsd) == (4.0, 1)
    assert speedup(baseline, MethodRun("agentsd", None, None, seconds={c: 1.0})) is None
