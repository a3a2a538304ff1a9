#!/usr/bin/env bash
# `npm run bench`: the CPU benchmarks, here; results JSON under bench/results/ with the command.
#   - training-step throughput of ViT-Tiny (64 px, patch 8) at batch 64 for snella, linear, full
# The GPU benchmarks (merge kernels and the ViT-B/16 step, side by side with the PyTorch
# reference) run on the GPU machine: scripts/gpu-bundle.sh, then `bash .gpu/run-bench.sh` there
# (bench/results/gpu-h200.json is the last such run).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p snella-model --example cpu_step 2>&1 | tail -1
out=bench/results/cpu-step.json
{
  echo '{"command": "npm run bench", "host": "'"$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"'", "runs": ['
  first=1
  for m in snella linear full; do
    r=$(target/release/examples/cpu_step assets/models/vit_tiny_patch8_64.safetensors 64 5 $m)
    echo "$r" >&2
    [ $first -eq 1 ] || echo ','; first=0; echo "$r"
  done
  echo ']}'
} > $out.tmp
mv $out.tmp $out
cat $out
