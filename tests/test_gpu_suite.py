"""The GPU suite end to end in --tiny mode on the CPU (what a GPU run writes, minus the
numbers' meaning), its report into copies of the docs, and its pure helpers. No timing is
asserted."""

import csv
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from agentsd.results import RUN_FIELDS
from agentsd.suite import PART_NAMES, breakeven, gpu_tests, report, runner

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "gpu_suite.py"
PLOTS = {"sd15": "speedup.png", "sd15-compile": "speedup.png", "sd15-compile-ceiling": "speedup.png",
         "sdxl": "speedup.png", "pipeline": "pipeline.png", "breakeven": "breakeven.png"}  # fmt: skip
# Numeric fields every row of a part carries.
NUMBERS = {
    "tests": ("duration_s",),
    "sd15": ("median_ms", "speedup"),
    "sd15-compile": ("median_ms", "speedup"),
    "sd15-compile-ceiling": ("median_ms", "speedup"),
    "sdxl": ("median_ms", "speedup"),
    "pipeline": ("seconds_per_image", "speedup", "gb_per_image", "ratio"),
    "breakeven": ("baseline_us", "agentsd_us", "speedup", "tokens"),
}


@pytest.fixture(scope="module")
def suite_out(tmp_path_factory):
    """The script itself, as CI and a GPU machine run it; the other tests call its functions."""
    out = tmp_path_factory.mktemp("gpu-suite")
    command = [sys.executable, str(SCRIPT), "--part", "all", "--tiny", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_every_part_writes_its_files_and_fields(suite_out):
    assert runner.PARTS.keys() == set(PART_NAMES)
    for part in PART_NAMES:
        folder = suite_out / part
        data = json.loads((folder / "results.json").read_text())
        rows = data["rows"]
        assert rows and data["date"] and "--tiny" in data["command"], part
        for row in rows:
            assert all(row[field] for field in RUN_FIELDS), (part, row)
            assert all(isinstance(row[field], (int, float)) for field in NUMBERS[part]), (part, row)
        with (folder / "results.csv").open() as f:
            table = list(csv.DictReader(f))
        assert len(table) == len(rows) and set(RUN_FIELDS) <= set(table[0]), part
        markdown = (folder / "results.md").read_text()
        assert rows[0]["device"] in markdown and rows[0]["commit"] in markdown, part
        if part in PLOTS:
            assert (folder / PLOTS[part]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", part


def test_parts_hold_their_methods_and_the_recommendation(suite_out):
    def methods(part):
        return {r["method"] for r in json.loads((suite_out / part / "results.json").read_text())["rows"]}

    assert {"baseline", "agentsd-agent", "agentsd-tome", "agentsd-schedule", "highres", "ceiling", "ceiling-2"} <= (
        methods("sd15")
    )
    assert {"baseline+compile", "agentsd-agent+compile"} <= methods("sd15-compile")
    assert "ceiling+compile" not in methods("sd15-compile")
    assert {"baseline+compile", "ceiling+compile"} == {m for m in methods("sd15-compile-ceiling") if "+" in m}
    assert {"baseline", "paper:ratio=0.1", "paper:ratio=0.4", "paper:ratio=0.5"} <= methods("pipeline")
    data = json.loads((suite_out / "breakeven" / "results.json").read_text())
    assert {"min_grid", "min_tokens", "rule"} <= set(data["recommendation"])
    assert {r["phase"] for r in data["rows"]} == {"agent", "tome"}


def test_tests_part_runs_the_gpu_tests_and_not_itself(suite_out):
    data = json.loads((suite_out / "tests" / "results.json").read_text())
    files = {row["test"].split("::")[0] for row in data["rows"]}
    assert {"tests/test_gpu.py", "tests/test_compat.py"} <= files
    assert "tests/test_gpu_suite.py" not in files
    outcomes = {row["outcome"] for row in data["rows"]}
    if not torch.cuda.is_available():
        assert outcomes == {"skipped"} and all(row["reason"] == "needs CUDA" for row in data["rows"])


def test_report_writes_between_the_markers(suite_out, tmp_path):
    docs, readme = tmp_path / "benchmarks.md", tmp_path / "README.md"
    shutil.copy(ROOT / "docs" / "benchmarks.md", docs)
    shutil.copy(ROOT / "README.md", readme)
    before = {path: path.read_text() for path in (docs, readme)}
    assert runner.main(["--report", str(suite_out), "--docs", str(docs), "--readme", str(readme)]) == 0
    for path, markers in ((docs, report.DOCS_MARKERS), (readme, report.README_MARKERS)):
        old, new = before[path], path.read_text()
        start, end = markers
        assert old.split(start)[0] == new.split(start)[0] and old.split(end)[1] == new.split(end)[1]
        assert new != old
    section = docs.read_text().split(report.DOCS_MARKERS[0])[1].split(report.DOCS_MARKERS[1])[0]
    for title in ("### Targets", "### SD 1.5, one denoising step", "### A whole generation, DDIM",
                  "Recommended `min_tokens`", "### GPU tests", "tests/test_gpu.py::"):  # fmt: skip
        assert title in section
    assert f"]({os.path.relpath(suite_out / 'sd15' / 'results.md', tmp_path)})" in section  # relative links
    table = readme.read_text().split(report.README_MARKERS[0])[1]
    assert "baseline step ms" in table and "A whole 3-step generation at 64 px" in table  # --tiny's pipeline
    report.write_report([suite_out], docs, readme)  # again: the sections are replaced, not added
    assert docs.read_text().count(report.DOCS_MARKERS[0]) == 1 and docs.read_text().count("### Targets") == 1


def test_report_refuses_missing_markers_and_empty_folders(suite_out, tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("no markers here\n")
    assert runner.main(["--report", str(suite_out), "--docs", str(page), "--readme", str(page)]) == 2
    assert "<!-- gpu-suite:start -->" in capsys.readouterr().err
    assert page.read_text() == "no markers here\n"
    assert runner.main(["--report", str(tmp_path / "empty")]) == 2


def test_full_parts_refuse_to_run_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the full parts would run")
    assert runner.main(["--part", "sd15", "--out", str(tmp_path / "out")]) == 2
    assert "--tiny" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _rows(speedups):
    """Breakeven rows from {grid: [speedup of each phase and batch]}."""
    return [dict(grid=g, speedup=s) for g, values in speedups.items() for s in values]


def test_recommended_min_tokens_is_where_agentsd_wins_from_then_on():
    # Faster from 16 on, except a loss at 12 after a win at 10: the floor is 16x16 = 256 tokens.
    rows = _rows({8: [0.8, 0.9], 10: [1.1, 1.2], 12: [1.3, 0.99], 16: [1.2, 1.01], 32: [2.0, 1.5]})
    assert breakeven.recommend_min_tokens(rows)["min_tokens"] == 256
    assert breakeven.recommend_min_tokens(_rows({8: [1.1], 16: [1.2]}))["min_grid"] == 8
    assert breakeven.recommend_min_tokens(_rows({8: [1.1], 16: [0.9]}))["min_tokens"] is None


def test_junit_rows_read_outcomes_reasons_and_durations(tmp_path):
    suite = ET.Element("testsuite")
    cases = [
        ("tests.test_gpu", "test_a[sd2]", "skipped", "needs CUDA"),
        ("tests.test_gpu", "test_b", "failure", "assert 3 <= 1\n  where 3 = count()"),
        ("tests.test_x.TestY", "test_c", None, None),
    ]
    for classname, name, tag, message in cases:
        case = ET.SubElement(suite, "testcase", classname=classname, name=name, time="1.25")
        if tag:
            ET.SubElement(case, tag, message=message)
    path = tmp_path / "junit.xml"
    ET.ElementTree(suite).write(path)
    assert gpu_tests.junit_rows(path) == [
        dict(test="tests/test_gpu.py::test_a[sd2]", outcome="skipped", reason="needs CUDA", duration_s=1.25),
        dict(
            test="tests/test_gpu.py::test_b",
            outcome="failed",
            reason="assert 3 <= 1 where 3 = count()",
            duration_s=1.25,
        ),  # one line: the message's newlines would break a Markdown table
        dict(test="tests/test_x.py::TestY::test_c", outcome="passed", reason="", duration_s=1.25),
    ]


def test_estimate_counts_what_the_ceiling_removes():
    """The time estimates rest on FLOP counts on the meta device: the baseline's count minus
    the ceiling's is the self-attention of the patched layers, by the formula. Tiny UNet at
    128 px: a 16x16 latent (N = 256 tokens), 3 top-level layers of C = 16 channels, CFG batch
    B = 2; per layer 4 projections of 2 B N C^2 FLOPs and 2 attention products of 2 B N^2 C."""
    from agentsd.benchmark import build_unet
    from agentsd.presets import load_preset
    from agentsd.suite import estimate

    unet, config = build_unet("tiny", "meta", torch.float16), load_preset("paper")
    removed = estimate.unet_call_flops(unet, 128, 1, "baseline", config) - estimate.unet_call_flops(
        unet, 128, 1, "ceiling", config
    )
    batch, tokens, channels = 2, 256, 16
    assert removed == 3 * (4 * 2 * batch * tokens * channels**2 + 2 * 2 * batch * tokens**2 * channels)
