"""The argument parser of the `agentsd` command line: every subcommand and flag."""

from __future__ import annotations

import argparse
import dataclasses

# AgentSDConfig fields whose flag name differs from the field name (`--seed` seeds the images).
FLAG_NAMES = {"seed": "agent-seed"}
# AgentSDConfig fields with a fixed set of values, any case; "auto" (or "none", "null") stands for None.
CHOICE_FLAGS = {
    "attn_precision": ["auto", "fp32"],
    "attention_backend": ["auto", "sdpa", "xformers", "einsum"],
    "agent_selection": ["match", "pool"],
}


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr, exit code 2."""


# One line per AgentSDConfig field, for --help (the config's docstring has the details).
FIELD_HELP = {
    "ratio": "fraction of tokens merged away before attention in the agent phase, in [0, 1)",
    "agent_ratio": "fraction of tokens merged away to form the agents, in [0, 1)",
    "sx": "destination-cell width in tokens (one destination per cell)",
    "sy": "destination-cell height in tokens",
    "max_downsample": "patch levels downsampled at most this much: 1, 2, 4 or 8 (SDXL needs 2)",
    "k_scale2": "the broadcast softmax uses scale (d ** -0.5) ** k_scale2, > 0",
    "k_shortcut": "weight of the value shortcut added to the agent output, >= 0",
    "use_rand": "random destination inside each cell",
    "seed": "seed of agentsd's own destination draws (not the images': see --seed)",
    "attn_precision": "fp32: both softmaxes in float32; auto: fp32 where the layer upcasts (SD 2.x)",
    "agent_steps": "fraction of the trajectory, from the noisiest end, in the agent phase, in [0, 1]",
    "late_ratio": "ToMe merge ratio after the agent phase, in [0, 1); 0: exact attention there",
    "late_sx": "destination-cell width after the agent phase",
    "late_sy": "destination-cell height after the agent phase",
    "attention_backend": "kernel of both attention products; xformers needs the package and CUDA; "
    "auto: xformers where the replaced processor was xformers' on CUDA, else sdpa",
    "min_tokens": "layers whose grid has fewer tokens run exact attention",
    "share_matching": "opt-in, changes outputs: one bipartite matching per grid and UNet call",
    "agent_selection": "pool (opt-in, changes outputs): agents are the cell means instead of a merge",
    "block_range": "diffusion transformers (SD3, PixArt, Flux, Wan): patch blocks START to STOP-1; UNets ignore it",
    "st": "destination-cell depth in frames (video models; image models ignore it)",
    "late_st": "destination-cell depth in frames after the agent phase (video models)",
}
BENCH_METHODS = {
    "baseline": "diffusers' default processors (SDPA)",
    "xformers": "diffusers' xformers processors (CUDA with xformers installed; UNets only)",
    "agentsd-agent": "the preset in its agent phase",
    "agentsd-tome": "the preset in its ToMe-only phase",
    "tomesd": "ToMe for SD at the preset's ratio (when tomesd is installed; UNets only)",
    "reference": "the agent phase with unfused einsum attention, as the published code computes it",
    "ceiling": "the patched attention layers replaced by a zero-cost stand-in: the bound",
    "agentsd-shared": "agent phase, one matching per grid and UNet call (share_matching)",
    "agentsd-pool": "agent phase, pooled agents (agent_selection=pool)",
    "agentsd-pool-r0": "agent phase, pooled agents and no merge: no matching at all",
    "highres": "the highres preset (two levels, agent phase on every step)",
    "ceiling-2": "the ceiling over two levels: the bound of highres",
    "ceiling-products": "the patched layers with their attention products costing nothing (projections kept)",
}
DTYPE_CHOICES = ["fp16", "bf16", "fp32"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, except None and False (nothing to show: the help says what happens),
    and descriptions and epilogs laid out as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        if isinstance(action.default, list):  # as typed on the command line, not as a Python list
            return f"{action.help} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class _ArchAtDepth(argparse.Action):
    """`bench --arch` and `--blocks`: `args.arch` lists the architectures as
    `benchmark.run_benchmark` takes them, each diffusion transformer cut to its first --blocks
    blocks (`sd35-medium:2`), whichever of the two flags comes first."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ..bench.benchmark import split_arch, with_blocks

        setattr(namespace, self.dest, values)
        if namespace.blocks is not None and namespace.blocks < 1:
            parser.error(f"--blocks {namespace.blocks} must be positive")
        archs = with_blocks(namespace.arch_names, namespace.blocks)
        try:
            for arch in archs:
                split_arch(arch)
        except ValueError as err:
            parser.error(str(err).rstrip("."))
        namespace.arch = archs


