#!/usr/bin/env bash
# On the GPU machine, in the bundle (.gpu/, with .gpu-node/ beside it): what issue 3 needs from a
# GPU in one device call that stops starting new work near a deadline (device starts are scarce;
# see bench/PERF.md "Session 11"):
#   1. every GPU test executable (the defaults of session 11: batched merge, bf16 qkv/fc1 outputs);
#   2. `gpu_bench quick` alternating: session 9's path (SNELLA_MERGE_BATCH=off SNELLA_LINEAR_OUT=f32)
#      | the defaults, two rounds;
#   3. `gpu_bench 64 10` and the PyTorch reference (ref_snella.py) side by side: $OUT/gpu-bench.json
#      as run-bench.sh writes it;
#   4. recipe seeds (spec §8, bf16) with the defaults, seed by seed while time is left
#      ($OUT/recipe-seeds.jsonl).
# Usage: DEADLINE=560 bash .gpu/one-call.sh   (seconds; prints the figures, logs in $OUT)
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-/tmp/out}; mkdir -p "$out"
t0=$(date +%s)
left() { echo $(( ${DEADLINE:-560} - ($(date +%s) - t0) )); }
[ -d bin ] || tar xJf bin.tar.xz
source ./nccl-env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

ok=1
for t in bin/snella-*; do
  timeout 150 "$t" --test-threads=1 --nocapture > "$out/$(basename "$t").log" 2>&1; rc=$?
  echo "== $t rc $rc $(grep -E '^test result' "$out/$(basename "$t").log" | tail -1)"; [ $rc -eq 0 ] || ok=0
  grep -E "FAILED|panicked" "$out/$(basename "$t").log" | head -6
done
echo "[$(( $(date +%s) - t0 )) s] GPU tests: ok=$ok"

quick() {  # quick <label> <env...>: one gpu_bench quick, one line of figures
  local label=$1; shift
  env "$@" timeout 90 ./bin/gpu_bench 64 10 quick > "$out/quick.json" 2> "$out/quick.err" || { tail -3 "$out/quick.err"; return; }
  python3 - "$out/quick.json" "$label" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))['vit_b16_step']
print(f"{sys.argv[2]:<28} {d['ours']['img_per_s']:>7} img/s {d['ours']['peak_mib']:>6} MiB | full {d['ours_full']['img_per_s']} | recompute {d['ours_recompute']['img_per_s']} {d['ours_recompute']['peak_mib']} MiB")
PY
}
for round in 1 2; do
  [ "$round" = 2 ] && [ "$(left)" -lt 420 ] && break
  quick "session 9 path (round $round)" SNELLA_MERGE_BATCH=off SNELLA_LINEAR_OUT=f32
  quick "defaults (round $round)" SNELLA_X=default
done
timeout 200 ./bin/gpu_bench 64 10 > "$out/ours.json" 2> "$out/ours.err"; tail -2 "$out/ours.err"
: > "$out/ref.jsonl"
for s in "768 768" "768 3072" "3072 768" "1024 4096"; do
  set -- $s
  timeout 60 python3 ref_snella.py merge --n_in $1 --n_out $2 --rank 32 --sparsity 0.7 --steps 20 >> "$out/ref.jsonl"
done
timeout 120 python3 ref_snella.py bench --model vit_base_patch16_224 --method snella --batch 64 --dtype bf16 --steps 10 >> "$out/ref.jsonl"
if [ "$(left)" -gt 300 ]; then
  for m in lora snella full; do
    timeout 60 python3 ref_snella.py bench --model vit_base_patch16_224 --method $m --batch 8 --dtype fp32 --steps 10 >> "$out/ref.jsonl"
  done
fi
python3 assemble_bench.py "$out" "scripts/gpu-bundle.sh && (device) bash .gpu/one-call.sh (gpu_bench 64 10, then ref_snella.py)"
echo "[$(( $(date +%s) - t0 )) s] bench done"

if [ -d ../.gpu-node ]; then
  for s in 0 1 2 3 4; do
    [ "$(left)" -lt 75 ] && break
    (cd ../.gpu-node && timeout $(( $(left) - 10 )) bash recipe-seeds.sh "$s")
  done
  echo "[$(( $(date +%s) - t0 )) s] recipe seeds done"
fi
echo "all done in $(( $(date +%s) - t0 )) s"
