"""The `agentsd` command line: thin commands over the library."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import logging
import platform
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# AgentSDConfig fields whose flag name differs from the field name.
FLAG_NAMES = {"seed": "agent-seed"}
# AgentSDConfig fields that take a name or None; "auto" on the command line stands for None.
# Fields with a fixed set of values; "auto" stands for None.
CHOICE_FLAGS = {
    "attn_precision": ["auto", "fp32"],
    "attention_backend": ["auto", "sdpa", "xformers", "einsum"],
    "agent_selection": ["match", "pool"],
}


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    """Versions and the accelerator, for bug reports."""
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("agentsd", "torch", "diffusers", "transformers", "accelerate", "xformers"):
        info[package] = _version(package)
    info["cuda device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return info


def _env(args: argparse.Namespace) -> int:
    for key, value in environment().items():
        print(f"{key}: {value}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from .presets import describe_presets

    for name, description in describe_presets().items():
        print(f"{name:10s} {description}")
    return 0


def _config_flags(parser: argparse.ArgumentParser) -> None:
    from .config import AgentSDConfig

    group = parser.add_argument_group("agent attention (override the preset's fields)")
    group.add_argument("--preset", help="preset name (see `agentsd presets`) or a YAML file; default: paper")
    group.add_argument("--no-agent", action="store_true", help="run the baseline only, without agent attention")
    for f in dataclasses.fields(AgentSDConfig):
        flag = "--" + FLAG_NAMES.get(f.name, f.name.replace("_", "-"))
        if f.type in (bool, "bool"):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name in CHOICE_FLAGS:
            note = "auto: None" if "auto" in CHOICE_FLAGS[f.name] else f"AgentSDConfig.{f.name}"
            group.add_argument(flag, dest=f.name, choices=CHOICE_FLAGS[f.name], default=None, help=note)
        else:
            kind = int if isinstance(f.default, int) else float
            group.add_argument(flag, dest=f.name, type=kind, default=None, help=f"AgentSDConfig.{f.name}")


def agent_config(args: argparse.Namespace):
    """The AgentSDConfig of the command line: the preset, then the per-field flags."""
    from .config import AgentSDConfig
    from .presets import load_preset

    if args.no_agent:
        return None
    config = load_preset(args.preset) if args.preset else AgentSDConfig()
    overrides = {}
    for f in dataclasses.fields(AgentSDConfig):
        value = getattr(args, f.name)
        if value is not None:
            overrides[f.name] = None if value == "auto" else value
    return config.replace(**overrides)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except OSError as err:
            raise UsageError(f"cannot read --prompts-file {args.prompts_file!r} ({err.strerror}).") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    return prompts


def _device_and_dtype(args: argparse.Namespace, auto=None):
    """The (dtype, device) of --dtype/--device; a CUDA request without CUDA falls back to fp32."""
    from . import generation as gen

    device = auto if args.device == "auto" and auto is not None else gen.resolve_device(args.device)
    fell_back = device.type == "cpu" and args.device.startswith("cuda")
    return gen.resolve_dtype(None if fell_back else args.dtype, device), device


def _check_scheduler(args: argparse.Namespace) -> None:
    from .generation import SCHEDULERS

    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {args.scheduler!r}: use one of {', '.join(SCHEDULERS)}.")


def _load_pipeline(args: argparse.Namespace, auto_device=None):
    """The pipeline of --model on --device in --dtype, with --scheduler."""
    from . import generation as gen

    pipe = gen.load_pipeline(args.model, *_device_and_dtype(args, auto_device))
    gen.set_scheduler(pipe, args.scheduler)
    return pipe


def _generate(args: argparse.Namespace) -> int:
    from . import generation as gen

    if args.num_images <= 0:
        raise UsageError(f"--num-images {args.num_images} must be positive.")
    prompts = _prompts(args)
    config = agent_config(args)
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
    )
    out = gen.prepare_folder(Path(args.out))
    pipe = _load_pipeline(args)
    jobs = gen.plan_jobs(prompts, args.num_images, args.seed)
    runs = []
    try:
        runs = gen.generate(
            pipe, jobs, out, settings, config, compare=args.compare, scheduler_name=args.scheduler, progress=True
        )
    except KeyboardInterrupt:
        print(f"interrupted: the finished images are in {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    for run in runs:
        per_image = run.seconds_per_image
        timing = f", {per_image:.3f} s/image" if per_image is not None else ""
        print(f"{run.label}: {len(run.written)} written, {len(run.skipped)} skipped in {run.folder}{timing}")
        if run.config is not None and run.activity.calls:
            print(run.activity.summary())
    if len(runs) == 2 and all(r.seconds_per_image for r in runs):
        print(f"speedup: {runs[0].seconds_per_image / runs[1].seconds_per_image:.2f}x (baseline / agentsd)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import shlex

    from . import benchmark
    from .generation import DTYPES

    dtype = DTYPES.get(args.dtype)
    command = "agentsd " + " ".join(shlex.quote(a) for a in args.argv)
    rows: list[dict] = []

    def save(new_rows: list[dict]) -> None:  # after every scenario: an interrupted run keeps them
        rows.extend(new_rows)
        benchmark.write_results(rows, args.out, command)

    try:
        benchmark.run_benchmark(
            archs=args.arch,
            sizes=args.sizes,
            batches=args.batches,
            methods=args.methods,
            preset=args.preset,
            repeats=args.repeats,
            warmup=args.warmup,
            device=None if args.device == "auto" else args.device,
            dtype=dtype,
            compile=args.compile,
            on_rows=save,
        )
    except KeyboardInterrupt:
        print(f"interrupted: {len(rows)} rows of finished scenarios are in {args.out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(benchmark.markdown_table(rows))
    print("\n".join(benchmark.target_lines(rows)))
    print(f"results in {args.out}/results.{{json,csv,md}} and {args.out}/speedup.png")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from . import compare as cmp
    from . import generation as gen

    if args.prompts_file:
        prompts = _prompts(args)
    else:
        prompts = cmp.imagenet_prompts(args.images_per_class)
    if args.num_prompts is not None:
        if args.num_prompts <= 0:
            raise UsageError(f"--num-prompts {args.num_prompts} must be positive.")
        prompts = prompts[: args.num_prompts]
    methods = [cmp.parse_method(spec) for spec in (args.method or ["baseline", "paper"])]
    _check_scheduler(args)
    settings = gen.GenerationSettings(
        model=args.model, width=args.width, height=args.height, steps=args.steps, guidance=args.guidance,
        batch_size=args.batch_size,
    )  # fmt: skip
    scoring = cmp.ComparisonSettings(
        reference=args.reference, inception_weights=args.inception_weights, clip_model=args.clip_model,
        lpips=args.lpips, measure_memory=not args.no_memory, samples=args.samples,
    )  # fmt: skip
    if args.reference is not None and not Path(args.reference).exists():
        raise UsageError(f"--reference {args.reference!r} does not exist: pass a folder of images or a .npz.")
    pipe = _load_pipeline(args, cmp.process_state().device)
    for method in methods:
        if method.config is not None:
            gen.check_config_patches(pipe, method.config)
    try:
        results = cmp.run_comparison(pipe, prompts, methods, args.out, settings, scoring, seed=args.seed)
    except KeyboardInterrupt:
        print(f"interrupted: finished images are kept in {args.out}/images; rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if results is not None:
        print(cmp.markdown_report(results))
        for label, summary in results.get("activity", {}).items():
            print(f"{label}: {summary}")
        print(f"results in {args.out}/results.{{json,md}}, fid_vs_time.png, samples.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .compare import INCEPTION_FILE
    from .generation import DEFAULT_MODEL, SCHEDULERS

    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(
        prog="agentsd",
        description="Training-free agent attention for diffusers Stable Diffusion pipelines.",
        formatter_class=formatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    gen = commands.add_parser("generate", help="text-to-image with agent attention", formatter_class=formatter)
    gen.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder (SD 1.x, 2.x or XL)")
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for more")
    gen.add_argument("--prompts-file", help="a text file with one prompt per line")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--width", type=int, help="multiple of 8; default: the model's")
    gen.add_argument("--height", type=int, help="multiple of 8; default: the model's")
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--seed", type=int, default=0, help="image k of every prompt uses seed + k")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt")
    gen.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    gen.add_argument("--scheduler", help=f"one of {', '.join(SCHEDULERS)}; default: the model's own")
    gen.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default: fp16 on CUDA, fp32 on CPU")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    gen.add_argument("--out", default="agentsd-out", help="output folder")
    gen.add_argument("--overwrite", action="store_true", help="replace existing images instead of skipping them")
    gen.add_argument("--compare", action="store_true", help="also run the baseline; save both and a side-by-side")
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    _config_flags(gen)
    gen.set_defaults(run=_generate)

    bench = commands.add_parser(
        "bench", help="time one denoising step against the baseline and peers", formatter_class=formatter
    )
    bench.add_argument("--arch", nargs="+", default=["sd15"], help="sd15, sd21, sdxl (or tiny)")
    bench.add_argument("--sizes", nargs="+", type=int, default=[512], help="image sides in pixels")
    bench.add_argument("--batches", nargs="+", type=int, default=[1], help="images per prompt (UNet batch x2)")
    bench.add_argument(
        "--methods",
        nargs="+",
        help="default: every method that runs here (opt-in: agentsd-shared, agentsd-pool, agentsd-pool-r0)",
    )
    bench.add_argument("--preset", help="agentsd preset; default per arch: paper, sd21, sdxl")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--warmup", type=int, default=1)
    bench.add_argument("--device", default="auto")
    bench.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default: fp16 on CUDA, fp32 on CPU")
    bench.add_argument(
        "--compile", nargs="?", const="inductor", metavar="BACKEND",
        help="also time every method under torch.compile (default backend: inductor)",
    )  # fmt: skip
    bench.add_argument("--out", default="bench-out", help="output folder")
    bench.set_defaults(run=_bench)

    cmp = commands.add_parser(
        "compare", help="FID, fidelity and speed of methods on one prompt set", formatter_class=formatter
    )
    cmp.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder")
    cmp.add_argument("--method", action="append",
                     help="baseline, a preset (paper), preset:field=value,..., agentsd:field=value, tomesd:RATIO; "
                     "repeatable; default: baseline and paper")  # fmt: skip
    cmp.add_argument("--prompts-file", help="one prompt per line; default: the ImageNet protocol")
    cmp.add_argument("--images-per-class", type=int, default=2, help="ImageNet protocol: prompts per class")
    cmp.add_argument("--num-prompts", type=int, help="use only the first N prompts (a quick run)")
    cmp.add_argument("--reference", help="FID reference: a folder of images or a .npz of mu and sigma")
    cmp.add_argument("--inception-weights", help=f"local path of {INCEPTION_FILE}")
    cmp.add_argument("--clip-model", help="CLIP model folder or hub id, for the CLIP score")
    cmp.add_argument("--lpips", action="store_true", help="also LPIPS to the baseline (needs torchvision)")
    cmp.add_argument("--no-memory", action="store_true", help="skip the peak-memory-per-image measurement")
    cmp.add_argument("--samples", type=int, default=8, help="prompts in the sample grid")
    cmp.add_argument("--steps", type=int, default=50)
    cmp.add_argument("--guidance", type=float, default=7.5)
    cmp.add_argument("--scheduler", help=f"one of {', '.join(SCHEDULERS)}; default: the model's own")
    cmp.add_argument("--width", type=int)
    cmp.add_argument("--height", type=int)
    cmp.add_argument("--batch-size", type=int, default=1)
    cmp.add_argument("--seed", type=int, default=0, help="image k uses seed + k")
    cmp.add_argument("--dtype", choices=["fp16", "bf16", "fp32"])
    cmp.add_argument("--device", default="auto", help="auto (accelerate's device for this process), cpu, cuda")
    cmp.add_argument("--out", default="compare-out")
    cmp.set_defaults(run=_compare, prompt=None)

    presets = commands.add_parser("presets", help="list the preset configs", formatter_class=formatter)
    presets.set_defaults(run=_presets)
    env = commands.add_parser("env", help="print versions and the CUDA device, for bug reports")
    env.set_defaults(run=_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    from .generation import GenerationError

    try:
        args = parser.parse_args(argv)
        args.argv = argv
        if args.command is None:
            parser.print_help(sys.stderr)
            return 1
        return args.run(args)
    except (UsageError, GenerationError, ValueError) as err:
        if debug:
            raise
        print(f"agentsd: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