def bench_size(text: str) -> int | tuple[int, int]:
    """A `bench --sizes` value: `512` (a square image's side, px) or `480x832` (a video's height x width)."""
    height, sep, width = text.lower().partition("x")
    try:
        return (int(height), int(width)) if sep else int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not PX or HxW (e.g. 512 or 480x832)") from None


def config_flag(field: str) -> str:
    """The command-line flag of an AgentSDConfig field: `--ratio`, `--agent-seed`."""
    return "--" + FLAG_NAMES.get(field, field.replace("_", "-"))


def config_dest(field: str) -> str:
    """Where the parsed flag of an AgentSDConfig field lands: its own name, never another flag's
    (`--agent-seed` goes to `agent_seed`; `seed` belongs to `--seed`)."""
    return config_flag(field)[2:].replace("-", "_")


def _automatic_choice(text: str) -> str:
    """A choice flag's value in lower case, with AgentSDConfig's words for None spelled "auto"."""
    from ..core.config import AUTOMATIC_WORDS

    text = text.strip().lower()
    return "auto" if text in AUTOMATIC_WORDS else text


def _config_flags(parser: argparse.ArgumentParser) -> None:
    from ..core.config import AgentSDConfig

    group = parser.add_argument_group(
        "agent attention (each flag overrides one field of the preset; the defaults shown are paper's)"
    )
    group.add_argument(
        "--preset",
        help="preset name (see `agentsd presets`) or a YAML file; default: the model's, paper for SD 1.x/2.x, "
        "sdxl for SDXL, sd3 for SD 3/3.5, pixart for PixArt, flux for Flux, wan for Wan",
    )
    group.add_argument("--no-agent", action="store_true", help="run the baseline only, without agent attention")
    for f in dataclasses.fields(AgentSDConfig):
        flag, dest = config_flag(f.name), config_dest(f.name)
        paper = "auto" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
        paper = "every block" if f.name == "block_range" else paper
        text = f"{FIELD_HELP[f.name]} (paper: {paper})"
        if f.type in (bool, "bool"):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name == "block_range":
            group.add_argument(flag, dest=dest, type=int, nargs=2, metavar=("START", "STOP"), default=None, help=text)
        elif f.name in CHOICE_FLAGS:
            kind = _automatic_choice if "auto" in CHOICE_FLAGS[f.name] else str.lower
            group.add_argument(flag, dest=dest, type=kind, choices=CHOICE_FLAGS[f.name], default=None, help=text)
        else:
            kind = int if isinstance(f.default, int) else float
            group.add_argument(flag, dest=dest, type=kind, default=None, help=text)


def _run_flags(parser: argparse.ArgumentParser, device_help: str) -> None:
    """--steps, --guidance, --width, --height, --frames, --fps, --batch-size, --scheduler,
    --max-sequence-length, --dtype, --device, --context-parallel, --cache."""
    from ..api.caches import CACHES, cache_names
    from .parallel import MODES
    from .schedulers import FLOW_SCHEDULERS, SCHEDULERS
    from .video import DEFAULT_FPS

    parser.add_argument("--width", type=int, help="image width, a multiple of 8 (16 on SD 3, PixArt, Flux, Wan); "
                        "default: the model's")  # fmt: skip
    parser.add_argument("--height", type=int, help="image height, a multiple of 8 (16 on SD 3, PixArt, Flux, Wan); "
                        "default: the model's")  # fmt: skip
    parser.add_argument("--frames", type=int, help="video models (Wan): frames per video, 4k+1 (e.g. 17, 33, 81); "
                        "default: the pipeline's (Wan: 81)")  # fmt: skip
    parser.add_argument("--fps", type=int, help=f"video models (Wan): the MP4's frames per second; default: "
                        f"{DEFAULT_FPS} (Wan 2.1's; Wan 2.2 TI2V 5B makes 24)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument(
        "--guidance",
        type=float,
        help="guidance scale (classifier-free; Flux.1-dev's distilled guidance); default: the pipeline's own "
        "(SD 1.x/2.x 7.5, SDXL 5.0, SD 3 7.0, PixArt 4.5, Flux 3.5)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    others = [name for name in SCHEDULERS if name not in FLOW_SCHEDULERS]
    parser.add_argument(
        "--scheduler",
        help=f"SD 1.x/2.x/XL and PixArt: {', '.join(others)}; SD 3/3.5 and Flux (flow matching): "
        f"{', '.join(FLOW_SCHEDULERS)}; default: the model's own",
    )
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        help="T5 prompt tokens of SD 3/3.5, PixArt, Flux and Wan (umT5) (fewer: faster, longer prompts cut); "
        "default: the pipeline's (SD 3: 256, PixArt-Sigma: 300, PixArt-alpha: 120, Flux: 512, Wan: 512)",
    )
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--device", default="auto", help=device_help)
    parser.add_argument("--context-parallel", choices=MODES, help="split each image's (video's) tokens "
                        "over the P processes of `torchrun --nproc_per_node P -m agentsd ...` with diffusers' context "
                        "parallelism, degree P (Flux, Wan); rank 0 writes the files")  # fmt: skip
    names = ", ".join(f"{name} ({CACHES[name].number}, default {CACHES[name].default:g})" for name in cache_names())
    parser.add_argument("--cache", metavar="NAME[:NUMBER]", help="a step cache (Flux, Wan; see README, Stacking): "
                        f"{names or 'none installed'}; generate: every run under it; compare: the methods cache and "
                        "cache+METHOD")  # fmt: skip


