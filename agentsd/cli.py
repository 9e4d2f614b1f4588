"""The `agentsd` command line."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentsd",
        description="Training-free agent attention for diffusers Stable Diffusion pipelines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = commands.add_parser("env", help="print versions and the CUDA device, for bug reports")
    env.set_defaults(run=_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 1
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
