#!/usr/bin/env bash
# A folder of wheels to install agentsd on a machine without internet (a cluster's compute
# node, the project's GPU machine) that already has torch and transformers:
#
#     scripts/wheelhouse.sh [DIR [PYTHON_VERSION]]   # here, with internet (default: wheelhouse/, Python 3.12)
#     pip install --no-index --find-links DIR 'agentsd[bench]' DeepCache cache-dit    # there
#
# (`bash scripts/gpu_run.sh OUT` installs from wheelhouse/ itself, without touching the machine's
# environment.) It downloads, for the given Python version, the pure-Python wheels agentsd needs
# beyond torch: diffusers, ToMe for SD, DeepCache and cache-dit (the benchmark's and tests' peers), and the
# pure-Python requirements of diffusers that a torch + transformers installation may lack
# (importlib-metadata and lazy-importer, requests and theirs; a huggingface-hub recent enough for
# diffusers and still accepted by transformers 5), then builds agentsd's own wheel from this
# checkout (an older agentsd wheel in DIR is replaced) and writes the checkout's commit to
# DIR/agentsd-commit.txt (the suite records it where the checkout travels without its .git).
# Compiled packages (torch, numpy, safetensors, pillow, pyyaml, tokenizers, regex) are not
# fetched: they must match the target's platform and come with its torch / transformers. Where
# one is missing, pip names it. Rerun it after every commit that is to be measured.
set -euo pipefail

if [[ $# -gt 2 ]]; then
    echo "usage: $0 [DIR [PYTHON_VERSION]]   (defaults: wheelhouse/ in the checkout, 3.12)" >&2
    exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
dir=${1:-$root/wheelhouse}
python_version=${2:-3.12}
mkdir -p "$dir"

# The versions tested with this checkout; the others as diffusers requires them.
wheels=(
    "diffusers==0.42.1"
    "tomesd==0.1.3"
    "DeepCache==0.1.1"
    "cache-dit==1.5.3"
    # diffusers 0.42 needs >= 1.32; transformers 5 needs < 2 (and huggingface-hub 2 needs httpx2).
    "huggingface-hub>=1.32.0,<2"
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
rm -f "$dir"/agentsd-*.whl  # one version of agentsd: two would stop the install
python3 -m pip wheel --quiet --no-deps --wheel-dir "$dir" "$root"
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ $commit != unknown && -n $(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    commit="$commit-dirty"
fi
echo "$commit" >"$dir/agentsd-commit.txt"

echo "wheels in $dir ($(du -sh "$dir" | cut -f1), agentsd at commit $commit):"
ls -1 "$dir"
echo "install there with: pip install --no-index --find-links $dir 'agentsd[bench]' DeepCache cache-dit"
