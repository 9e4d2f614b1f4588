#!/usr/bin/env bash
# THE one command for a GPU machine without network: install what agentsd needs from the wheel
# folder that travels with the checkout, run the whole GPU suite in priority order within a
# budget, and leave OUT packed (at most 8 plain files: results.tar.gz, summary.md, suite.log,
# install.log).
#
#     bash scripts/gpu_run.sh OUT [gpu_suite.py options, e.g. --scenarios ... or --tiny]
#
# Environment (all optional):
#   AGENTSD_WHEELS  the wheel folder (default: wheelhouse/ in the checkout, which
#                   `scripts/wheelhouse.sh` fills and which travels as `carry: ["wheelhouse"]`)
#   AGENTSD_BUDGET  whole seconds the suite may take (default 480: with the install, the start-up
#                   and the hard limit below, the command ends inside a 10-minute limit)
#   PYTHON          the interpreter that has torch (default python3)
#
# The install changes nothing in the machine's environment and downloads nothing: pip itself
# decides, against that environment, what `agentsd[bench]` lacks (`pip install --dry-run
# --report`, pip >= 22.2): on the GPU machine agentsd, diffusers, tomesd, importlib-metadata and
# lazy-importer, never torch, transformers or anything installed already. Those wheels (and
# agentsd's in any case) go into a fresh folder put first on PYTHONPATH (`pip install --target
# --no-deps --no-index`). Where everything is installed already (a developer's venv, CI), only
# agentsd's wheel is. The suite itself runs the checkout's agentsd (scripts/gpu_suite.py
# puts the checkout first), whose commit it records: from git where the checkout has its .git,
# else from the wheel folder's agentsd-commit.txt (written by scripts/wheelhouse.sh).
#
# A hard limit of the budget + 60 s (`timeout`: SIGTERM, then SIGKILL 20 s later) stops a run
# that outlasts its estimates: on SIGTERM the suite packs what finished, and after a SIGKILL OUT
# still holds everything packed after the last finished scenario.
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUT [gpu_suite.py options]" >&2
    exit 2
fi
out=$1
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
wheels=${AGENTSD_WHEELS:-$root/wheelhouse}
budget=${AGENTSD_BUDGET:-480}
python=${PYTHON:-python3}
mkdir -p "$out"
log="$out/install.log"

fail() {
    echo "gpu_run: $*" | tee -a "$log" >&2
    exit 1
}

[[ $budget =~ ^[0-9]+$ ]] || fail "AGENTSD_BUDGET must be whole seconds, got '$budget'."
shopt -s nullglob
agentsd_wheels=("$wheels"/agentsd-*.whl)
shopt -u nullglob
[[ ${#agentsd_wheels[@]} -eq 1 ]] || fail "want one agentsd wheel in $wheels, found ${#agentsd_wheels[@]}: run \
scripts/wheelhouse.sh (it fills wheelhouse/) or point AGENTSD_WHEELS at such a folder."

site=$(mktemp -d "${TMPDIR:-/tmp}/agentsd-site.XXXXXX")
report="$site.report.json"
echo "gpu_run: installing into $site from $wheels" | tee "$log"
"$python" -m pip install --quiet --dry-run --no-index --find-links "$wheels" --report "$report" 'agentsd[bench]' \
    >>"$log" 2>&1 || fail "pip could not resolve agentsd[bench] from $wheels next to what is installed: see $log."
# What pip would install (agentsd's wheel too, where another agentsd is installed already).
install=()
while IFS= read -r wheel; do install+=("$wheel"); done < <("$python" - "$report" "${agentsd_wheels[0]}" <<'EOF'
import json
import os
import sys
from urllib.parse import unquote, urlparse

wheels = [unquote(urlparse(i["download_info"]["url"]).path) for i in json.load(open(sys.argv[1]))["install"]]
print("\n".join(dict.fromkeys(os.path.realpath(w) for w in [sys.argv[2], *wheels])))
EOF
)
echo "gpu_run: installing ${install[*]##*/}" | tee -a "$log"
"$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${install[@]}" \
    >>"$log" 2>&1 || fail "installing the wheels failed: see $log."
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

if [[ -z ${AGENTSD_COMMIT:-} ]] && ! git -C "$root" rev-parse --short HEAD >/dev/null 2>&1; then
    if [[ -f $wheels/agentsd-commit.txt ]]; then
        AGENTSD_COMMIT=$(<"$wheels/agentsd-commit.txt")
        export AGENTSD_COMMIT
    fi
fi

limit=()
if command -v timeout >/dev/null; then
    limit=(timeout --signal=TERM --kill-after=20 $((budget + 60)))
fi
PYTHONUNBUFFERED=1 "${limit[@]}" "$python" "$root/scripts/gpu_suite.py" --budget "$budget" --out "$out" "$@"
status=$?
rm -rf "$site" "$report"
if [[ $status -eq 124 || $status -eq 137 ]]; then
    echo "gpu_run: the suite outlasted ${budget} + 60 s and was stopped; OUT holds what finished:"
    cat "$out/summary.md" 2>/dev/null
fi
echo "gpu_run: suite exit code $status; $out holds:"
ls -l "$out"
exit $status
