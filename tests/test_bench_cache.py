"""`agentsd bench --cache` (agentsd/bench/stack.py, stack_report.py) and the GPU suite's stacked
scenario, on the tiny Flux transformer: the rows, each timed call's kind against what the model
ran, the step at a skip fraction against its formula, the refusals, the command end to end.
No timing is asserted."""

import json
import re
from pathlib import Path

import pytest
import torch

from agentsd.api.caches import parse_cache
from agentsd.api.presets import load_preset
from agentsd.bench import benchmark, stack, stack_report
from agentsd.cli.commands import main
from agentsd.suite import SCENARIOS, estimate, runner
from agentsd.suite.budget import Budget

ROOT = Path(__file__).parents[1]
SIZE = 256  # tiny-flux: a 16x16 packed grid, where the `flux` preset acts


@pytest.fixture(scope="module")
def tiny_flux():
    torch.manual_seed(0)
    model = benchmark.build_model("tiny-flux")
    return model, benchmark.model_inputs(model, SIZE, 1)


def test_each_timed_call_has_the_kind_of_what_the_model_ran(tiny_flux, monkeypatch):
    """A call timed as skipped did not run the last block (FirstBlockCache returned it from its
    cache), one timed as computed did, and agentsd acted in the stack's calls: read from a hook on
    the last block's norm, a module the bench's own counting does not watch."""
    model, inputs = tiny_flux
    ran, seen = [], []
    hook = model.single_transformer_blocks[-1].norm.register_forward_pre_hook(lambda *args: ran.append(True))
    timed, record = stack.timed_call, stack._record

    def watched_call(*args):
        ran.clear()
        return timed(*args)

    def watched_record(results, method, *args):
        seen.append((method, bool(ran)))
        record(results, method, *args)

    monkeypatch.setattr(stack, "timed_call", watched_call)
    monkeypatch.setattr(stack, "_record", watched_record)
    try:
        timings = stack.time_stack(model, inputs, parse_cache("first-block"), load_preset("flux"), 2, 0)
    finally:
        hook.remove()
    kinds = {method for method, _ in seen}
    assert kinds == {"baseline", "agentsd-agent", "cache:computed", "cache:skipped", "cache+agentsd:computed",
                     "cache+agentsd:skipped"}  # fmt: skip
    assert all(last_block_ran == (not method.endswith(":skipped")) for method, last_block_ran in seen), seen
    assert timings["cache+agentsd:computed"]["acted"] and timings["cache+agentsd:skipped"]["acted"]
    assert "acted" not in timings["cache:computed"]  # the cache alone runs diffusers' attention
    assert not model.is_cache_enabled  # switched off after each round


def test_a_cache_that_computes_every_call_has_no_skipped_rows_and_no_mix(tiny_flux):
    model, inputs = tiny_flux
    spec = parse_cache("taylorseer:1")  # an interval of 1: every call computed
    timings = stack.time_stack(model, inputs, spec, load_preset("flux"), 1, 0)
    assert not any(key.endswith(":skipped") for key in timings)
    assert len(timings["cache:computed"]["ms"]) == stack.CHUNK_CALLS  # it waited for a skip in vain
    rows = stack.stack_rows(timings, dict(arch="tiny-flux", size=SIZE, batch=1, cache=spec.label), [0.5])
    steps = {("baseline", "every"), ("agentsd-agent", "every"), ("cache", "computed"), ("cache+agentsd", "computed")}
    assert {(r["method"], r["step"]) for r in rows} == steps
    checks = stack_report.stack_checks(rows)
    # The computed step is read all the same; no step at a skip fraction without a skipped call.
    assert [c.name for c in checks] == ["not run", "computed step", "over the cache"] and checks[0].met is None
    assert "no skipped call of cache, cache+agentsd among the calls timed" in checks[0].text


def test_the_step_at_a_skip_fraction_and_the_targets_follow_their_formulas():
    def timed(*ms, acted=None):
        return dict(ms=list(ms), peak_mb=1.0, **({} if acted is None else dict(acted=acted)))

    timings = {"baseline": timed(10, 12, 11), "agentsd-agent": timed(8, 7, 9, acted=True),
               "cache:computed": timed(12, 13, 12.5), "cache:skipped": timed(2, 2),
               "cache+agentsd:computed": timed(9, 8.5, 9.5, acted=True),
               "cache+agentsd:skipped": timed(3, acted=True)}  # fmt: skip
    scenario = dict(arch="tiny-flux", size=SIZE, batch=1, cache="first-block:0.05")
    rows = stack.stack_rows(timings, scenario, [0.25, 0.5])
    by = {(r["method"], r["step"], r["skip_fraction"]): r for r in rows}
    base, agentsd, cache, cached, stacked, stack_skipped = 11, 8, 12.5, 2, 9, 3  # the medians
    for f in (0.25, 0.5):
        cache_step, stack_step = (1 - f) * cache + f * cached, (1 - f) * stacked + f * stack_skipped
        assert by[("cache", "mix", f)]["median_ms"] == pytest.approx(cache_step)
        assert by[("cache+agentsd", "mix", f)]["speedup"] == pytest.approx(base / stack_step, abs=1e-4)
        assert by[("cache+agentsd", "mix", f)]["over_cache"] == pytest.approx(cache_step / stack_step, abs=1e-4)
    assert by[("cache+agentsd", "skipped", None)]["over_cache"] == pytest.approx(cached / stack_skipped, abs=1e-4)
    checks = {c.name: c for c in stack_report.stack_checks(rows)}
    assert checks["computed step"].met is False  # agentsd 8 ms alone, 9 ms under the cache: 0.889 < 0.95
    assert f"{agentsd / stacked:.3f} (target >= 0.95: missed)" in checks["computed step"].text
    share = (cache / stacked) / (base / agentsd)  # 1.010: the stack over the cache, over agentsd's own
    assert checks["over the cache"].met is True and f"a share of {share:.3f}" in checks["over the cache"].text
    lines = stack_report.stack_lines(rows)
    assert lines[-1].startswith("The skip fraction is your model's") and "compare --cache first-block:0.05" in lines[-1]


