#!/usr/bin/env bash
# On the GPU machine, in the bundle made by scripts/gpu-bundle.sh (.gpu/): runs every CUDA test
# executable, then our benchmarks and the PyTorch reference (ref_snella.py, carried in .gpu/) side
# by side in this one run, and writes $OUT/gpu-bench.json in the layout of bench/results/.
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-/tmp/out}; mkdir -p "$out"
bash run.sh || echo "SOME GPU TESTS FAILED" | tee "$out/tests-failed.txt"
# interchange: timm loads our merged export (made here by examples/merge-and-export.ts, with our
# logits from scripts/gpu/our_logits.ts, both in .gpu/timm/ when present)
[ -f timm/merged.safetensors ] && python3 check_timm.py timm/merged.safetensors timm/ours.json | tee "$out/timm-check.json"
./bin/gpu_bench 64 10 > "$out/ours.json" 2> "$out/ours.err"; tail -3 "$out/ours.err"
: > "$out/ref.jsonl"
for s in "768 768" "768 3072" "3072 768" "1024 4096"; do
  set -- $s
  python3 ref_snella.py merge --n_in $1 --n_out $2 --rank 32 --sparsity 0.7 --steps 20 >> "$out/ref.jsonl"
done
python3 ref_snella.py bench --model vit_base_patch16_224 --method snella --batch 64 --dtype bf16 --steps 10 >> "$out/ref.jsonl"
for m in lora snella full; do
  python3 ref_snella.py bench --model vit_base_patch16_224 --method $m --batch 8 --dtype fp32 --steps 10 >> "$out/ref.jsonl"
done
python3 assemble_bench.py "$out" "scripts/gpu-bundle.sh && (device) bash .gpu/run-bench.sh"
cat "$out/gpu-bench.json"
