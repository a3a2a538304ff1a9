#!/usr/bin/env bash
# On the GPU machine, in the bundle made by scripts/gpu-bundle.sh (.gpu/): the data-parallel scaling
# benchmark (ViT-B/16, 224 px, SNELLA r=32 s=0.7, batch 64 per GPU, bf16 GEMMs) on 1, 2, 4, 8 GPUs as
# the machine has them, into $OUT/dp-bench.json. Arguments pass through: [batch_per_gpu] [steps]
# [gpus] [bf16|tf32|f32], e.g. `bash .gpu/run-dp-bench.sh 64 20 1,2`.
set -uo pipefail
cd "$(dirname "$0")"
[ -d bin ] || tar xJf bin.tar.xz   # a bundle made with SNELLA_BUNDLE_XZ=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
source ./nccl-env.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$out/gpus.txt"
./bin/dp_bench "${1:-64}" "${2:-10}" "${3:-1,2,4,8}" "${4:-bf16}" > "$out/dp-bench.json" 2> "$out/dp-bench.err"
rc=$?
tail -12 "$out/dp-bench.err"
cat "$out/dp-bench.json"
exit $rc
