#!/usr/bin/env bash
# On the GPU machine, in the bundle (.gpu/, with .gpu-node/ beside it for the recipe): the first run
# of session 10's opt-in paths, which could not get a device in that session. Runs their GPU tests
# and the whole-step tests, then `gpu_bench quick` alternating (one binary, environment switches):
#   baseline | SNELLA_MERGE_BATCH=fwd | =on | =on with SNELLA_LINEAR_OUT=bf16
# (both paths are the defaults since session 11: the baseline is now set explicitly to session 9's
# path, SNELLA_MERGE_BATCH=off SNELLA_LINEAR_OUT=f32; scripts/gpu/one-call.sh is the current one)
# and, when .gpu-node/ is there, recipe seeds 0–3 with and without both switches. Prints the figures;
# logs in $OUT. Usage: bash .gpu/ab-session10.sh   (≈ 6 min on an H100)
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-/tmp/out}; mkdir -p "$out"
t0=$(date +%s)
[ -d bin ] || tar xJf bin.tar.xz
source ./nccl-env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for t in bin/snella-cuda-merge_batch bin/snella-cuda-gemm_bf16_out bin/snella-model-cuda_step; do
  echo "== $t"; timeout 150 "$t" --test-threads=1 --nocapture > "$out/$(basename "$t").log" 2>&1; echo "rc $?"
  grep -E "test result|FAILED|panicked|merge_batch:|adapter_bwd_batch:|linear_fwd_bf16_out" "$out/$(basename "$t").log" | head -12
done
echo "tests done in $(( $(date +%s) - t0 )) s"
for i in 1 2; do
  for mode in "SNELLA_MERGE_BATCH=off SNELLA_LINEAR_OUT=f32" "SNELLA_MERGE_BATCH=fwd SNELLA_LINEAR_OUT=f32" "SNELLA_MERGE_BATCH=on SNELLA_LINEAR_OUT=f32" "SNELLA_MERGE_BATCH=on SNELLA_LINEAR_OUT=bf16"; do
    env $mode timeout 90 ./bin/gpu_bench 64 10 quick > "$out/quick.json" 2>"$out/quick.err" || tail -5 "$out/quick.err"
    python3 -c "
import json; d=json.load(open('$out/quick.json'))['vit_b16_step']
print('$mode | $i |', d['ours']['img_per_s'], 'img/s', d['ours']['peak_mib'], 'MiB | full', d['ours_full']['img_per_s'], '| recompute', d['ours_recompute']['img_per_s'], d['ours_recompute']['peak_mib'])"
  done
done
echo "A/B done in $(( $(date +%s) - t0 )) s"
if [ -d ../.gpu-node ]; then
  (cd ../.gpu-node && SNELLA_MERGE_BATCH=off SNELLA_LINEAR_OUT=f32 SNELLA_AB_ENV="SNELLA_MERGE_BATCH=on SNELLA_LINEAR_OUT=bf16" bash recipe-seeds.sh 0 1 2 3)
fi
echo "all done in $(( $(date +%s) - t0 )) s"
