#!/usr/bin/env bash
# On the GPU machine, in .gpu-node/ (after run.sh, or alone: it unpacks what it needs): the spec §8
# recipe in bf16 for each seed given, with the default settings and, when SNELLA_AB_ENV is set
# (e.g. SNELLA_AB_ENV="SNELLA_DELTA_PRODUCTS=separate" or "SNELLA_ATTENTION=unfused"), again with that
# environment; one JSON line per run into $OUT/recipe-seeds.jsonl (the test top-1, the seed and
# the variant: "default" or the SNELLA_AB_ENV string), logs beside it.
# Usage: bash .gpu-node/recipe-seeds.sh 0 1 2 3 4
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-/tmp/out}; mkdir -p "$out"
[ -x /tmp/node ] || { xz -dc node.xz > /tmp/node && chmod +x /tmp/node; }
[ -f native/snella.linux-x64-gnu.node ] || xz -dc native/snella.linux-x64-gnu.node.xz > native/snella.linux-x64-gnu.node
mkdir -p /tmp/snella-data
[ -f /tmp/snella-data/train.safetensors ] || python3 decode_split.py flowers102-64 train800val200 64 /tmp/snella-data/train.safetensors
[ -f /tmp/snella-data/test.safetensors ] || python3 decode_split.py flowers102-64 test 64 /tmp/snella-data/test.safetensors
modes=(default); [ -n "${SNELLA_AB_ENV:-}" ] && modes+=("$SNELLA_AB_ENV")
for mode in "${modes[@]}"; do
  for s in "$@"; do
    env $([ "$mode" != default ] && echo "$mode") /tmp/node dist/gpu/train-tensors.js \
      --model ../assets/models/vit_tiny_patch8_64.safetensors \
      --train /tmp/snella-data/train.safetensors --test /tmp/snella-data/test.safetensors --device cuda --precision bf16 \
      --method snella --rank 8 --s0 0.01 --sT 0.5 --epochs 40 --batch 64 --lr 1e-3 --wd 0.05 --warmup 4 --seed "$s" \
      2> "$out/recipe-${mode//[^a-zA-Z0-9]/_}-$s.log" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['variant']='$mode'; r['seed']=$s; print(json.dumps(r))" | tee -a "$out/recipe-seeds.jsonl"
  done
done
