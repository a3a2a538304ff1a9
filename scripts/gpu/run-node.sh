#!/usr/bin/env bash
# On the GPU machine: unpack Node, decode the data (Pillow), run the Node smoke tests on CUDA, then
# the reference recipe (spec §8) for each method given (default: snella). Results land in $OUT.
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-/tmp/out}; mkdir -p "$out"
source ./nccl-env.sh   # NCCL_NVLS_ENABLE=0 and libnccl.so.2's folder on LD_LIBRARY_PATH (data-parallel tests)
xz -dc node.xz > /tmp/node && chmod +x /tmp/node
[ -f native/snella.linux-x64-gnu.node.xz ] && xz -dc native/snella.linux-x64-gnu.node.xz > native/snella.linux-x64-gnu.node
mkdir -p /tmp/snella-data
python3 decode_split.py flowers102-64 train800val200 64 /tmp/snella-data/train.safetensors
python3 decode_split.py flowers102-64 test 64 /tmp/snella-data/test.safetensors
SNELLA_MODEL=../assets/models/vit_tiny_patch8_64.safetensors /tmp/node --test test/ 2>&1 | tee "$out/node-test.log" | tail -30
for m in "${@:-snella}"; do
  /tmp/node dist/gpu/train-tensors.js --model ../assets/models/vit_tiny_patch8_64.safetensors \
    --train /tmp/snella-data/train.safetensors --test /tmp/snella-data/test.safetensors --device cuda --precision "${SNELLA_PRECISION:-f32}" \
    --method "$m" --rank 8 --s0 0.01 --sT 0.5 --epochs 40 --batch 64 --lr 1e-3 --wd 0.05 --warmup 4 --seed 0 \
    2> "$out/recipe-$m.log" | tee "$out/recipe-$m.json"
  tail -3 "$out/recipe-$m.log"
done
