"""The argument parser of the `agentsd` command line: every subcommand and flag."""

from __future__ import annotations

import argparse
import dataclasses

# AgentSDConfig fields whose flag name differs from the field name (`--seed` seeds the images).
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


def config_flag(field: str) -> str:
    """The command-line flag of an AgentSDConfig field: `--ratio`, `--agent-seed`."""
    return "--" + FLAG_NAMES.get(field, field.replace("_", "-"))


def config_dest(field: str) -> str:
    """Where the parsed flag of an AgentSDConfig field lands: its own name, never another flag's
    (`--agent-seed` goes to `agent_seed`; `seed` belongs to `--seed`)."""
    return config_flag(field)[2:].replace("-", "_")


def _config_flags(parser: argparse.ArgumentParser) -> None:
    from .config import AgentSDConfig

    group = parser.add_argument_group("agent attention (override the preset's fields)")
    group.add_argument("--preset", help="preset name (see `agentsd presets`) or a YAML file; default: paper")
    group.add_argument("--no-agent", action="store_true", help="run the baseline only, without agent attention")
    for f in dataclasses.fields(AgentSDConfig):
        flag, dest = config_flag(f.name), config_dest(f.name)
        if f.type in (bool, "bool"):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None)
        elif f.name in CHOICE_FLAGS:
            note = "auto: None" if "auto" in CHOICE_FLAGS[f.name] else f"AgentSDConfig.{f.name}"
            group.add_argument(flag, dest=dest, choices=CHOICE_FLAGS[f.name], default=None, help=note)
        else:
            kind = int if isinstance(f.default, int) else float
            group.add_argument(flag, dest=dest, type=kind, default=None, help=f"AgentSDConfig.{f.name}")


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
    cmp.set_defaults(prompt=None)

    commands.add_parser("presets", help="list the preset configs", formatter_class=formatter)
    commands.add_parser("env", help="print versions and the CUDA device, for bug reports")
    return parser
