"""The tests scenarios: the CUDA-marked tests (`pytest -m gpu`), each test's outcome recorded.

`tests` runs the short ones (fp16 and bf16 patch cycles, identical calls, host
synchronisation, fp32 softmaxes, the xformers backend where xformers runs, model offload);
`tests-compile` the inductor test, which compiles a tiny UNet twice and so comes later in the
default order. pytest runs in a subprocess on the checkout's test files that carry the `gpu`
marker, and writes a JUnit XML report (pytest's own `--junitxml`), from which every test's
outcome, skip or failure message and duration are read. On a machine without CUDA every test
is skipped, with its reason.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import Outcome, PartContext, markdown_rows, stamp_rows, write_part

logger = logging.getLogger(__name__)

FIELDS = ("test", "outcome", "reason", "duration_s")
GPU_MARK = "pytest.mark.gpu"
# The suite's own CI test runs this part: it must never be collected by it.
SUITE_TEST = "test_gpu_suite.py"
TIMEOUT_S = 450  # at most, and never more than the budget left
REASON_CHARS = 300


@dataclass(frozen=True)
class Selection:
    """The tests a scenario runs (`pytest -k keyword`) and their prior seconds on one H100."""

    keyword: str
    seconds: float


# pytest start-up and collection ~30 s; the short tests run tiny pipelines (seconds each); the
# inductor test compiles a tiny UNet in each of its two phases (90 s each assumed).
SELECTIONS = {"short": Selection("not inductor", 60.0), "compile": Selection("inductor", 30.0 + 2 * 90.0)}
TINY_SECONDS = 30.0  # pytest start-up and collection on a busy CPU; every test is skipped there


def gpu_test_files(tests_dir: Path) -> list[Path]:
    """The test files that mark tests with `gpu`, the suite's own test left out."""
    return sorted(p for p in tests_dir.glob("test_*.py") if p.name != SUITE_TEST and GPU_MARK in p.read_text())


def junit_rows(path: Path) -> list[dict[str, Any]]:
    """One row per test case of a JUnit XML report: its pytest id, outcome (passed, failed,
    error, skipped), the skip or failure message and the duration in seconds."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        module, _, last = classname.rpartition(".")
        if last[:1].isupper():  # a test class: tests.test_x.TestY
            classname, name = module, f"{last}::{name}"
        outcome, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = "failed" if tag == "failure" else tag
                # One line, for the tables; pytest.log holds the whole message.
                reason = " ".join((found.get("message") or "").split())[:REASON_CHARS]
                break
        test = f"{classname.replace('.', '/')}.py::{name}"
        rows.append(dict(test=test, outcome=outcome, reason=reason, duration_s=round(float(case.get("time", 0)), 3)))
    return rows


def run_selection(part: str, selection: str, context: PartContext) -> Outcome:
    """Run the selected gpu-marked tests of the checkout and write the part's files."""
    folder = context.folder(part)
    files = gpu_test_files(context.root / "tests")
    junit = folder / "junit.xml"
    junit.unlink(missing_ok=True)
    keyword = SELECTIONS[selection].keyword
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-k", keyword, "-p", "no:cacheprovider", "-rs",
               f"--junitxml={junit}", *[str(f.relative_to(context.root)) for f in files]]  # fmt: skip
    timeout = min(TIMEOUT_S, max(context.seconds_left(), 30.0))
    logger.info("%s: %s (at most %.0f s)", part, shlex.join(command), timeout)
    try:
        done = subprocess.run(command, cwd=context.root, capture_output=True, text=True, timeout=timeout)
        log, returncode = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:  # its output may come back as bytes, even with text=True
        output = [o.decode(errors="replace") if isinstance(o, bytes) else o or "" for o in (err.stdout, err.stderr)]
        log, returncode = "".join(output) + f"\ntimed out after {timeout:.0f} s", None
    (folder / "pytest.log").write_text(log)
    rows = stamp_rows(junit_rows(junit) if junit.exists() else [], context.device)
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "failed", "error", "skipped")}
    summary = ", ".join(f"{n} {o}" for o, n in counts.items() if n) or "no test ran"
    markdown = f"`pytest -m gpu -k '{keyword}'` on {', '.join(f.name for f in files)}: {summary} "
    markdown += f"(exit code {returncode}).\n\n" + markdown_rows(rows, FIELDS)
    extra = dict(pytest_command=shlex.join(["python", *command[1:]]), returncode=returncode, counts=counts)
    write_part(folder, rows, FIELDS, markdown, context.command, extra)
    return Outcome(headline=f"{summary} (exit code {returncode})")
