"""`agentsd bench`: what it refuses before building a model, and the run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import model_setup
from .args import UsageError
from .model_setup import EXIT_INTERRUPTED, check_backend, check_positive


def check_bench_args(args: argparse.Namespace, device) -> None:
    """Everything `bench` can refuse before building a UNet (which takes ~15 s at SD size)."""
    import importlib.util

    import torch

    from ..api.presets import load_preset
    from ..bench import benchmark
    from ..bench.transformer_models import sides, size_problem
    from ..bench.wan_models import frames_problem
    from ..core.config import AgentSDConfig

    check_positive("--repeats", args.repeats)
    check_positive("--warmup", args.warmup, minimum=0)
    for batch in args.batches:
        check_positive("--batches", batch)
    for size in args.sizes or ():
        shown = "x".join(map(str, sides(size))) if isinstance(size, tuple) else str(size)
        if any(side <= 0 or side % 8 for side in sides(size)):
            raise UsageError(
                f"--sizes {shown} is not a positive multiple of 8: use e.g. 512 or 768 (480x832 for videos)."
            )
        for arch in args.arch:
            if benchmark.is_transformer(arch):
                problem = size_problem(arch, size)
            elif isinstance(size, tuple) and size[0] != size[1]:
                problem = (
                    f"{arch} takes square images: give one side, e.g. 512 (HxW sizes are for the video transformers)"
                )
            else:
                continue
            if problem:
                raise UsageError(f"--sizes {shown}: {problem}.")
    if args.frames is not None:
        if not any(map(benchmark.is_video, args.arch)):
            raise UsageError("--frames applies to the video transformers (wan*) only: add one to --arch or drop it.")
        for frames in args.frames:
            if problem := frames_problem(frames):
                raise UsageError(f"--frames {frames}: {problem}.")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = load_preset(args.preset) if args.preset else AgentSDConfig()
    check_backend(config, device)
    if args.methods and "xformers" in args.methods:
        check_backend(AgentSDConfig(attention_backend="xformers"), device, "xformers")
    if args.methods and "tomesd" in args.methods and importlib.util.find_spec("tomesd") is None:
        raise UsageError("--methods tomesd needs ToMe for SD: pip install tomesd (or 'agentsd[bench]'), or drop it.")
    if args.compile is not None:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.compile not in backends:
            raise UsageError(f"unknown torch.compile backend {args.compile!r}: use one of {', '.join(backends)}.")
    check_cache_args(args)
    # speedup.png and the CPU's memory (a --context-parallel run writes no plot and measures no memory)
    needed = [] if args.context_parallel else ["matplotlib"] + (["psutil"] if device.type != "cuda" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"agentsd bench needs {' and '.join(missing)}: pip install 'agentsd[bench]'.")


def check_cache_args(args: argparse.Namespace) -> None:
    """`--cache` and `--skip-fraction`: a cache the bench can time on every architecture named, and
    none of the flags that pick what a plain run times."""
    if args.cache is None:
        if args.skip_fraction is not None:
            raise UsageError("--skip-fraction applies with --cache only: add --cache NAME or drop it.")
        return
    from ..api.caches import parse_cache
    from ..bench.stack import cache_problem

    try:
        spec = parse_cache(args.cache)
    except ValueError as err:
        raise UsageError(f"--cache: {err}") from None
    for flag, value in (("--methods", args.methods), ("--compile", args.compile),
                        ("--context-parallel", args.context_parallel)):  # fmt: skip
        if value is not None:
            raise UsageError(f"{flag} does not apply with --cache, which times its own rows: drop one of them.")
    for arch in args.arch:
        if problem := cache_problem(arch, spec):
            raise UsageError(f"--cache {spec.label}: {problem}.")
    for fraction in args.skip_fraction or ():
        if not 0 <= fraction <= 1:
            raise UsageError(f"--skip-fraction {fraction:g}: a fraction of steps, from 0 to 1, e.g. 0.5.")


def bench(args: argparse.Namespace) -> int:
    import shlex

    from ..bench import benchmark
    from .loading import DTYPES, prepare_folder, resolve_device

    dtype = DTYPES.get(args.dtype)
    device = None if args.device == "auto" else resolve_device(args.device, fallback=False)
    check_bench_args(args, device)
    if args.context_parallel is not None or args.context_parallel_mode:
        from .parallel_bench import bench_parallel

        return bench_parallel(args)
    out = Path(args.out)
    command = "agentsd " + " ".join(shlex.quote(a) for a in args.argv)
    if args.cache is None:
        run, write = benchmark.run_benchmark, benchmark.write_results
        chosen = dict(methods=args.methods, compile=args.compile)
    else:  # the step cache alone and with agentsd (`bench/stack.py`)
        from ..api.caches import parse_cache
        from ..bench import stack, stack_report

        run, write = stack.run_stack_benchmark, stack_report.write_stack_results
        chosen = dict(spec=parse_cache(args.cache), skip_fractions=args.skip_fraction or stack.DEFAULT_SKIP_FRACTIONS)
    rows: list[dict] = []

    def save(new_rows: list[dict]) -> None:  # after every scenario: an interrupted run keeps them
        rows.extend(new_rows)
        write(rows, args.out, command)

    try:
        with model_setup.no_empty_folder_on_error(out):
            prepare_folder(out)
            run(
                archs=args.arch,
                sizes=args.sizes,
                batches=args.batches,
                preset=args.preset,
                repeats=args.repeats,
                warmup=args.warmup,
                device=device,
                dtype=dtype,
                on_rows=save,
                frames=args.frames,
                **chosen,
            )
    except KeyboardInterrupt:
        from ..api.words import plural

        kept = f"{plural(len(rows), 'row')} of finished scenarios {'is' if len(rows) == 1 else 'are'}"
        print(f"interrupted: {kept} in {args.out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.cache is not None:
        print(stack_report.stack_table(rows))
        print("\n".join(stack_report.stack_lines(rows)))
        print(f"results in {args.out}/results.{{json,csv,md}}")
        return 0
    print(benchmark.markdown_table(rows))
    print("\n".join(benchmark.target_lines(rows)))
    print(f"results in {args.out}/results.{{json,csv,md}} and {args.out}/speedup.png")
    return 0
