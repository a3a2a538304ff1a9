#!/usr/bin/env bash
# On the GPU machine, in the bundle (.gpu/, with .gpu-node/ beside it): everything issue 3 still
# needs from a GPU, in one device call that stops starting new work near a deadline (device starts
# are scarce; see bench/PERF.md "Session 11"):
#   1. the GPU tests of session 10's opt-in paths (batched merge, bf16 linear outputs, whole step);
#   2. `gpu_bench quick` alternating: default | SNELLA_MERGE_BATCH=on | =on with SNELLA_LINEAR_OUT=bf16;
#   3. the batched merge chosen when its tests passed and it was faster; `gpu_bench 64 10` with that
#      choice and the PyTorch reference (ref_snella.py) side by side: $OUT/gpu-bench.json as
#      run-bench.sh writes it, with "env" naming the choice;
#   4. recipe seeds (spec §8, bf16) with that choice, without and with SNELLA_LINEAR_OUT=bf16,
#      seed by seed while time is left ($OUT/recipe-seeds.jsonl);
#   5. every other GPU test with that choice while time is left.
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
for t in bin/snella-cuda-merge_batch bin/snella-cuda-gemm_bf16_out bin/snella-model-cuda_step; do
  timeout 150 "$t" --test-threads=1 --nocapture > "$out/$(basename "$t").log" 2>&1; rc=$?
  echo "== $t rc $rc"; [ $rc -eq 0 ] || ok=0
  grep -E "test result|FAILED|panicked" "$out/$(basename "$t").log" | head -8
done
echo "[$(( $(date +%s) - t0 )) s] new tests: ok=$ok"

quick() {  # quick <label> <env...>: one gpu_bench quick; prints one line; the img/s into $out/ips
  local label=$1; shift
  echo 0 > "$out/ips"
  env "$@" timeout 90 ./bin/gpu_bench 64 10 quick > "$out/quick.json" 2> "$out/quick.err" || { tail -3 "$out/quick.err"; return; }
  python3 - "$out/quick.json" "$label" "$out/ips" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))['vit_b16_step']
print(f"{sys.argv[2]:<28} {d['ours']['img_per_s']:>7} img/s {d['ours']['peak_mib']:>6} MiB | full {d['ours_full']['img_per_s']} | recompute {d['ours_recompute']['img_per_s']} {d['ours_recompute']['peak_mib']} MiB")
open(sys.argv[3], 'w').write(str(d['ours']['img_per_s']))
PY
}
declare -A ips=([default]=0 [batch]=0 [batch_bf16out]=0)
for round in 1 2; do
  [ "$round" = 2 ] && [ "$(left)" -lt 420 ] && break
  for mode in default batch batch_bf16out; do
    case $mode in
      default) e=(SNELLA_X=default) ;; batch) e=(SNELLA_MERGE_BATCH=on) ;; batch_bf16out) e=(SNELLA_MERGE_BATCH=on SNELLA_LINEAR_OUT=bf16) ;;
    esac
    quick "$mode (round $round)" "${e[@]}"
    ips[$mode]=$(python3 -c "print(max(${ips[$mode]}, $(cat "$out/ips")))")
  done
done
echo "[$(( $(date +%s) - t0 )) s] best img/s: default ${ips[default]} batch ${ips[batch]} batch_bf16out ${ips[batch_bf16out]}"
choice=SNELLA_X=default
if [ $ok = 1 ] && python3 -c "import sys; sys.exit(0 if ${ips[batch]} > ${ips[default]} else 1)"; then choice=SNELLA_MERGE_BATCH=on; fi
echo "choice: $choice"

env $choice timeout 200 ./bin/gpu_bench 64 10 > "$out/ours.json" 2> "$out/ours.err"; tail -2 "$out/ours.err"
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
python3 assemble_bench.py "$out" "scripts/gpu-bundle.sh && (device) bash .gpu/one-call.sh (gpu_bench 64 10 with $choice, then ref_snella.py)" "$choice"
echo "[$(( $(date +%s) - t0 )) s] bench done"

if [ -d ../.gpu-node ]; then
  for s in 0 1 2 3 4; do
    [ "$(left)" -lt 75 ] && break
    (cd ../.gpu-node && env $choice SNELLA_AB_ENV="SNELLA_LINEAR_OUT=bf16" timeout $(( $(left) - 10 )) bash recipe-seeds.sh "$s")
  done
  echo "[$(( $(date +%s) - t0 )) s] recipe seeds done (variant default = $choice)"
fi
if [ "$(left)" -gt 90 ]; then
  for t in bin/*; do
    case "$(basename "$t")" in gpu_bench|dp_bench|snella-cuda-merge_batch|snella-cuda-gemm_bf16_out|snella-model-cuda_step) continue ;; esac
    [ "$(left)" -lt 30 ] && { echo "out of time before $t"; break; }
    env $choice timeout $(( $(left) - 10 )) "$t" --test-threads=1 > "$out/$(basename "$t").log" 2>&1
    echo "== $t rc $? $(grep -E '^test result' "$out/$(basename "$t").log" | tail -1)"
  done
fi
echo "all done in $(( $(date +%s) - t0 )) s"
