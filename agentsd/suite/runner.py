"""Running the parts of the GPU suite, and its command line (behind scripts/gpu_suite.py)."""

from __future__ import annotations

import argparse
import logging
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import breakeven, gpu_tests, pipeline, unet
from .common import PART_NAMES, PartContext

logger = logging.getLogger(__name__)

PARTS: dict[str, Callable[[PartContext], dict[str, Path]]] = {
    "tests": gpu_tests.run,
    "sd15": unet.run_sd15,
    "sd15-compile": unet.run_sd15_compile,
    "sd15-compile-ceiling": unet.run_sd15_compile_ceiling,
    "sdxl": unet.run_sdxl,
    "pipeline": pipeline.run,
    "breakeven": breakeven.run,
}


def run_parts(names: Sequence[str], context: PartContext) -> dict[str, dict[str, Path] | BaseException]:
    """Run the named parts in turn; a part that fails is logged and the next one runs.

    Returns:
        Each part's written files (by suffix), or the exception it failed with.
    """
    outcomes: dict[str, dict[str, Path] | BaseException] = {}
    for name in names:
        start = time.perf_counter()
        logger.info("part %s: starting (%s, %s)", name, "tiny" if context.tiny else "full", context.device)
        try:
            outcomes[name] = PARTS[name](context)
        except Exception as err:  # the other parts still run; the exit code says it failed
            logger.exception("part %s failed", name)
            outcomes[name] = err
        logger.info("part %s: %.1f s", name, time.perf_counter() - start)
    return outcomes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_suite.py",
        description="Measure everything a GPU can tell about agentsd, one part per command, and write the "
        "documentation's GPU numbers from the results.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--part", choices=[*PART_NAMES, "all"], help="run one part (all: every part in turn)")
    action.add_argument("--report", nargs="+", type=Path, metavar="DIR", help="write the docs from result folders")
    action.add_argument("--estimate", action="store_true", help="print each part's estimated time on one H100")
    parser.add_argument("--out", type=Path, default=Path("gpu-suite-out"), help="result folder (a subfolder per part)")
    parser.add_argument("--tiny", action="store_true", help="tiny architectures on the CPU, in seconds (CI)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present; the CPU with --tiny), cuda, cpu")
    parser.add_argument("--docs", type=Path, help="page to write (default: the checkout's docs/benchmarks.md)")
    parser.add_argument("--readme", type=Path, help="README to write (default: the checkout's README.md)")
    return parser


def _device(requested: str, tiny: bool) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")


def main(argv: Sequence[str] | None = None, root: Path | None = None) -> int:
    """The command line; returns the exit code (2: bad arguments, 1: a part failed).

    Args:
        argv: the arguments (default: the process's).
        root: the checkout (its `tests/`, `docs/benchmarks.md` and `README.md`).
    """
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    root = (root or Path.cwd()).resolve()
    if args.estimate:
        from . import estimate

        print(estimate.markdown(estimate.estimates()), end="")
        return 0
    if args.report:
        from . import report

        docs, readme = args.docs or root / "docs" / "benchmarks.md", args.readme or root / "README.md"
        try:
            report.write_report(args.report, docs, readme)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote the GPU section of {docs} and the performance table of {readme}")
        return 0
    device = _device(args.device, args.tiny)
    if args.tiny and device.type == "cpu":
        # Nothing is measured in --tiny mode, and one thread keeps it fast on a busy CPU (with
        # every core taken, several spinning OpenMP threads slow each op down many times).
        torch.set_num_threads(1)
    if device.type == "cpu" and not args.tiny and args.device == "auto":
        print("error: the full parts need a CUDA device: add --tiny for the CPU check (or force --device cpu).",
              file=sys.stderr)  # fmt: skip
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "python scripts/gpu_suite.py " + " ".join(shlex.quote(a) for a in argv)
    context = PartContext(out=args.out, tiny=args.tiny, device=device, root=root, command=command)
    names = list(PART_NAMES) if args.part == "all" else [args.part]
    outcomes = run_parts(names, context)
    for name, outcome in outcomes.items():
        if isinstance(outcome, BaseException):
            print(f"{name}: FAILED ({type(outcome).__name__}: {outcome})")
        else:
            print(f"{name}: " + ", ".join(str(p) for p in outcome.values()))
    return 1 if any(isinstance(o, BaseException) for o in outcomes.values()) else 0
