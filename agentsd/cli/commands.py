"""The `agentsd` command line: thin commands over the library."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import logging
import platform
import sys
from pathlib import Path

from . import bench_command, model_setup
from .args import FLAG_NAMES, UsageError, build_parser, config_dest

EXIT_USAGE = 2
EXIT_INTERRUPTED = model_setup.EXIT_INTERRUPTED
# What `agentsd env` reports: the stack, then the optional packages behind adapters and peers
# (peft, xformers, tomesd, DeepCache, cache-dit), behind `compare` and `bench`, and the MP4 writer of videos.
ENV_PACKAGES = (
    "agentsd", "torch", "diffusers", "transformers", "accelerate", "safetensors", "peft", "xformers", "tomesd",
    "DeepCache", "cache-dit", "torchmetrics", "torch-fidelity", "torchvision", "matplotlib", "psutil", "imageio",
    "imageio-ffmpeg",
)  # fmt: skip

__all__ = ["FLAG_NAMES", "UsageError", "agent_config", "build_parser", "environment", "main"]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    """Versions and the accelerator, for bug reports."""
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ENV_PACKAGES:
        info[package] = _version(package)
    info["cuda device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return info


def _env(args: argparse.Namespace) -> int:
    for key, value in environment().items():
        print(f"{key}: {value}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from ..api.presets import describe_presets

    for name, description in describe_presets().items():
        print(f"{name:10s} {description}")
    return 0


def agent_config(args: argparse.Namespace, default_preset: str = "paper"):
    """The AgentSDConfig of the command line: --preset (else `default_preset`, the model family's:
    see `loading.default_preset`), then the per-field flags."""
    from ..api.presets import load_preset
    from ..core.config import AgentSDConfig

    if args.no_agent:
        return None
    config = load_preset(args.preset or default_preset)
    overrides = {}
    for f in dataclasses.fields(AgentSDConfig):
        value = getattr(args, config_dest(f.name))
        if value is not None:
            overrides[f.name] = None if value == "auto" else value
    return config.replace(**overrides)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:  # utf-8-sig: a byte-order mark (as some Windows editors write) is not part of the first prompt
            lines = Path(args.prompts_file).read_text(encoding="utf-8-sig").splitlines()
        except OSError as err:
            raise UsageError(f"cannot read --prompts-file {args.prompts_file!r} ({err.strerror}).") from None
        except UnicodeDecodeError as err:
            raise UsageError(
                f"--prompts-file {args.prompts_file!r} is not UTF-8 text (byte {err.start}): save it as UTF-8."
            ) from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    return prompts


def _device_and_dtype(args: argparse.Namespace, auto=None, layout=None):
    """The (dtype, device) of --dtype/--device; a CUDA request without CUDA falls back to fp32.
    Under --context-parallel (`layout`), each process's own (`parallel.rank_device`)."""
    from .loading import resolve_device, resolve_dtype
    from .parallel import rank_device

    if layout is not None:
        device = rank_device(args.device)
    else:
        device = auto if args.device == "auto" and auto is not None else resolve_device(args.device)
    fell_back = device.type == "cpu" and args.device.startswith("cuda")
    return resolve_dtype(None if fell_back else args.dtype, device), device


def _check_scheduler(args: argparse.Namespace) -> None:
    from .schedulers import SCHEDULERS

    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {args.scheduler!r}: use one of {', '.join(SCHEDULERS)}.")


