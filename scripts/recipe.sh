#!/usr/bin/env bash
# Runs the reference recipe (spec §8) for the given methods, one after the other, on the CPU:
#   scripts/recipe.sh ../shared/data/flowers102-64 runs/recipe snella linear full
# Each method writes OUT/<method>/results.json (test top-1, wall time) and OUT/<method>/log.txt.
set -euo pipefail
data=${1:?data folder}; out=${2:?output folder}; shift 2
for m in "${@:-snella}"; do
  mkdir -p "$out/$m"
  /usr/bin/time -f "wall %e s" node dist/cli/main.js train --model assets/models/vit_tiny_patch8_64.safetensors \
    --data "$data" --method "$m" --rank 8 --s0 0.01 --sT 0.5 --epochs 40 --batch 64 --lr 1e-3 --wd 0.05 \
    --warmup 4 --seed 0 --out "$out/$m" --overwrite 2>&1 | tee "$out/$m/log.txt"
done
