"""The suite's command line (behind scripts/gpu_suite.py) and its budgeted run.

The run goes through the scenarios in the order given (`scenarios.DEFAULT_ORDER`), each
estimated first from the rates measured so far (`budget.py`) and skipped, with the reason,
when it would not fit in the time left. Every part's files are written into a staging
folder, and after every scenario OUT is brought up to date (`pack.py`): the archive, the
summary and the log, so a run stopped at any moment leaves a valid OUT. SIGTERM (as
`timeout` sends) stops the scenario in progress and packs what finished.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..bench.results import run_info
from . import estimate, estimate_table, pack
from .budget import Budget
from .common import PartContext, measured_dtype
from .scenarios import DEFAULT_ORDER, SCENARIOS, Scenario
from .step import ModelCache
from .summary import SUITE_JSON, Record, RunInfo, suite_json, summary_markdown

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 480.0


class Stopped(BaseException):
    """A signal stopped the run (a BaseException, so no scenario's error handling keeps it)."""


def _stop(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # one stop is enough: the run packs and ends
    raise Stopped(signal.Signals(signum).name)


class SuiteRun:
    """The records of a run and the files that show them: `suite.json` and `summary.md` in the
    staging folder (so the archive has them) and the summary and archive in OUT."""

    def __init__(self, info: RunInfo, records: list[Record], stage: Path, out: Path):
        self.info, self.records, self.stage, self.out = info, records, stage, out

    def write(self, archive: bool = True) -> None:
        summary = summary_markdown(self.info, self.records)
        (self.stage / SUITE_JSON).write_text(suite_json(self.info, self.records))
        (self.stage / pack.SUMMARY).write_text(summary)
        if archive:
            pack.pack(self.stage, self.out)
        pack.write_atomic(self.out / pack.SUMMARY, summary)


def run_scenarios(run: SuiteRun, budget: Budget, context: PartContext) -> bool:
    """Run (or skip) every scenario of the run in turn, OUT updated after each one.

    Returns:
        Whether none failed.
    """
    for record in run.records:
        scenario = SCENARIOS[record.name]
        counted = time.perf_counter()
        try:
            cost = scenario.cost(context.tiny, context.models.arch)
        except Exception as err:  # an estimate that cannot be made: the scenario is not run blind
            logger.exception("%s: its estimate failed", record.name)
            record.status, record.reason = "failed", f"its estimate failed: {type(err).__name__}: {err}"
            run.write(archive=False)
            continue
        decision = budget.decide(cost)
        record.estimate_s = round(decision.estimate_s, 1)
        cannot = _cannot_run(scenario, context)
        if cannot:
            record.status, record.reason = "skipped", cannot
            logger.warning("%s: skipped: %s", record.name, cannot)
            run.write(archive=False)
            continue
        if not decision.runs:
            record.status, record.reason = "skipped", decision.reason
            logger.warning("%s: skipped: %s", record.name, decision.reason)
            run.write(archive=False)
            continue
        record.status = "running"
        run.info.state = f"running {record.name} (estimated {decision.estimate_s:.0f} s, {decision.left_s:.0f} s left)"
        logger.info(
            "%s: starting: estimated %.1f s (%s; counted in %.1f s), %.0f s left",
            record.name,
            decision.estimate_s,
            budget.describe(cost),
            time.perf_counter() - counted,
            decision.left_s,
        )
        run.write(archive=False)
        start = time.perf_counter()
        try:
            outcome = scenario.run(context)
        except Exception as err:  # the next scenarios still run; the exit code says it failed
            logger.exception("%s failed", record.name)
            record.status, record.reason = "failed", f"{type(err).__name__}: {err}"
        else:
            record.status, record.headline, record.baseline_ms = "done", outcome.headline, outcome.baseline_ms
            for kind, rate in outcome.measured.items():
                budget.measure(kind, rate)
            budget.settle(cost, time.perf_counter() - start)
        record.elapsed_s = round(time.perf_counter() - start, 1)
        logger.info("%s: %s in %.1f s (estimated %.1f s); %s", record.name, record.status, record.elapsed_s,
                    decision.estimate_s, record.headline or record.reason)  # fmt: skip
        run.info.used_s = budget.elapsed()
        run.write()
    return not any(r.status == "failed" for r in run.records)


def _cannot_run(scenario: Scenario, context: PartContext) -> str:
    """Why `scenario` cannot run on this machine (`Scenario.unavailable`: too few GPUs), or would not
    fit in the device's memory by its own estimate, or ""."""
    if scenario.unavailable is not None and (why := scenario.unavailable(context)):
        return why
    if scenario.memory is None:
        return ""
    need, have = scenario.memory(context.tiny), estimate.device_memory(context.device)
    if need <= have:
        return ""
    return f"needs about {_bytes(need)} (its peak-memory estimate) > {_bytes(have)} on {context.device}"


def _bytes(count: float) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_suite.py",
        description="Measure what a GPU can tell about agentsd in priority order within a time budget, packed "
        "into a few files; write the documentation's GPU numbers from the results.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--report", nargs="+", type=Path, metavar="PATH",
                        help="write the docs from results: OUT, OUT/results.tar.gz, or an unpacked folder")  # fmt: skip
    action.add_argument("--estimate", action="store_true", help="print each scenario's prior estimate")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds the run may take")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=list(DEFAULT_ORDER),
        choices=list(SCENARIOS),
        metavar="NAME",
        help=f"the scenarios, in priority order (known: {', '.join(SCENARIOS)})",
    )
    parser.add_argument("--out", type=Path, default=Path("gpu-suite-out"), help="the packed results (plain files)")
    parser.add_argument("--stage", type=Path, help="an empty folder for the unpacked files (default: a new temp one)")
    parser.add_argument("--tiny", action="store_true", help="tiny architectures on the CPU, in seconds (CI)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present; the CPU with --tiny), cuda, cpu")
    parser.add_argument("--results-dir", type=Path,
                        help="where --report unpacks an archive (default: docs/bench/gpu-<device>)")  # fmt: skip
    parser.add_argument("--docs", type=Path, help="page to write (default: the checkout's docs/benchmarks.md)")
    parser.add_argument("--readme", type=Path, help="README to write (default: the checkout's README.md)")
    return parser


