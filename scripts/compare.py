"""Quality comparison: the same as `agentsd compare` (see `agentsd compare --help`).

accelerate launch scripts/compare.py --method baseline --method paper --reference ref/ --out table
"""

import sys

from agentsd.cli.commands import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
