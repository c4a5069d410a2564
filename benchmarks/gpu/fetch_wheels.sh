#!/usr/bin/env bash
# Download, where pip reaches the internet, the wheels run.sh installs on the offline GPU host.
#
#   benchmarks/gpu/fetch_wheels.sh [DIR] [--full-bitsandbytes]
#
# DIR defaults to .whl at the repository root (added to .git/info/exclude, so it is never committed;
# name it in the device tool's `carry`). Versions come from constraints.txt; the wheels are for
# CPython 3.12 on manylinux x86_64, whatever this machine runs. Only what the GPU image lacks or has
# at an incompatible version is fetched (README.md here says why each one):
#   bitsandbytes  not on the image (QLoRA's 4-bit weights)
#   transformers  the image's 5.17 lacks activation_checkpointing_enable, which model/load.py calls
#   peft          pinned with that transformers
#   pydantic, pydantic_core, annotated-types, typing-inspection, typing_extensions   the run config
#   datasketch    imported by medtune.data (MinHash dedupe), on the import path of medtune.train
#   regex         transformers 5.24 needs >= 2025.10.22; the image's version is not known
#   liger-kernel, cut-cross-entropy   train.chunked_ce: liger / cce, the peers' fused losses (Triton)
# The bitsandbytes wheel (43 MB) carries kernels for CUDA 11.8-13.2 and ROCm; unless
# --full-bitsandbytes is given, it is repacked with the CPU and CUDA 13 libraries only (~9 MB), which
# keeps the folder well inside the 64 MiB a device call can carry.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
PACKAGES=(bitsandbytes transformers peft pydantic pydantic_core annotated-types typing-inspection
  typing_extensions datasketch regex liger-kernel cut-cross-entropy)

dir="$REPO/.whl" full=0
for arg in "$@"; do
  case "$arg" in
    --full-bitsandbytes) full=1 ;;
    -h|--help) sed -n '4,5p' "$0" | sed 's/^# //'; exit 0 ;;
    -*) echo "fetch_wheels.sh: unknown option $arg" >&2; exit 2 ;;
    *) dir=$arg ;;
  esac
done
mkdir -p "$dir"

# name==version for each package, from constraints.txt (names compared case- and -/_-insensitively).
pins=()
for package in "${PACKAGES[@]}"; do
  pin=$(tr 'A-Z_' 'a-z-' <"$REPO/constraints.txt" | grep -E "^$(tr 'A-Z_' 'a-z-' <<<"$package")==" || true)
  [ -n "$pin" ] || { echo "fetch_wheels.sh: $package is not pinned in constraints.txt" >&2; exit 2; }
  pins+=("${pin%%+*}")
done

platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dir" "${pins[@]}"

if ((!full)); then
  "$PYTHON" - "$dir" <<'PY'
"""Repack bitsandbytes without the libraries of other CUDA versions and ROCm (RECORD lines dropped too)."""
import pathlib, re, sys, zipfile

keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
for wheel in pathlib.Path(sys.argv[1]).glob("bitsandbytes-*.whl"):
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {n for n in src.namelist() if n.endswith(".so") and not keep.search(n)}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if l.split(",")[0] not in dropped).encode()
            dst.writestr(info, data)
    slim.replace(wheel)
    print(f"{wheel.name}: kept CPU + CUDA 13 libraries, dropped {len(dropped)}")
PY
fi

if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 && [ "$dir" = "$REPO/.whl" ]; then
  exclude=$(git -C "$REPO" rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >>"$exclude"
fi
du -ch "$dir"/*.whl | tail -1 | sed "s|total|total in $dir|"
