#!/usr/bin/env bash
# On the GPU machine, in the bundle (.gpu/, with .gpu-node/ beside it): what issue 3 needs from a
# GPU in one device call that stops starting new work near a deadline (device starts are scarce;
# see bench/PERF.md "Session 11"):
#   1. run-bench.sh: every GPU test, then `gpu_bench 64 10` and the PyTorch reference side by side
#      ($OUT/gpu-bench.json);
#   2. `gpu_bench quick` alternating a baseline (the environment in AB_ENV, default
#      SNELLA_PREFETCH=off: each batch uploaded at its step) and the defaults, two rounds;
#   3. recipe seeds (spec §8, bf16) with the defaults, seed by seed while time is left
#      ($OUT/recipe-seeds.jsonl).
# Usage: DEADLINE=560 bash .gpu/one-call.sh   (seconds; prints the figures, logs in $OUT);
#        FULL_BENCH=0 for the short form of step 1 (tests; the reference's SNELLA and full steps
#        beside `gpu_bench quick`), RECIPE_SEEDS="0" for fewer seeds.
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-/tmp/out}; mkdir -p "$out"
t0=$(date +%s)
left() { echo $(( ${DEADLINE:-560} - ($(date +%s) - t0) )); }

if [ "${FULL_BENCH:-1}" = 0 ]; then
  # short form, for a call with little device time left: the tests, then the reference's SNELLA and
  # full fine-tuning steps at batch 64 bf16 beside our quick bench (no merge, TF32/f32 or batch 8 rows)
  timeout "$(left)" bash run.sh > "$out/run.log" 2>&1 || echo "SOME GPU TESTS FAILED"
  grep -E "^== |test result|FAILED|panicked" "$out/run.log" | head -40
  for m in snella full; do
    python3 ref_snella.py bench --model vit_base_patch16_224 --method $m --batch 64 --dtype bf16 --steps 10 2>/dev/null | tail -1
  done
  ./bin/gpu_bench 64 10 quick 2>/dev/null
  echo
else
timeout "$(left)" bash run-bench.sh > "$out/run-bench.log" 2>&1
grep -E "^== |test result|FAILED|panicked|SOME GPU TESTS FAILED" "$out/run-bench.log" | head -40
python3 - "$out/gpu-bench.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); s = d["vit_b16_step"]
print("STEP ours", json.dumps(s["ours"]), "| reference", json.dumps(s["reference"]))
print("RATIO", round(s["ours"]["img_per_s"] / s["reference"]["img_per_s"], 2), "x img/s,", round(s["ours"]["peak_mib"] / s["reference"]["peak_mib"], 3), "x peak")
for m in d["merge"]:
    print("MERGE", m["shape"], m["ours_ms"], "ms vs", m["reference_ms"], "ms:", m["speedup"], "x")
PY
fi
echo "[$(( $(date +%s) - t0 )) s] tests and bench done"

quick() {  # quick <label> <env...>: one gpu_bench quick, one line of figures
  local label=$1; shift
  env "$@" timeout 90 ./bin/gpu_bench 64 10 quick > "$out/quick.json" 2> "$out/quick.err" || { tail -3 "$out/quick.err"; return; }
  python3 - "$out/quick.json" "$label" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))['vit_b16_step']
print(f"{sys.argv[2]:<28} {d['ours']['img_per_s']:>7} img/s {d['ours']['peak_mib']:>6} MiB | full {d['ours_full']['img_per_s']} | recompute {d['ours_recompute']['img_per_s']} {d['ours_recompute']['peak_mib']} MiB")
PY
}
ab=${AB_ENV:-SNELLA_PREFETCH=off}
for round in 1 2; do
  [ "$(left)" -lt 200 ] && break
  quick "$ab (round $round)" $ab
  quick "defaults (round $round)" SNELLA_X=default
done

if [ -d ../.gpu-node ]; then
  for s in ${RECIPE_SEEDS:-0 1 2 3 4}; do
    [ "$(left)" -lt 75 ] && break
    (cd ../.gpu-node && timeout $(( $(left) - 10 )) bash recipe-seeds.sh "$s")
  done
  echo "[$(( $(date +%s) - t0 )) s] recipe seeds done"
fi
echo "all done in $(( $(date +%s) - t0 )) s"