def _bench_epilog() -> str:
    from ..bench.benchmark import METHODS, OPTIONAL_METHODS

    def rows(names):
        return "\n".join(f"  {name:17s} {BENCH_METHODS.get(name, '')}".rstrip() for name in names)

    return (
        "methods (default: every one of these that runs here; agentsd-schedule is derived from the two phases):\n"
        f"{rows(METHODS)}\n"
        f"opt-in methods (run only when named in --methods):\n{rows(OPTIONAL_METHODS)}\n\n"
        "output, rewritten in --out after every scenario (an interrupted run keeps what finished):\n"
        "  results.json, results.csv  one row per scenario and method: median, p10, p90 ms, peak MB, speedup\n"
        "  results.md                 the table and the speed targets read off it (also printed)\n"
        "  speedup.png                speedup per method and size"
    )


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..bench.benchmark import DEFAULT_PRESETS, METHODS, OPTIONAL_METHODS
    from ..bench.transformer_models import ALL_TRANSFORMERS, largest_size
    from .loading import DEFAULT_MODEL
    from .metrics import INCEPTION_FILE

    formatter = _HelpFormatter
    parser = _Parser(
        prog="agentsd",
        description="Training-free agent attention for diffusers pipelines: Stable Diffusion 1.x, 2.x, XL, "
        "3 / 3.5, PixArt, Flux.1 and Wan 2.1 / 2.2 (video).",
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    gen = commands.add_parser(
        "generate", help="text-to-image (or -video) with agent attention", formatter_class=formatter,
        description="Text-to-image (or text-to-video) with agent attention (or the baseline), images written as "
        "they finish.",
        epilog="output: OUT/p{prompt index}_s{seed}.png, each with a .json sidecar (and the same record in the "
        "PNG);\na video model's: OUT/p{prompt index}_s{seed}.mp4, a contact sheet of its frames as .png (up to 25 "
        "frames:\nall, or every k-th) and the .json sidecar. With --compare also OUT/baseline/ and side-by-side "
        "pairs\n(baseline left) in OUT/compare/ (videos: the frame pairs as .mp4 and their contact sheet as .png).",
    )  # fmt: skip
    gen.add_argument(
        "--model", default=DEFAULT_MODEL, help="hub id or local folder of a text-to-image model (SD 1.x, 2.x, XL, "
        "3 / 3.5, PixArt or Flux.1) or text-to-video model (Wan 2.1 / 2.2)",
    )  # fmt: skip
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for more")
    gen.add_argument("--prompts-file", help="a UTF-8 text file with one prompt per line")
    gen.add_argument(
        "--negative-prompt",
        help="the negative prompt of every image (it needs classifier-free guidance: --guidance above 1; on Flux, "
        "--true-cfg-scale)",
    )
    gen.add_argument(
        "--true-cfg-scale", type=float,
        help="Flux: true classifier-free guidance with --negative-prompt, above 1 (e.g. 4; the transformer then runs "
        "twice per step); default: the pipeline's, none",
    )  # fmt: skip
    gen.add_argument("--seed", type=int, default=0, help="image k of every prompt uses seed + k")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt")
    _run_flags(gen, "auto, cpu, cuda or cuda:N (CUDA requested without CUDA: the CPU, with a warning)")
    gen.add_argument("--out", default="agentsd-out", help="output folder")
    gen.add_argument(
        "--overwrite", action="store_true",
        help="make every existing image in --out again (without it, images made with these settings are skipped, "
        "and images made with others stop the run, naming the settings that differ)",
    )  # fmt: skip
    gen.add_argument("--compare", action="store_true", help="also run the baseline; save both and a side-by-side")
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    _config_flags(gen)

    bench = commands.add_parser(
        "bench", help="time one denoising step against the baseline and peers", formatter_class=formatter,
        description="Time one denoising step (a UNet or transformer forward of a classifier-free-guidance batch;\n"
        "Flux.1-dev, guidance-distilled: one sample per image; Wan: one of the two transformer calls of a step,\n"
        "one sample per video) of the real SD, Flux and Wan architectures with random weights, every method\n"
        "interleaved in one run.",
        epilog=_bench_epilog(),
    )  # fmt: skip
    archs = list(DEFAULT_PRESETS)  # every architecture the benchmark builds, the tiny stand-ins too
    bench.add_argument("--arch", nargs="+", default=["sd15"], choices=archs, metavar="ARCH", dest="arch_names",
                       action=_ArchAtDepth,
                       help=f"{', '.join(archs)} (wan*: the Wan 2.1 T2V 1.3B and 14B and Wan 2.2 TI2V 5B video "
                       "transformers; tiny*: toy widths of sd15, sd21, sdxl, sd35-medium, pixart-sigma, flux-dev, "
                       "wan2.1 and wan2.2, for trying the harness; the sizes each takes: see --sizes)")  # fmt: skip
    bench.add_argument(
        "--blocks", type=int, metavar="K", action=_ArchAtDepth,
        help="build the diffusion transformers (sd35-*, pixart-sigma, flux-dev, wan*) at their first K blocks, real "
        "widths kept: speed per block, for models too large for memory (SD 3.5 Medium's first 13 blocks are "
        "dual-attention, as in the model; flux-dev: K double-stream and 2K single-stream blocks, K up to 19); "
        "UNets are built whole",
    )  # fmt: skip
    bench.set_defaults(arch=["sd15"])
    bounded = ", ".join(f"{arch} up to {largest_size(arch)}" for arch in ALL_TRANSFORMERS if largest_size(arch))
    images = ", ".join(arch for arch, spec in ALL_TRANSFORMERS.items() if not spec.video)
    bench.add_argument(
        "--sizes",
        nargs="+",
        type=bench_size,
        metavar="SIZE",
        help=f"image sides in pixels (PX, a square), multiples of 8; the image transformers ({images}) take "
        f"multiples of 16, {bounded}. Videos (wan*): HxW, height x width in pixels (one PX: a square video), "
        "multiples of 16 (wan2.2-5b: of 32, its VAE compresses 16x); default: 512 for images, 480x832 (480p) for "
        "videos",
    )
    bench.add_argument(
        "--frames",
        nargs="+",
        type=int,
        metavar="F",
        help="video frames of the video transformers (wan*), 4k+1 as the Wan pipelines' num_frames: (F-1)/4+1 "
        "latent frames (17 frames: 5 latent, 81: 21); every size is timed at every count; default: 81",
    )
    bench.add_argument(
        "--batches",
        nargs="+",
        type=int,
        metavar="N",
        default=[1],
        help="images per prompt (model batch x2, for guidance; flux-dev x1; wan*: videos, one of a step's two "
        "transformer calls, x1)",
    )
    bench.add_argument("--methods", nargs="+", choices=METHODS + OPTIONAL_METHODS, metavar="METHOD",
                       help="methods to time (listed below); default: every method that runs here")  # fmt: skip
    bench.add_argument(
        "--preset",
        help="agentsd preset name or YAML file; default per arch: paper, sd21, sdxl, sd3 (sd35-*), pixart, flux, "
        "wan (wan*)",
    )
    bench.add_argument("--repeats", type=int, default=3, help="timed rounds per method (the median is reported)")
    bench.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds per method first (0: one untimed call of the plain UNet)"
    )
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (CUDA requested: no fallback)")
    bench.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: fp16 on CUDA, fp32 on the CPU")
    bench.add_argument(
        "--compile", nargs="?", const="inductor", metavar="BACKEND",
        help="also time every method under torch.compile (BACKEND defaults to inductor)",
    )  # fmt: skip
    bench.add_argument("--out", default="bench-out", help="output folder")
    bench.add_argument(
        "--context-parallel", type=int, metavar="P",
        help="run flux-dev or wan* (or tiny-flux, tiny-wan*) under diffusers' context parallelism over P processes: "
        "the baseline (diffusers' exact attention across the ranks), agentsd-agent and agentsd-tome, each timed per "
        "forward and its elements sent per rank counted per layer and per forward; started through `python -m "
        "torch.distributed.run --standalone --nproc_per_node P` unless already under torchrun",
    )  # fmt: skip
    bench.add_argument("--context-parallel-mode", nargs="+", choices=["ulysses", "ring"], metavar="MODE",
                       help="with --context-parallel: ulysses (all-to-alls, the heads split over the ranks) and/or "
                       "ring (keys and values gathered); default: both")  # fmt: skip
    bench.add_argument("--cache", metavar="NAME[:N]",
                       help="time a step cache (first-block:0.05, taylorseer:5, ...; flux-dev and wan*) alone and "
                       "with agentsd (its agent phase) beside the baseline and agentsd alone, per computed and per "
                       "skipped step, instead of the methods")  # fmt: skip
    bench.add_argument("--skip-fraction", nargs="+", type=float, metavar="F",
                       help="with --cache: the fractions of steps the cache skips on your model (random weights "
                       "decide nothing; `agentsd compare --cache` records it), each read as a step of (1 - F) "
                       "computed + F skipped; default: 0.5")  # fmt: skip

    cmp = commands.add_parser(
        "compare", help="FID, fidelity and speed of methods on one prompt set", formatter_class=formatter,
        description="Generate every method's images with the same prompts and seeds, then score them from "
        "the files.",
        epilog="output in --out: images/<method>/, results.json (with the settings the images were made with),\n"
        "results.md (also printed), fid_vs_time.png (needs matplotlib; skipped with a warning without it) and\n"
        "samples.png. A rerun resumes: it reuses the images made with the same settings (each image's .json\n"
        "sidecar says how it was made) and stops, naming the settings, at images made with others.\n"
        "Video models (Wan): videos as generate writes them, scored frame by frame (PSNR, SSIM, LPIPS, CLIP);\n"
        "FVD is not computed (it needs I3D weights that agentsd does not download), FID (--reference) refused.",
    )  # fmt: skip
    cmp.add_argument(
        "--model", default=DEFAULT_MODEL, help="hub id or local folder of a text-to-image model (SD 1.x, 2.x, XL, "
        "3 / 3.5, PixArt or Flux.1) or text-to-video model (Wan 2.1 / 2.2)",
    )  # fmt: skip
    cmp.add_argument("--method", action="append",
                     help="baseline, a preset (paper), preset:field=value,..., agentsd:field=value, tomesd:RATIO; "
                     "repeatable; default: baseline and the model's preset (as generate's --preset)")  # fmt: skip
    cmp.add_argument("--prompts-file", help="a UTF-8 file, one prompt per line; default: the ImageNet protocol")
    cmp.add_argument("--images-per-class", type=int, default=2, help="ImageNet protocol: prompts per class")
    cmp.add_argument("--num-prompts", type=int, help="use only the first N prompts (a quick run)")
    cmp.add_argument("--reference", help="FID reference: a folder of images or a .npz of mu and sigma")
    cmp.add_argument("--inception-weights", help=f"local path of {INCEPTION_FILE}")
    cmp.add_argument("--clip-model", help="CLIP model folder or hub id, for the CLIP score")
    cmp.add_argument("--lpips", action="store_true", help="also LPIPS to the baseline (needs torchvision)")
    cmp.add_argument("--no-memory", action="store_true", help="skip the peak-memory-per-image measurement")
    cmp.add_argument("--samples", type=int, default=8, help="prompts in the sample grid")
    cmp.add_argument("--seed", type=int, default=0, help="image k uses seed + k")
    _run_flags(cmp, "auto (accelerate's device for this process), cpu, cuda or cuda:N")
    cmp.add_argument("--out", default="compare-out", help="output folder")
    cmp.add_argument(
        "--overwrite", action="store_true",
        help="make again the images in --out made with other settings (without it they stop the run, naming the "
        "settings that differ); images made with these settings are reused either way",
    )  # fmt: skip
    cmp.set_defaults(prompt=None)

    commands.add_parser("presets", help="list the preset configs", formatter_class=formatter)
    commands.add_parser("env", help="print versions and the CUDA device, for bug reports", formatter_class=formatter)
    return parser