def _generate(args: argparse.Namespace) -> int:
    from . import generation as gen
    from . import parallel
    from .video import is_video

    model_setup.check_positive("--num-images", args.num_images)
    if args.compare and args.no_agent:
        raise UsageError("--compare runs the baseline next to agent attention: drop --no-agent (or --compare).")
    if args.max_sequence_length is not None:
        model_setup.check_positive("--max-sequence-length", args.max_sequence_length)
    prompts = _prompts(args)
    cache = model_setup.cache_spec(args)
    layout = parallel.launch(args.context_parallel)
    config = agent_config(args, model_setup.default_preset(args))  # checked now; final once the model is loaded
    _check_scheduler(args)
    settings = gen.GenerationSettings(
        model=args.model,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance=args.guidance,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        max_sequence_length=args.max_sequence_length,
        true_cfg_scale=args.true_cfg_scale,
        frames=args.frames,
        fps=args.fps,
        context_parallel=layout,
    )
    dtype, device = _device_and_dtype(args, layout=layout)
    model_setup.check_backend(config, device)
    model_setup.check_model_settings(args, settings, args.num_images)
    out = Path(args.out)
    jobs = gen.plan_jobs(prompts, args.num_images, args.seed)
    runs = []
    with parallel.owned_process_group(layout):
        pipe, (config,) = model_setup.load_pipeline(
            args, settings, dtype, device, out, lambda p: [agent_config(args, model_setup.default_preset(args, p))]
        )
        try:
            runs = gen.generate(
                pipe, jobs, out, settings, config, compare=args.compare, scheduler_name=args.scheduler, progress=True,
                cache=cache,
            )  # fmt: skip
        except KeyboardInterrupt:
            print(f"interrupted: the finished {'videos' if is_video(pipe) else 'images'} are in {out}", file=sys.stderr)
            return EXIT_INTERRUPTED
    if not settings.writes:  # rank 0 reports
        return 0
    for run in runs:
        per_image = run.seconds_per_image
        timing = f", {per_image:.3f} s/{run.noun}" if per_image is not None else ""
        print(f"{run.label}: {len(run.written)} written, {len(run.skipped)} skipped in {run.folder}{timing}")
        if run.skip_fraction is not None:
            computed, skipped = run.cache_calls["computed"], run.cache_calls["skipped"]
            print(f"cache {run.cache.label}: {computed} model calls computed, {skipped} skipped "
                  f"(skip fraction {run.skip_fraction:.2f})")  # fmt: skip
        if run.config is not None and run.activity.calls:
            from ..api.status import describe_phases

            print(run.activity.summary())
            print(f"agentsd steps: {describe_phases(run.phases)}")
            if run.parallel:
                print(run.parallel)
    from ..api.words import plural

    timed = gen.speedup(*runs) if len(runs) == 2 else None
    if timed is not None:
        print(f"speedup: {timed[0]:.2f}x (baseline / agentsd, over the {plural(timed[1], runs[0].noun)} both made)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from . import compare as cmp
    from . import comparison, parallel
    from . import generation as gen
    from .pipeline_checks import model_pipeline_class
    from .video import is_video

    model_setup.check_positive("--images-per-class", args.images_per_class)
    model_setup.check_positive("--samples", args.samples)
    if args.max_sequence_length is not None:
        model_setup.check_positive("--max-sequence-length", args.max_sequence_length)
    if args.prompts_file:
        prompts = _prompts(args)
    else:
        prompts = cmp.imagenet_prompts(args.images_per_class)
    if args.num_prompts is not None:
        model_setup.check_positive("--num-prompts", args.num_prompts)
        prompts = prompts[: args.num_prompts]
    layout = parallel.launch(args.context_parallel)

    cache = model_setup.cache_spec(args)

    def methods_for(preset: str) -> list:  # the default methods: the baseline and the model family's preset
        default = ["baseline", preset] + (["cache", f"cache+{preset}"] if cache else [])  # and both under --cache
        methods = [comparison.parse_method(spec, cache) for spec in (args.method or default)]
        if cache is not None and not any(method.cache for method in methods):
            raise UsageError(f"--cache {args.cache} names the cache of the methods cache and cache+METHOD: add "
                             "--method cache (and e.g. --method cache+agentsd), or drop --cache.")  # fmt: skip
        return comparison.with_baseline(methods)

    methods = methods_for(model_setup.default_preset(args))  # checked now; final once the model is loaded
    _check_scheduler(args)
    settings = gen.GenerationSettings(
        model=args.model, width=args.width, height=args.height, steps=args.steps, guidance=args.guidance,
        batch_size=args.batch_size, overwrite=args.overwrite, max_sequence_length=args.max_sequence_length,
        frames=args.frames, fps=args.fps, context_parallel=layout,
    )  # fmt: skip
    scoring = comparison.ComparisonSettings(
        reference=args.reference, inception_weights=args.inception_weights, clip_model=args.clip_model,
        lpips=args.lpips, measure_memory=not args.no_memory, samples=args.samples,
    )  # fmt: skip
    dtype, device = _device_and_dtype(args, cmp.process_state().device, layout)
    for method in methods:
        model_setup.check_backend(method.config, device, method.name)
    if is_video(model_pipeline_class(args.model)):  # where model_index.json can be read without downloading
        cmp.check_video_scoring(scoring)
    cmp.check_scoring(methods, scoring, device)  # a missing package or weight file fails before any work
    model_setup.check_model_settings(args, settings, len(prompts))

    def configs_for(pipe) -> list:
        nonlocal methods
        methods = methods_for(model_setup.default_preset(args, pipe))
        comparison.check_methods(pipe, methods)
        if is_video(pipe):
            cmp.check_video_scoring(scoring)
        return [m.config for m in methods]

    with parallel.owned_process_group(layout):
        pipe, _ = model_setup.load_pipeline(args, settings, dtype, device, Path(args.out), configs_for)
        try:
            results = cmp.run_comparison(pipe, prompts, methods, args.out, settings, scoring, seed=args.seed)
        except KeyboardInterrupt:
            print(f"interrupted: finished images are kept in {args.out}/images; rerun to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
    if results is not None:
        print(cmp.markdown_report(results))
        for label, summary in results.get("activity", {}).items():
            print(f"{label}: {summary}")
        print(f"results in {args.out}: {', '.join(cmp.report_files())}")
    return 0


COMMANDS = {"generate": _generate, "bench": bench_command.bench, "compare": _compare, "presets": _presets, "env": _env}


def main(argv: list[str] | None = None) -> int:
    """Run the `agentsd` command line; returns the exit code. Ctrl-C at any point, the imports of
    torch and diffusers and the loading of the model included, exits 130 with one line (a
    command interrupted in its work says what it kept)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    debug = "--debug" in argv
    parser = build_parser()
    from .loading import GenerationError

    try:
        args = parser.parse_args(argv)
        args.argv = argv
        if args.command is None:
            parser.print_help(sys.stderr)
            return 1
        return COMMANDS[args.command](args)
    except (UsageError, GenerationError, ValueError) as err:
        if debug:
            raise
        print(f"agentsd: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as stop:  # --help, --version: an exit code when called as a function too
        return stop.code if isinstance(stop.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
