"""`agentsd generate` run again into the same folder: images made with other settings stop it (as in
`compare`)."""

import json

import pytest
from cli_run import run_main

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
