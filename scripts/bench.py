"""Speed and memory benchmark: the same as `agentsd bench` (see `agentsd bench --help`).

python scripts/bench.py --arch sd15 --sizes 512 768 --out docs/bench/cpu
"""

import sys

from agentsd.cli.commands import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