def _device(requested: str, tiny: bool) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")


def _report(args: argparse.Namespace, root: Path) -> int:
    from . import report

    docs, readme = args.docs or root / "docs" / "benchmarks.md", args.readme or root / "README.md"
    try:
        folders = report.write_report(args.report, docs, readme, args.results_dir, root / "docs" / "bench")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote the GPU section of {docs} and the performance table of {readme} from {', '.join(map(str, folders))}")
    return 0


def _run(args: argparse.Namespace, root: Path, command: str) -> int:
    device = _device(args.device, args.tiny)
    if device.type == "cpu" and not args.tiny and args.device == "auto":
        print("error: the full scenarios need a CUDA device: add --tiny for the CPU check (or force --device cpu).",
              file=sys.stderr)  # fmt: skip
        return 2
    if len(set(args.scenarios)) != len(args.scenarios):
        print("error: a scenario is named twice in --scenarios: name each once.", file=sys.stderr)
        return 2
    out = args.out.resolve()
    try:
        budget = Budget(args.budget, estimate.priors(args.tiny))
        if args.stage and args.stage.exists() and any(args.stage.iterdir()):
            raise ValueError(f"the staging folder {args.stage} is not empty: give --stage an empty or new folder.")
        pack.prepare_out(out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stage = (args.stage or Path(tempfile.mkdtemp(prefix="agentsd-gpu-suite-"))).resolve()
    stage.mkdir(parents=True, exist_ok=True)
    if args.tiny and device.type == "cpu":
        # Nothing is measured in --tiny mode, and one thread keeps it fast on a busy CPU (with
        # every core taken, several spinning OpenMP threads slow each op down many times).
        torch.set_num_threads(1)
    log = logging.FileHandler(out / pack.LOG, mode="w")
    log.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(log)
    context = PartContext(out=stage, tiny=args.tiny, device=device, root=root, command=command,
                          models=ModelCache(device, measured_dtype(device)), seconds_left=budget.left)  # fmt: skip
    records = [Record(name, SCENARIOS[name].part, SCENARIOS[name].about) for name in args.scenarios]
    run = SuiteRun(RunInfo(command, args.budget, run=run_info(device)), records, stage, out)
    logger.info("suite: %d scenarios, %.0f s budget, %s; staging in %s, packing into %s", len(records),
                args.budget, device, stage, out)  # fmt: skip
    ok, problems = False, []
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        run.write()  # OUT is valid from the start
        ok = run_scenarios(run, budget, context)
        run.info.state = "finished"
    except (Stopped, KeyboardInterrupt) as stop:
        cause = str(stop) if isinstance(stop, Stopped) else "SIGINT"
        logger.error("suite: stopped by %s after %.0f s: packing what finished", cause, budget.elapsed())
        run.info.state = f"cut short by {cause}"
        for record in records:
            if record.status == "running":
                record.status, record.reason = "cut short", f"stopped by {cause} after {budget.elapsed():.0f} s"
            elif record.status == "pending":
                record.status, record.reason = "not reached", f"the run was stopped by {cause}"
    finally:
        signal.signal(signal.SIGTERM, previous)
        run.info.used_s, run.info.rates = budget.elapsed(), dict(budget.rates)
        run.write()
        problems = pack.out_problems(out)
        if problems:
            logger.error("suite: %s breaks what comes back from a GPU machine: %s", out, "; ".join(problems))
        logger.info("suite: %s; results in %s (unpacked: %s)", run.info.state, out, stage)
        logging.getLogger().removeHandler(log)
        log.close()
    print((out / pack.SUMMARY).read_text(), end="")
    return 0 if ok and not problems else 1


def main(argv: Sequence[str] | None = None, root: Path | None = None) -> int:
    """The command line; returns the exit code (2: bad arguments, 1: a scenario failed or the run
    was stopped).

    Args:
        argv: the arguments (default: the process's).
        root: the checkout (its `tests/`, `docs/benchmarks.md` and `README.md`).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    args = build_parser().parse_args(argv)
    root = (root or Path.cwd()).resolve()
    if args.estimate:
        rows = estimate_table.estimates(args.scenarios, args.tiny, args.budget)
        print(estimate_table.markdown(rows, args.budget), end="")
        return 0
    if args.report:
        return _report(args, root)
    argv = sys.argv[1:] if argv is None else list(argv)
    return _run(args, root, "python scripts/gpu_suite.py " + shlex.join(argv))
