#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with medtune and its pinned
# dependencies. torch is installed first, by exact version, so pip takes the CPU wheel where one is
# provided locally instead of a multi-GB CUDA build; on a GPU host the same version's CUDA build works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
echo "medtune installed in .venv ($(.venv/bin/python -c 'import medtune.config; print("ok")'))"
