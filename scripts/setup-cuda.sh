#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler wheels from PyPI into .toolchain/cuda (project-local,
# git-ignored): nvcc, its CRT headers, NVVM, the runtime headers and CCCL (CUB). About 270 MB.
# build.rs finds nvcc here when $SNELLA_NVCC, $NVCC and PATH have none. Idempotent.
# Never use a newer nvcc: PTX from 13.5 does not load on driver 580 (design.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.toolchain/cuda"
stamp="$dest/.pinned-13.0.88"
if [ -f "$stamp" ]; then echo "CUDA toolchain already in $dest"; exit 0; fi
rm -rf "$dest"; mkdir -p "$dest"
python3 -m pip install --quiet --no-deps --disable-pip-version-check --target "$dest/site" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
touch "$stamp"
echo "installed CUDA 13.0 toolchain wheels into $dest/site"
find "$dest/site" -name nvcc -type f | head -1
