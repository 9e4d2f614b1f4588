"""Write README's "Tested stacks" table from .ci/stacks.txt, the one place the versions are written.

    python scripts/stacks_table.py          # rewrites the table in README.md
    python scripts/stacks_table.py --check  # exit 1 when README.md's table differs from the file

Only the part of README.md between the `tested-stacks` markers is replaced.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STACKS = ROOT / ".ci" / "stacks.txt"
README = ROOT / "README.md"
START, END = "<!-- tested-stacks:start -->", "<!-- tested-stacks:end -->"
PACKAGES = ("diffusers", "transformers", "huggingface_hub", "accelerate", "torch")
MAIN = "main"


@dataclass(frozen=True)
class Stack:
    job: str
    versions: dict[str, str]


def read_stacks(path: Path = STACKS) -> list[Stack]:
    """The stacks of `path`: one per line, `job` then a version for each of PACKAGES; `#` comments."""
    stacks = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#")[0].split()
        if not fields:
            continue
        if len(fields) != 1 + len(PACKAGES):
            names = ", ".join(PACKAGES)
            raise ValueError(f"{path}:{number}: expected a job name and {len(PACKAGES)} versions ({names})")
        stacks.append(Stack(fields[0], dict(zip(PACKAGES, fields[1:], strict=True))))
    jobs = [s.job for s in stacks]
    if MAIN not in jobs or len(set(jobs)) != len(jobs):
        raise ValueError(f"{path}: needs one `{MAIN}` line and distinct job names, got {jobs}")
    return stacks


def oldest(stacks: list[Stack]) -> Stack:
    """The stack with the oldest diffusers."""
    return min(stacks, key=lambda s: version_tuple(s.versions["diffusers"]))


def version_tuple(version: str) -> tuple[int, ...]:
    """`0.19.3` -> (0, 19, 3); trailing zeros dropped, so `4.31` and `4.31.0` compare equal."""
    parts = [int(p) for p in version.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def render(stacks: list[Stack]) -> str:
    rows = [
        "| CI job | " + " | ".join(PACKAGES) + " | runs |",
        "|---" * (len(PACKAGES) + 2) + "|",
    ]
    for stack in stacks:
        if stack.job == MAIN:
            runs = "the whole suite (the default one, then the slow job), newest releases (the versions last seen)"
        else:
            runs = "the smoke subset, pinned"
        rows.append(f"| `{stack.job}` | " + " | ".join(stack.versions[p] for p in PACKAGES) + f" | {runs} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when README.md differs")
    args = parser.parse_args()
    readme = README.read_text()
    if readme.count(START) != 1 or readme.count(END) != 1:
        print(f"README.md needs exactly one {START} and one {END} line.", file=sys.stderr)
        return 1
    head, rest = readme.split(START)
    updated = f"{head}{START}\n{render(read_stacks())}\n{END}{rest.split(END)[1]}"
    if args.check:
        if updated != readme:
            print("README.md's tested-stacks table differs from .ci/stacks.txt: run python scripts/stacks_table.py")
            return 1
        return 0
    README.write_text(updated)
    print("README.md: tested-stacks table written.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
