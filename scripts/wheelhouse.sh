#!/usr/bin/env bash
# A folder of wheels to install agentsd on a machine without internet (a cluster's compute
# node) that already has torch and transformers:
#
#     scripts/wheelhouse.sh DIR [PYTHON_VERSION]      # here, with internet (default Python 3.12)
#     pip install --no-index --find-links DIR 'agentsd[bench]' DeepCache    # there
#
# It downloads, for the given Python version, the pure-Python wheels agentsd needs beyond
# torch: diffusers, ToMe for SD and DeepCache (the benchmark's and tests' peers), and the
# pure-Python requirements of diffusers that a torch + transformers installation may lack
# (importlib-metadata, requests and theirs; a huggingface-hub recent enough for diffusers),
# then builds agentsd's own wheel from this checkout. Compiled packages (torch, numpy,
# safetensors, pillow, pyyaml, tokenizers) are not fetched: they must match the target's
# platform and come with its torch / transformers. Where one is missing, pip names it.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 DIR [PYTHON_VERSION]   (default PYTHON_VERSION: 3.12)" >&2
    exit 2
fi
dir=$1
python_version=${2:-3.12}
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$dir"

# The versions tested with this checkout; the others as diffusers requires them.
wheels=(
    "diffusers==0.42.1"
    "tomesd==0.1.3"
    "DeepCache==0.1.1"
    "huggingface-hub>=1.32.0,<3.0"
    "importlib-metadata"
    "zipp>=3.20"
    "lazy-importer>=0.1"
    "requests"
    "charset-normalizer>=2,<4"
    "idna>=2.5,<4"
    "urllib3>=1.26,<3"
    "certifi>=2023.5.7"
)
# --no-deps: dependencies would pull torch (several GB) and platform wheels. --only-binary
# is required with --python-version; --platform any takes only pure-Python wheels (every
# package listed has one), which install on any platform.
python3 -m pip download --quiet --no-deps --only-binary=:all: --platform any --python-version "$python_version" \
    --dest "$dir" "${wheels[@]}"
python3 -m pip wheel --quiet --no-deps --wheel-dir "$dir" "$root"

echo "wheels in $dir:"
ls -1 "$dir"
echo "install there with: pip install --no-index --find-links $dir 'agentsd[bench]' DeepCache"
