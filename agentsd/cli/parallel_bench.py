"""`agentsd bench --context-parallel P`: its checks, its launch through torchrun, and rank 0's output.

Outside torchrun (no `WORLD_SIZE` in the environment) the command starts itself again under
torch's own launcher, `python -m torch.distributed.run --standalone --nproc_per_node P -m agentsd
bench ...` (the same arguments, a free port picked by torchrun), and waits for it: P processes, one
per GPU on CUDA, one per core on the CPU. Under torchrun (or `accelerate launch`, which sets the
same variables) it uses the world it is in, whose size must be P. Every check runs before any
process is started or model built.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

from .args import UsageError


def check_parallel_args(args: argparse.Namespace) -> list[str]:
    """The modes of a valid `bench --context-parallel` command line, else a `UsageError` naming the fix."""
    import torch

    from ..bench.benchmark import default_sizes, is_video
    from ..bench.ranks import PARALLEL_METHODS, parallel_problem
    from ..bench.traffic import MODES
    from ..bench.wan_models import DEFAULT_FRAMES

    ranks = args.context_parallel
    if ranks is None:
        raise UsageError("--context-parallel-mode applies with --context-parallel P: add it, or drop the mode.")
    if ranks < 2:
        raise UsageError(f"--context-parallel {ranks}: context parallelism splits a call over 2 or more processes.")
    world = os.environ.get("WORLD_SIZE")
    if world is not None and int(world) != ranks:
        raise UsageError(f"--context-parallel {ranks} under torchrun with {world} processes: make them equal "
                         f"(--context-parallel {world}, or --nproc_per_node {ranks}).")  # fmt: skip
    cuda = torch.cuda.is_available()
    if args.device not in ("auto", "cuda" if cuda else "cpu"):
        here = "each rank runs on the GPU of its local rank" if cuda else "this machine has no CUDA"
        raise UsageError(f"--device {args.device} with --context-parallel: {here}: use --device auto.")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
    have = torch.cuda.device_count() if cuda else os.cpu_count() or 1
    what = f"{have} GPU{'s' if have > 1 else ''}" if cuda else f"{have} CPU core{'s' if have > 1 else ''}"
    if have < 2:
        raise UsageError(f"--context-parallel needs 2 or more {'GPUs' if cuda else 'CPU cores'}: this machine has "
                         f"{what}.")  # fmt: skip
    if local > have:
        raise UsageError(f"--context-parallel {ranks}: {local} processes here, one per {'GPU' if cuda else 'core'}, "
                         f"and this machine has {what}: use --context-parallel {have} or less.")  # fmt: skip
    others = [m for m in args.methods or () if m not in PARALLEL_METHODS]
    if others:
        raise UsageError(f"--methods {' '.join(others)}: with --context-parallel the methods are "
                         f"{', '.join(PARALLEL_METHODS)}.")  # fmt: skip
    if args.compile is not None:
        raise UsageError("--compile and --context-parallel: time one or the other (drop --compile).")
    modes = args.context_parallel_mode or list(MODES)
    for arch in args.arch:
        for size in args.sizes or default_sizes(arch):
            for frames in (args.frames or [DEFAULT_FRAMES]) if is_video(arch) else [None]:
                for mode in modes:
                    if problem := parallel_problem(arch, size, frames, ranks, mode):
                        raise UsageError(f"--context-parallel {ranks} ({mode}): {problem}.")
    return modes


def bench_parallel(args: argparse.Namespace) -> int:
    """Check, then start torchrun or (under it) run; rank 0 prints the table and writes the files."""
    from .model_setup import no_empty_folder_on_error

    modes = check_parallel_args(args)
    out = Path(args.out)
    if "WORLD_SIZE" not in os.environ:
        try:
            with no_empty_folder_on_error(out):
                _prepare(out)  # refused here, before any process starts
                code = _launch(args)
                if code and not any(out.iterdir()):
                    raise _Failed(code)  # leaves no empty folder behind
        except _Failed as failed:
            code = failed.code
        return code
    return _run(args, modes, out)


class _Failed(Exception):
    def __init__(self, code: int):
        self.code = code


def _prepare(out: Path) -> None:
    from .loading import GenerationError, prepare_folder

    try:
        prepare_folder(out)
    except GenerationError as err:
        raise UsageError(str(err)) from None


def _launch(args: argparse.Namespace) -> int:
    """Run this command again in `--context-parallel` processes under torchrun; its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(args.context_parallel), "-m", "agentsd", *args.argv]  # fmt: skip
    print(f"starting {args.context_parallel} processes: python -m torch.distributed.run --standalone "
          f"--nproc_per_node {args.context_parallel} -m agentsd bench ...", file=sys.stderr)  # fmt: skip
    return subprocess.run(command).returncode


def _run(args: argparse.Namespace, modes: list[str], out: Path) -> int:
    import shlex

    from ..bench import ranks as parallel
    from .loading import DTYPES

    first = int(os.environ.get("RANK", 0)) == 0
    # diffusers 0.42 calls a functional collective torch has renamed, once per call and rank: not the user's to fix.
    warnings.filterwarnings("ignore", message=".*all_gather_tensor` is deprecated", category=FutureWarning)
    if not first:  # one copy of diffusers' warnings (context parallelism is experimental), rank 0's
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    else:
        _prepare(out)
    command = "agentsd " + " ".join(shlex.quote(a) for a in args.argv)
    rows: list[dict] = []

    def save(new_rows: list[dict]) -> None:  # after every scenario: an interrupted run keeps them
        rows.extend(new_rows)
        parallel.write_parallel_results(rows, out, command)
        row = new_rows[0]
        print(f"done: {row['arch']} {row['size']} {row['mode']} over {row['ranks']} ranks", file=sys.stderr)

    parallel.run_parallel_benchmark(
        archs=args.arch, sizes=args.sizes, frames=args.frames, batches=args.batches, modes=modes,
        methods=args.methods or parallel.PARALLEL_METHODS, preset=args.preset, repeats=args.repeats,
        warmup=args.warmup, dtype=DTYPES.get(args.dtype), on_rows=save if first else None,
    )  # fmt: skip
    if first:
        print(parallel.parallel_markdown(rows))
        print(f"results in {out}/results.{{json,csv,md}}")
    return 0
