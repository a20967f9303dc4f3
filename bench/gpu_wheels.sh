#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels a bare GPU machine lacks for leansd's GPU
# tests and benchmarks (pure-Python packages, for CPython 3.12 on x86_64 Linux), into DIR (default
# .whl, ignored by git). bench/gpu_session.sh installs them from there without any network.
#
#   bash bench/gpu_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
mkdir -p "$dir"
# What leansd imports that a CUDA machine with torch/transformers/accelerate does not always have.
# Versions: the ones this repository's own environment resolves (pyproject.toml pins diffusers).
pkgs=(
  "diffusers==0.42.1"
  "importlib_metadata"
  "ftfy"
  "wcwidth"
  "torchsde"
  "trampoline"
)
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform any)
for p in "${pkgs[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$dir" "$p"
done
ls -1 "$dir"
du -sh "$dir"
