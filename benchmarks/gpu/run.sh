#!/usr/bin/env bash
# One command on the GPU host: overlay the packages medtune needs on the host's torch, then measure.
#
#   benchmarks/gpu/run.sh RESULTS_DIR [--dry-run] [--wheels DIR] [--budget-s 420] [--cases A,B]
#
# RESULTS_DIR receives gpu_bench.json (rewritten after every case) and log.txt. --wheels is the folder
# benchmarks/gpu/fetch_wheels.sh filled (default: .whl at the repository root). Nothing is fetched from
# the network: wheels are installed with --no-index from that folder only, and only those whose
# package the host lacks at that exact version (torch, triton and nvidia-* are never replaced).
# medtune itself runs from this checkout's src/ (PYTHONPATH), the same as `pip install --no-deps -e .`
# without a build step. --dry-run does the same install, then runs every case on the CPU with tiny
# models (CUDA hidden), for checking this script on a machine without a GPU. See README.md here.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}

usage() { sed -n '4,5p' "$0" | sed 's/^# //'; }

results="" dry_run=0 wheels="$REPO/.whl" budget=420 cases=""
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --wheels) wheels=$2; shift ;;
    --budget-s) budget=$2; shift ;;
    --cases) cases=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [ -z "$results" ] || { echo "run.sh: one results folder only" >&2; exit 2; }; results=$1 ;;
  esac
  shift
done
[ -n "$results" ] || { usage >&2; exit 2; }
mkdir -p "$results"
results=$(cd "$results" && pwd)

# Wheels in $1 whose distribution is not installed here at that version (the host's torch stack stays).
select_wheels() {
  "$PYTHON" - "$1" <<'PY'
import importlib.metadata as md, pathlib, re, sys
protected = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*)$")
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    dist = re.sub(r"[-_.]+", "-", name).lower()
    if protected.match(dist):
        continue
    try:
        have = md.version(dist)
    except md.PackageNotFoundError:
        have = None
    if have != version:
        print(wheel)
PY
}

site=$(mktemp -d "${TMPDIR:-/tmp}/medtune-gpu-site.XXXXXX")
installed=()
if [ -d "$wheels" ]; then
  mapfile -t installed < <(select_wheels "$wheels")
fi
if ((${#installed[@]})); then
  echo "installing from $wheels: ${installed[*]##*/}"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${installed[@]}"
else
  echo "no wheels to install (folder ${wheels}: $( [ -d "$wheels" ] && echo present || echo absent ))"
fi
export PYTHONPATH="$site:$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
export MEDTUNE_GPU_INSTALLED="${installed[*]##*/}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

args=("$results" --budget-s "$budget")
((dry_run)) && args+=(--dry-run)
[ -n "$cases" ] && args+=(--cases "$cases")
if ((dry_run)); then
  export CUDA_VISIBLE_DEVICES=""
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$results/gpu.txt" 2>&1 || true
fi
# The budget stops new cases; this stops a case stuck past it, leaving the JSON of the finished ones.
set +e
timeout -k 10 "$((${budget%.*} + 120))" "$PYTHON" "$HERE/measure.py" "${args[@]}" 2>&1 | tee "$results/log.txt"
status=${PIPESTATUS[0]}
set -e
rm -rf "$site"
exit "$status"
