"""The GPU suite end to end in --tiny mode on the CPU, as a GPU machine runs it: the one command
(`scripts/gpu_run.sh`, installing from a wheel folder built here, offline), what it leaves in
OUT against what may come back from that machine, a budget too small for the later scenarios,
a SIGTERM in the middle, and the report from the archive into copies of the docs; then the
suite's pure helpers. No timing is asserted."""

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import agentsd
from agentsd.bench.results import RUN_FIELDS
from agentsd.suite import DEFAULT_ORDER, PART_NAMES, SCENARIOS, breakeven, estimate, gpu_tests, pack, report, runner
from agentsd.suite import multi_gpu as multi_gpu_scenario
from agentsd.suite import step as step_scenarios
from agentsd.suite.budget import Budget
from agentsd.suite.common import Outcome, PartContext
from agentsd.suite.scenarios import Scenario

# Slow (the GPU suite rehearsed on the CPU, scenario by scenario): `python -m pytest -m slow` runs it (README, Set-up).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
WRAPPER = ROOT / "scripts" / "gpu_run.sh"
PLOTS = {"sd15": "speedup.png", "sdxl": "speedup.png", "sd35": "speedup.png", "flux": "speedup.png",
         "wan": "speedup.png", "sd15-highres": "speedup.png",
         "sd15-compile": "speedup.png", "sd15-compile-ceiling": "speedup.png", "pipeline": "pipeline.png",
         "breakeven": "breakeven.png"}  # fmt: skip
# Numeric fields every row of a part carries.
NUMBERS = {
    "tests": ("duration_s",),
    "tests-compile": ("duration_s",),
    "pipeline": ("seconds_per_image", "speedup", "gb_per_image", "ratio"),
    "breakeven": ("baseline_us", "agentsd_us", "speedup", "tokens"),
}
# The parts the default order writes on a machine with fewer than two GPUs (this CPU): the
# context-parallel scenario is skipped there.
DEFAULT_PARTS = {SCENARIOS[name].part for name in DEFAULT_ORDER if name != "context-parallel"}


def unpacked(out: Path, dest: Path) -> Path:
    pack.unpack(out / pack.ARCHIVE, dest)
    return dest