@pytest.mark.parametrize(
    ("arch", "cache", "said"),
    [
        ("tiny-flux", "dbcache", "the bench builds a bare transformer"),
        ("tiny-wan", "mag", "calibrated magnitude ratios"),
        ("tiny-flux", "sea", "a model adapter"),
        ("sd15", "first-block", "does not run on sd15 (unet)"),
        ("tiny-sd35", "taylorseer", "does not run on tiny-sd35 (sd3)"),
        ("wan2.1-1.3b:1", "first-block", "build wan2.1-1.3b with --blocks 2 or more"),
    ],
)
def test_a_cache_the_bench_cannot_time_is_refused_before_any_model_is_built(arch, cache, said, tmp_path, capsys):
    assert said in stack.cache_problem(arch, parse_cache(cache))
    with pytest.raises(ValueError, match=re.escape(said)):
        stack.run_stack_benchmark([arch], parse_cache(cache), build=lambda arch: pytest.fail("built a model"))
    name, _, blocks = arch.partition(":")
    depth = ["--blocks", blocks] if blocks else []
    assert main(["bench", "--arch", name, *depth, "--cache", cache, "--out", str(tmp_path / "out")]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--cache", "nope"], "unknown cache 'nope'"),
        (["--cache", "first-block:-1"], "must be positive"),
        (["--skip-fraction", "0.5"], "--skip-fraction applies with --cache only"),
        (["--cache", "first-block", "--skip-fraction", "1.5"], "from 0 to 1"),
        (["--cache", "first-block", "--methods", "baseline"], "--methods does not apply with --cache"),
        (["--cache", "first-block", "--compile"], "--compile does not apply with --cache"),
    ],
)
def test_bad_cache_flags_get_one_line_and_exit_2(flags, said, tmp_path, capsys):
    assert main(["bench", "--arch", "tiny-flux", *flags, "--out", str(tmp_path / "out")]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_command_writes_the_rows_the_targets_and_the_note(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "--arch", "tiny-flux", "--sizes", str(SIZE), "--cache", "first-block:0.1", "--skip-fraction",
            "0.3", "0.6", "--repeats", "1", "--warmup", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert "--cache first-block:0.1" in data["command"]
    rows = data["rows"]
    assert {(r["method"], r["step"], r["skip_fraction"]) for r in rows} == {
        ("baseline", "every", None), ("agentsd-agent", "every", None), ("cache", "computed", None),
        ("cache", "skipped", None), ("cache+agentsd", "computed", None), ("cache+agentsd", "skipped", None),
        ("cache", "mix", 0.3), ("cache", "mix", 0.6), ("cache+agentsd", "mix", 0.3), ("cache+agentsd", "mix", 0.6),
    }  # fmt: skip
    assert all(r["cache"] == "first-block:0.1" and r["device"] and r["commit"] for r in rows)
    markdown = (out / "results.md").read_text()
    for text in (printed, markdown):
        assert "computed step, cache+agentsd vs agentsd alone: " in text and "(the GPU target)" in text
        assert "a step at skip fraction 0.6: the stack " in text
        assert "random weights decide nothing" in text and "`agentsd compare --cache first-block:0.1`" in text
    assert (out / "results.csv").read_text().splitlines()[0].endswith("cache,step,skip_fraction,over_cache")


def test_the_suite_runs_the_stacked_scenario_and_skips_it_where_the_budget_is_short(tmp_path):
    scenario = SCENARIOS["stack-flux-1024"]
    assert (scenario.part, scenario.model(False), scenario.model(True)) == ("flux-stack", "flux-dev", "tiny-flux")
    assert "build:flux-dev" not in scenario.cost(False, "flux-dev")  # after flux-2048, the model cache holds it
    threads = torch.get_num_threads()

    def run(budget, folder):
        try:
            assert runner.main(["--tiny", "--budget", str(budget), "--out", str(folder / "out"), "--stage",
                                str(folder / "stage"), "--scenarios", "stack-flux-1024"], root=ROOT) == 0  # fmt: skip
        finally:
            torch.set_num_threads(threads)
        return folder / "stage"

    stage = run(600, tmp_path / "ran")
    record = json.loads((stage / "suite.json").read_text())["scenarios"][0]
    assert record["status"] == "done", record
    rows = json.loads((stage / "flux-stack" / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == set(stack.STACK_METHODS) and {r["arch"] for r in rows} == {"tiny-flux"}
    assert "computed step, cache+agentsd vs agentsd alone" in (stage / "flux-stack" / "results.md").read_text()
    estimated = Budget(1e9, estimate.priors(True)).estimate(scenario.cost(True, None))
    stage = run(estimated / 2, tmp_path / "short")
    record = json.loads((stage / "suite.json").read_text())["scenarios"][0]
    assert record["status"] == "skipped" and f"estimated {estimated:.0f} s" in record["reason"]