def check_out_within_limits(out: Path) -> None:
    """At most 8 plain files, no folder, names of letters, digits, '.', '_' and '-' only."""
    entries = list(out.iterdir())
    assert len(entries) <= 8 and all(p.is_file() and not p.is_symlink() for p in entries), entries
    assert all(pack.NAME.fullmatch(p.name) for p in entries), entries
    assert pack.out_problems(out) == []


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """agentsd's own wheel, built offline from the checkout (setuptools of this environment)."""
    folder = tmp_path_factory.mktemp("wheels")
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
               "--wheel-dir", str(folder), str(ROOT)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        pytest.fail("building agentsd's wheel offline failed (it needs setuptools>=77 here, as the dev extra "
                    f"installs):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def suite_run(wheels, tmp_path_factory):
    """The one command of a GPU machine, on the CPU: OUT and the staging folder."""
    out, stage = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("stage")
    env = dict(os.environ, AGENTSD_WHEELS=str(wheels), AGENTSD_BUDGET="900", PYTHON=sys.executable)
    env.pop("PYTHONPATH", None)  # the suite runs the checkout's agentsd without it
    done = subprocess.run(["bash", str(WRAPPER), str(out), "--tiny", "--stage", str(stage)], capture_output=True,
                          text=True, cwd=ROOT, env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, stage


def test_out_holds_a_few_plain_files_and_the_archive_every_part(suite_run, tmp_path):
    out, stage = suite_run
    check_out_within_limits(out)
    assert {p.name for p in out.iterdir()} == {pack.ARCHIVE, pack.SUMMARY, pack.LOG, pack.INSTALL_LOG}
    assert f"agentsd-{agentsd.__version__}-py3-none-any.whl" in (out / pack.INSTALL_LOG).read_text()  # the wheel
    folder = unpacked(out, tmp_path)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == sorted(p.relative_to(stage) for p in
                                                                                stage.rglob("*"))  # fmt: skip
    suite = json.loads((folder / "suite.json").read_text())
    assert [s["name"] for s in suite["scenarios"]] == list(DEFAULT_ORDER)
    status = {s["name"]: s for s in suite["scenarios"]}
    parallel = status.pop("context-parallel")
    assert {s["status"] for s in status.values()} == {"done"} and suite["state"] == "finished"
    if multi_gpu_scenario.gpus() < 2:
        assert parallel["status"] == "skipped" and parallel["reason"].endswith("context parallelism needs 2 or more")
    summary = (out / pack.SUMMARY).read_text()
    assert "## Headline" in summary and all(f"| {name} |" in summary for name in DEFAULT_ORDER)
    assert "sd15-2048: done" in (out / pack.LOG).read_text()
    assert "attention on the dispatcher's native backend" in summary  # the Wan scenario's baseline and agentsd


def test_every_part_writes_its_files_and_fields(suite_run, tmp_path):
    folder = unpacked(suite_run[0], tmp_path)
    assert DEFAULT_PARTS <= set(PART_NAMES) and {s.part for s in SCENARIOS.values()} == set(PART_NAMES)
    for part in DEFAULT_PARTS:
        data = json.loads((folder / part / "results.json").read_text())
        rows = data["rows"]
        assert rows and data["date"] and "--tiny" in data["command"], part
        for row in rows:
            assert all(row[field] for field in RUN_FIELDS), (part, row)
            numbers = NUMBERS.get(part, ("median_ms", "speedup"))
            assert all(isinstance(row[field], (int, float)) for field in numbers), (part, row)
        with (folder / part / "results.csv").open() as f:
            table = list(csv.DictReader(f))
        assert len(table) == len(rows) and set(RUN_FIELDS) <= set(table[0]), part
        markdown = (folder / part / "results.md").read_text()
        assert rows[0]["device"] in markdown and rows[0]["commit"] in markdown, part
        if part in PLOTS:
            assert (folder / part / PLOTS[part]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", part


def test_parts_hold_their_scenarios_methods_and_the_recommendation(suite_run, tmp_path):
    folder = unpacked(suite_run[0], tmp_path)

    def rows(part):
        return json.loads((folder / part / "results.json").read_text())["rows"]

    sd15 = rows("sd15")
    assert len({r["size"] for r in sd15}) == 3  # 512, 1024 and 2048 px, in one part
    assert {"baseline", "agentsd-agent", "agentsd-tome", "agentsd-schedule", "ceiling"} <= {r["method"] for r in sd15}
    assert {"baseline", "highres", "ceiling-2"} == {r["method"] for r in rows("sd15-highres")}
    # The SD 3.5 scenarios on the tiny SD 3.5 transformer, at grids where the `sd3` preset acts.
    sd35 = rows("sd35")
    scenarios = {(r["arch"], r["size"], r["preset"], r["blocks"]) for r in sd35}
    assert scenarios == {("tiny-sd35", 256, "sd3", None), ("tiny-sd35", 512, "sd3", None)}
    assert {r["method"] for r in sd35} == {"baseline", "agentsd-agent", "agentsd-tome", "agentsd-schedule", "ceiling"}
    assert all(r["agentsd_acted"] for r in sd35 if r["method"].startswith("agentsd"))
    # The Flux scenarios on the tiny Flux transformer (fp32 on the CPU), 16x16 and 32x32 packed grids.
    flux = rows("flux")
    assert {(r["arch"], r["size"], r["preset"], r["blocks"], r["dtype"]) for r in flux} == {
        ("tiny-flux", 256, "flux", None, "float32"), ("tiny-flux", 512, "flux", None, "float32")}  # fmt: skip
    assert {r["method"] for r in flux} == {"baseline", "agentsd-agent", "agentsd-tome", "agentsd-schedule", "ceiling"}
    assert all(r["agentsd_acted"] for r in flux if r["method"].startswith("agentsd"))
    # The Wan scenario on the tiny Wan transformer (fp32 on the CPU): 480x832 / 4 down to whole
    # 16 px tokens, 112x208 (7x13 tokens a frame), 81 frames: 21 x 7 x 13 = 1,911 tokens.
    wan = rows("wan")
    assert {(r["arch"], r["size"], r["width"], r["frames"], r["preset"], r["blocks"], r["dtype"]) for r in wan} == {
        ("tiny-wan", 112, 208, 81, "wan", None, "float32")}  # fmt: skip
    assert {r["method"] for r in wan} == {"baseline", "agentsd-agent", "agentsd-tome", "agentsd-schedule",
                                          "ceiling-products"}  # fmt: skip
    assert all(r["agentsd_acted"] for r in wan if r["method"].startswith("agentsd"))
    assert "of ceiling-products' speedup" in (folder / "wan" / "results.md").read_text()
    assert {"baseline+compile", "agentsd-agent+compile"} <= {r["method"] for r in rows("sd15-compile")}
    assert {m for r in rows("sd15-compile-ceiling") if "+" in (m := r["method"])} == {"baseline+compile",
                                                                                        "ceiling+compile"}  # fmt: skip
    assert {"baseline", "paper:ratio=0.1", "paper:ratio=0.4", "paper:ratio=0.5"} <= {r["method"] for r in
                                                                                       rows("pipeline")}  # fmt: skip
    data = json.loads((folder / "breakeven" / "results.json").read_text())
    assert {"min_grid", "min_tokens", "rule"} <= set(data["recommendation"])
    assert {r["phase"] for r in data["rows"]} == {"agent", "tome"} and {r["batch"] for r in data["rows"]} == {2, 8}


def test_tests_scenarios_run_the_gpu_tests_and_not_the_suite(suite_run, tmp_path):
    folder = unpacked(suite_run[0], tmp_path)
    short = json.loads((folder / "tests" / "results.json").read_text())["rows"]
    compiled = json.loads((folder / "tests-compile" / "results.json").read_text())["rows"]
    names = {row["test"] for row in short}
    assert {"tests/test_gpu.py", "tests/test_compat.py"} <= {name.split("::")[0] for name in names}
    assert any("bf16" in name for name in names) and any("identical" in name for name in names)
    assert not any("inductor" in name for name in names) and all("inductor" in r["test"] for r in compiled)
    assert compiled and not any("test_gpu_suite.py" in r["test"] for r in short + compiled)
    if not torch.cuda.is_available():
        assert {row["outcome"] for row in short + compiled} == {"skipped"}
        assert all(row["reason"] == "needs CUDA" for row in short + compiled)


def tiny_run(tmp_path, budget, scenarios):
    """The suite in this process (the torch thread count restored after)."""
    out, stage = tmp_path / "out", tmp_path / "stage"
    threads = torch.get_num_threads()
    try:
        code = runner.main(["--tiny", "--budget", str(budget), "--out", str(out), "--stage", str(stage),
                            "--scenarios", *scenarios], root=ROOT)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return code, out, json.loads((stage / "suite.json").read_text())


def test_a_small_budget_skips_later_scenarios_with_the_reason_and_keeps_earlier_results(tmp_path):
    # Between the first scenario's prior and the tests scenario's: the first runs, the second
    # cannot fit whatever the first took.
    first = Budget(1e9, estimate.priors(True)).estimate(SCENARIOS["sd15-512"].cost(True, None))
    tests = estimate.tests_cost("short", True)["seconds"]
    budget = tests / 2
    assert first < budget
    code, out, suite = tiny_run(tmp_path, budget, ["sd15-512", "tests"])
    assert code == 0
    status = {s["name"]: s for s in suite["scenarios"]}
    assert status["sd15-512"]["status"] == "done" and status["tests"]["status"] == "skipped"
    reason = status["tests"]["reason"]
    assert f"estimated {tests:.0f} s" in reason and f"left of the {budget:.0f} s budget" in reason
    check_out_within_limits(out)
    folder = unpacked(out, tmp_path / "unpacked")
    assert json.loads((folder / "sd15" / "results.json").read_text())["rows"] and not (folder / "tests").exists()
    assert f"- tests (skipped): {reason}" in (out / pack.SUMMARY).read_text()


def test_sigterm_packs_what_finished(tmp_path, monkeypatch):
    """A SIGTERM (what `timeout` sends) in the middle of a scenario: that one is cut short, the
    rest not reached, and OUT holds what finished."""

    def terminated(context):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the SIGTERM handler did not stop the run")

    monkeypatch.setitem(SCENARIOS, "sdxl-1024", Scenario("sdxl-1024", "sdxl", "SIGTERM", lambda *_: {}, terminated))
    code, out, suite = tiny_run(tmp_path, 900, ["sd15-512", "sdxl-1024", "breakeven-2"])
    assert code == 1 and suite["state"] == "cut short by SIGTERM"
    assert [s["status"] for s in suite["scenarios"]] == ["done", "cut short", "not reached"]
    assert signal.getsignal(signal.SIGTERM) is not runner._stop  # the handler is restored
    check_out_within_limits(out)
    assert (unpacked(out, tmp_path / "unpacked") / "sd15" / "results.json").is_file()


def test_report_unpacks_the_archive_and_writes_between_the_markers(suite_run, tmp_path):
    out = suite_run[0]
    docs, readme, results = tmp_path / "benchmarks.md", tmp_path / "README.md", tmp_path / "bench" / "gpu-cpu"
    shutil.copy(ROOT / "docs" / "benchmarks.md", docs)
    shutil.copy(ROOT / "README.md", readme)
    before = {path: path.read_text() for path in (docs, readme)}
    args = ["--docs", str(docs), "--readme", str(readme)]
    assert runner.main(["--report", str(out), "--results-dir", str(results), *args]) == 0
    assert (results / "sd15" / "results.json").is_file() and (results / "summary.md").is_file()
    for path, markers in ((docs, report.DOCS_MARKERS), (readme, report.README_MARKERS)):
        old, new = before[path], path.read_text()
        start, end = markers
        assert old.split(start)[0] == new.split(start)[0] and old.split(end)[1] == new.split(end)[1]
        assert new != old
    section = docs.read_text().split(report.DOCS_MARKERS[0])[1].split(report.DOCS_MARKERS[1])[0]
    for title in ("### Targets", "### SD 1.5, one denoising step", "### SD 1.5 at 2048 px: `highres`",
                  "### SD 3.5 Medium, the whole transformer (`sd3` preset)", "| sd35-2048 | done |",
                  "### Flux.1-dev, the whole transformer in bf16 (`flux` preset)", "| flux-2048 | done |",
                  "### Wan 2.1 1.3B, the whole transformer in bf16 (`wan` preset)", "| wan-480p | done |",
                  "| wan | tiny-wan 112x208 px, 81 frames (21 latent) x1 | agent phase: ",
                  "### A whole generation, DDIM", "Recommended `min_tokens`", "### GPU tests", "tests/test_gpu.py::",
                  "| compile-ceiling-1024 | done |"):  # fmt: skip
        assert title in section, title
    assert f"]({os.path.relpath(results / 'sd15' / 'results.md', tmp_path)})" in section  # relative links
    table = readme.read_text().split(report.README_MARKERS[0])[1]
    assert "baseline step ms" in table and "A whole 3-step generation at 64 px" in table  # --tiny's pipeline
    # Unpacking again over the results refuses; the unpacked folder itself writes the report again.
    assert runner.main(["--report", str(out / pack.ARCHIVE), "--results-dir", str(results), *args]) == 2
    assert runner.main(["--report", str(results), *args]) == 0
    assert docs.read_text().count(report.DOCS_MARKERS[0]) == 1 and docs.read_text().count("### Targets") == 1


def test_report_refuses_missing_markers_and_empty_folders(suite_run, tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("no markers here\n")
    results = tmp_path / "results"
    assert runner.main(["--report", str(suite_run[0]), "--results-dir", str(results), "--docs", str(page),
                        "--readme", str(page)]) == 2  # fmt: skip
    assert "<!-- gpu-suite:start -->" in capsys.readouterr().err
    assert page.read_text() == "no markers here\n"
    assert runner.main(["--report", str(tmp_path / "empty")]) == 2


def test_full_run_refuses_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the full scenarios would run")
    assert runner.main(["--scenarios", "sd15-512", "--out", str(tmp_path / "out")]) == 2
    assert "--tiny" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_out_must_hold_only_the_suites_files(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert runner.main(["--tiny", "--scenarios", "sd15-512", "--out", str(tmp_path / "out")]) == 2
    assert "notes.txt" in capsys.readouterr().err


def test_estimate_prints_each_scenario_against_the_budget(capsys):
    names = ["sd15-512", "tests", "breakeven-2"]
    assert runner.main(["--estimate", "--tiny", "--budget", "10", "--scenarios", *names]) == 0
    printed = capsys.readouterr().out
    assert all(f"| {name} |" in printed for name in names)
    assert "| no |" in printed and "against a budget of 10 s" in printed  # the tests' 30 s prior cannot fit


def test_budget_estimates_from_measured_rates_and_says_why_it_skips():
    now = [0.0]
    budget = Budget(100, dict(flop=1e-12, call=0.5, compile=50.0, seconds=1.0), clock=lambda: now[0])
    cost = dict(flop=20e12, call=10.0, compile=1.0)
    assert budget.estimate(cost) == 20 + 5 + 50 and budget.decide(cost).runs
    budget.measure("flop", 2e-12)  # the calls' launches are in a measured call time
    assert budget.estimate(cost) == 40 + 0 + 50
    budget.settle(cost, elapsed_s=70.0)  # 30 s beyond the 40 s of FLOPs: the compilation's
    assert budget.rates["compile"] == 30.0 and budget.measured >= {"flop", "call", "compile"}
    now[0] = 50.0
    decision = budget.decide(dict(flop=30e12, compile=1.0))
    assert not decision.runs and decision.estimate_s == 90.0 and decision.left_s == 50.0
    assert decision.reason.startswith("estimated 90 s (30.0 TFLOP at 0.5 TFLOP/s (measured), 1 compile x 30.0 s")
    assert decision.reason.endswith("> 50 s left of the 100 s budget")
    with pytest.raises(KeyError, match="no prior for cost kind 'timing'"):
        budget.estimate(dict(timing=1.0))


def test_pack_is_atomic_and_out_problems_names_what_breaks_the_limits(tmp_path):
    stage, out = tmp_path / "stage", tmp_path / "out"
    (stage / "part").mkdir(parents=True)
    (stage / "part" / "results.json").write_text("{}")
    out.mkdir()
    pack.pack(stage, out)
    assert [p.name for p in out.iterdir()] == [pack.ARCHIVE] and pack.out_problems(out) == []
    (out / "sub").mkdir()
    (out / "bad name.txt").write_text("")
    for i in range(8):
        (out / f"f{i}").write_text("")
    problems = " ".join(pack.out_problems(out))
    assert "sub is a folder" in problems and "bad name.txt" in problems and "10 files, more than 8" in problems
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(stage / "part" / "results.json", arcname="../outside.json")
    with pytest.raises(ValueError, match="no plain file inside it"):
        pack.unpack(evil, tmp_path / "dest")
    assert not (tmp_path / "outside.json").exists()


def test_device_folder_names_are_plain():
    assert report.device_folder("NVIDIA H100 80GB HBM3") == "gpu-nvidia-h100-80gb-hbm3"
    assert report.device_folder("") == "gpu-unknown"


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
    removed = estimate.call_flops("tiny", 128, 1, "baseline") - estimate.call_flops("tiny", 128, 1, "ceiling")
    batch, tokens, channels = 2, 256, 16
    assert removed == 3 * (4 * 2 * batch * tokens * channels**2 + 2 * 2 * batch * tokens**2 * channels)


def test_estimate_counts_what_the_joint_ceiling_removes():
    """The same for the tiny SD 3.5 transformer at 256 px (the --tiny sd35-1024): a 16x16 patch
    grid (N = 256 image tokens), T = 333 text tokens, C = 16, CFG batch B = 2. Block 0: joint
    attention (4 image and 4 text projections, 2 products over N + T tokens) and the image-only
    attn2 (4 projections, 2 products over N); block 1, the last, is `context_pre_only`: its
    text output is not projected (3 text projections)."""
    removed = estimate.call_flops("tiny-sd35", 256, 1, "baseline") - estimate.call_flops("tiny-sd35", 256, 1, "ceiling")
    batch, image, text, channels = 2, 256, 333, 16

    def projections(tokens, count):
        return count * 2 * batch * tokens * channels**2

    def products(tokens):
        return 2 * 2 * batch * tokens**2 * channels

    joint = projections(image, 4) + products(image + text)
    attn2 = projections(image, 4) + products(image)
    assert removed == (joint + projections(text, 4)) + attn2 + (joint + projections(text, 3))


def test_estimate_counts_what_the_flux_ceiling_removes():
    """The tiny Flux transformer at 256 px (the --tiny flux-1024): a 16x16 packed grid (N = 256
    image tokens), T = 512 text tokens, C = 32, one sample (no CFG batch). Its 2 double-stream
    layers: 4 image and 4 text projections, 2 products over N + T tokens; its 4 single-stream
    layers: 3 projections of [text; image] (no output projection) and the 2 products. (Flux's
    position ids are made on the host for agentsd's hook and moved to the meta device after it.)"""
    removed = estimate.call_flops("tiny-flux", 256, 1, "baseline") - estimate.call_flops("tiny-flux", 256, 1, "ceiling")
    image, text, channels = 256, 512, 32

    def projections(tokens, count):
        return count * 2 * tokens * channels**2

    products = 2 * 2 * (image + text) ** 2 * channels
    double = projections(image, 4) + projections(text, 4) + products
    single = projections(image + text, 3) + products
    assert removed == 2 * double + 4 * single
    assert estimate.call_flops("tiny-flux", 256, 1, "agentsd-agent") < estimate.call_flops("tiny-flux", 256, 1,
                                                                                            "baseline")  # fmt: skip


def test_flux_scenarios_follow_sd35_and_the_budget_skips_them_when_they_cannot_fit(monkeypatch):
    """flux-1024 and flux-2048 come right after the SD 3.5 scenarios (which follow SDXL, the CUDA
    tests and the break-even grids) and run Flux.1-dev in bf16 on
    CUDA (fp32 on the CPU); their estimate (Flux.1-dev's
    FLOPs counted on the meta device for every timed call, its build unless the model cache holds
    it) is what the budget skips them by, saying so. The whole model's baseline call is counted
    for real; the scenario's sum with a stand-in count per call (counting every method of the
    12 B model on the meta device takes a while)."""
    order = list(DEFAULT_ORDER)
    after = order.index("sd35-2048") + 1
    # The stacked scenario (FirstBlockCache with and without agentsd) follows, on the model they leave built.
    assert order[after : after + 4] == ["flux-1024", "flux-2048", "stack-flux-1024", "wan-480p"]
    assert order[after + 4] == "highres-2048"
    # The short CUDA tests and the break-even grids come before the transformers, after SDXL.
    assert order.index("sdxl-2048") < order.index("tests") < order.index("breakeven-8") < order.index("sd35-1024")
    for name in ("flux-1024", "flux-2048"):
        scenario = SCENARIOS[name]
        assert scenario.part == "flux" and (scenario.model(False), scenario.model(True)) == ("flux-dev", "tiny-flux")
    plans = []
    monkeypatch.setattr(step_scenarios, "run_scenario", lambda part, plan, context: plans.append(plan))
    SCENARIOS["flux-2048"].run(None)
    cuda, cpu = (PartContext(ROOT, False, torch.device(kind), ROOT) for kind in ("cuda", "cpu"))
    assert plans[0].sizes == (2048,) and (plans[0].dtype(cuda), plans[0].dtype(cpu)) == (torch.bfloat16, torch.float32)
    assert 70e12 < estimate.call_flops("flux-dev", 1024, 1, "baseline") < 80e12  # ~12 B params x 2 x 4,608 tokens
    counted = []
    monkeypatch.setattr(estimate, "call_flops", lambda *call: counted.append(call) or 50e12)
    cost = SCENARIOS["flux-1024"].cost(False, None)
    assert {(arch, size, images) for arch, size, images, *_ in counted} == {("flux-dev", 1024, 1)}
    assert {method for _, _, _, method, *_ in counted} == {"baseline", "agentsd-agent", "agentsd-tome", "ceiling"}
    assert cost == {"flop": 4 * 12 * 50e12, "call": 4 * 12, "build:flux-dev": 1.0}  # 10 repeats + 2 warm-ups each
    assert "build:flux-dev" not in SCENARIOS["flux-2048"].cost(False, "flux-dev")  # the model cache holds it
    decision = Budget(120, estimate.priors(False)).decide(cost)
    assert not decision.runs and "1 build:flux-dev x 120.0 s (prior)" in decision.reason
    assert decision.reason.endswith("> 120 s left of the 120 s budget")


def test_estimate_counts_what_the_wan_bounds_remove():
    """The tiny Wan transformer at 112x208 px and 81 frames (the --tiny wan-480p): N = 21 x 7 x 13 =
    1,911 video tokens, C = 24, one sample. Each of its 2 blocks' self-attention: 4 projections
    of 2 N C^2 FLOPs and 2 products of 2 N^2 C; `ceiling-products` removes the products only,
    `ceiling` the whole layer (QK norms and rotary embeddings are not matrix products)."""
    size, frames = (112, 208), 81

    def counted(method):
        return estimate.call_flops("tiny-wan", size, 1, method, None, frames)

    tokens, channels = 21 * 7 * 13, 24
    products = 2 * 2 * tokens**2 * channels
    projections = 4 * 2 * tokens * channels**2
    assert counted("baseline") - counted("ceiling-products") == 2 * products
    assert counted("baseline") - counted("ceiling") == 2 * (products + projections)
    assert counted("agentsd-agent") < counted("agentsd-tome") < counted("baseline")


def test_wan_scenario_follows_flux_and_is_skipped_where_its_memory_does_not_fit(tmp_path, monkeypatch):
    """wan-480p: the whole Wan 2.1 1.3B (1.42 B parameters, 30 blocks) in bf16 on CUDA, 81 frames at
    480x832, estimated from its FLOPs (every timed call counted on the meta device, its build) and
    its peak memory (the model drawn in fp32: at least 4 bytes a parameter); on a device with less
    memory than that, the run skips it, saying both, and goes on."""
    scenario = SCENARIOS["wan-480p"]
    assert scenario.part == "wan" and (scenario.model(False), scenario.model(True)) == ("wan2.1-1.3b", "tiny-wan")
    plans = []
    monkeypatch.setattr(step_scenarios, "run_scenario", lambda part, plan, context: plans.append(plan) or Outcome())
    assert scenario.run(None).headline.startswith("; attention on the dispatcher's ")
    cuda, cpu = (PartContext(ROOT, False, torch.device(kind), ROOT) for kind in ("cuda", "cpu"))
    assert plans[0].sizes == ((480, 832),) and plans[0].frames == (81,)
    assert (plans[0].dtype(cuda), plans[0].dtype(cpu)) == (torch.bfloat16, torch.float32)
    assert set(plans[0].methods) == {"baseline", "agentsd-agent", "agentsd-tome", "ceiling-products"}
    parameters = sum(p.numel() for p in estimate.meta_model("wan2.1-1.3b").parameters())
    assert 1.3e9 < parameters < 1.5e9  # "1.3B"
    assert 4 * parameters <= scenario.memory(False) < 16 * 2**30
    # A call's self-attention products: 30 blocks x 2 products of 2 N^2 C over N = 21 x 30 x 52 =
    # 32,760 tokens of C = 1536, about 70 % of the call (the figure for Wan 2.1 1.3B at 480p).
    baseline = estimate.call_flops("wan2.1-1.3b", (480, 832), 1, "baseline", None, 81)
    products = baseline - estimate.call_flops("wan2.1-1.3b", (480, 832), 1, "ceiling-products", None, 81)
    assert products == 30 * 2 * 2 * 32760**2 * 1536 and 0.69 < products / baseline < 0.71
    monkeypatch.undo()

    monkeypatch.setattr(estimate, "device_memory", lambda device: 2**20)  # 1 MiB: nothing fits
    code, out, suite = tiny_run(tmp_path, 900, ["wan-480p", "sd15-512"])
    assert code == 0
    status = {s["name"]: s for s in suite["scenarios"]}
    assert status["wan-480p"]["status"] == "skipped" and status["sd15-512"]["status"] == "done"
    need = scenario.memory(True) / 2**20  # under a GiB: said in MiB
    assert status["wan-480p"]["reason"] == f"needs about {need:.1f} MiB (its peak-memory estimate) > 1.0 MiB on cpu"
    assert f"- wan-480p (skipped): {status['wan-480p']['reason']}" in (out / pack.SUMMARY).read_text()


def test_flop_table_reads_the_share_of_the_products_and_the_bounds(tmp_path):
    """scripts/flop_table.py on the tiny Wan transformer (1 block) at 112x208 px: a step is its two
    calls, the products' share and bounds follow from the meta-device counts of each method, the
    files record the command, and a size it cannot take is left out, saying why."""
    from agentsd.suite import flops

    row = flops.step_flops("tiny-wan:1", (112, 208), 81)
    counted = {m: estimate.call_flops("tiny-wan:1", (112, 208), 1, m, None, 81)
               for m in ("baseline", "ceiling-products", "ceiling", "agentsd-agent")}  # fmt: skip
    tokens, channels = 21 * 7 * 13, 24
    assert row["calls"] == 2 and row["tokens"] == tokens
    assert row["baseline_tflop"] == pytest.approx(2 * counted["baseline"] / 1e12)
    assert row["products_share"] == pytest.approx(2 * 2 * tokens**2 * channels / counted["baseline"])
    assert row["products_bound"] == pytest.approx(counted["baseline"] / counted["ceiling-products"])
    assert row["agent_speedup"] == pytest.approx(counted["baseline"] / counted["agentsd-agent"])
    out = tmp_path / "flops"
    script = ROOT / "scripts" / "flop_table.py"
    done = subprocess.run([sys.executable, str(script), "--arch", "tiny-wan", "--blocks", "1", "--sizes", "112x208",
                           "112x200", "--frames", "81", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| tiny-wan, 1 block | 112x208, 81 frames (21 latent) | 1911 | 2 |" in done.stdout
    assert "Left out: tiny-wan:1 at 112x200: tiny-wan takes sides that are multiples of 16" in done.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["command"].startswith("python scripts/flop_table.py --arch tiny-wan") and len(data["rows"]) == 1
    assert data["rows"][0]["products_share"] == pytest.approx(row["products_share"])


def test_context_parallel_scenario_is_skipped_with_fewer_than_two_gpus(tmp_path, monkeypatch):
    """The context-parallel row runs only where the machine has two or more GPUs; with one the run
    skips it, saying so in the summary, and goes on. Where it runs, P is the largest of 2, 3 and 4
    the GPUs allow (Wan 1.3B's 12 heads and 24 latent frames split over each)."""
    scenario = SCENARIOS["context-parallel"]
    assert scenario.part == "context-parallel" and DEFAULT_ORDER[-1] == "context-parallel"
    for count, ranks in ((2, 2), (3, 3), (8, 4)):
        monkeypatch.setattr(multi_gpu_scenario, "gpus", lambda count=count: count)
        assert scenario.unavailable(None) == "" and multi_gpu_scenario.ranks() == ranks
        command = multi_gpu_scenario.command("OUT")
        assert command[command.index("--context-parallel") + 1] == str(ranks) and "--frames" in command
    assert multi_gpu_scenario.command("OUT", tiny=True)[4:6] == ["--context-parallel", "2"]

    monkeypatch.setattr(multi_gpu_scenario, "gpus", lambda: 1)
    monkeypatch.setitem(SCENARIOS, "context-parallel", dataclasses.replace(scenario, run=lambda c: pytest.fail("ran")))
    code, out, suite = tiny_run(tmp_path, 900, ["context-parallel", "sd15-512"])
    assert code == 0
    status = {s["name"]: s for s in suite["scenarios"]}
    assert status["context-parallel"]["status"] == "skipped" and status["sd15-512"]["status"] == "done"
    assert status["context-parallel"]["reason"] == "1 GPU: context parallelism needs 2 or more"
    assert "- context-parallel (skipped): 1 GPU: context parallelism needs 2 or more" in (
        out / pack.SUMMARY).read_text()  # fmt: skip


def test_report_shows_the_context_parallel_part(tmp_path):
    """A context-parallel part (written by `agentsd bench --context-parallel` on a machine with two
    or more GPUs) gets its own section in the docs: the bench's table of its rows."""
    row = dict(arch="wan2.1-1.3b", blocks=None, size=480, width=832, frames=93, batch=1, ranks=2, mode="ulysses",
               method="agentsd-agent", agentsd="agent x30", layers=30, layer_elements=2_603_184,
               formula_layer_elements=2_603_184, layer_ratio=44.18, forward_elements=79_293_600,
               formula_forward_elements=79_293_600, forward_ratio=43.53, median_ms=900.0, p10_ms=890.0, p90_ms=910.0,
               speedup=1.9, device="NVIDIA H100", torch="2.11", diffusers="0.42.1", commit="abc",
               date="today")  # fmt: skip
    results = {"context-parallel": dict(rows=[row], date="today", command="agentsd bench", folder=tmp_path)}
    section = report.docs_section(results, tmp_path / "benchmarks.md")
    assert "### Across GPUs: context parallelism" in section
    line = "| wan2.1-1.3b | 480x832, 93 frames (24 latent) | ulysses | agentsd-agent | agent x30 | 30 | 2,603,184 |"
    assert line in section
