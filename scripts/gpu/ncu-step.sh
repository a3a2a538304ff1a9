#!/usr/bin/env bash
# On the GPU machine, in the bundle (.gpu/): per-kernel device time of one ViT-B/16 b64 bf16 SNELLA
# training step under Nsight Compute (gpu__time_duration.sum), summed by kernel name over the kernels
# between the first two `snella_adamw_multi` launches (one whole step after warm-up).
# Writes $OUT/ncu-step.csv (raw) and $OUT/ncu-step.json ({kernels_per_step, kernel_ms_total, kernels}).
# Usage: bash ncu-step.sh [gpu_bench args, default: 64 2 quick]
set -uo pipefail
cd "$(dirname "$0")"
[ -d bin ] || tar xJf bin.tar.xz
out=${OUT:-/tmp/out}; mkdir -p "$out"
args=${*:-64 2 quick}
/usr/local/cuda/bin/ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw --print-units base \
  --launch-count 3500 bin/gpu_bench $args > "$out/ncu-step.csv" 2> "$out/ncu-step.err"
python3 - "$out" <<'PY'
import csv, json, sys, collections
out = sys.argv[1]
rows = [r for r in csv.DictReader(l for l in open(f"{out}/ncu-step.csv") if l.startswith('"'))]
rows = [r for r in rows if r.get("Kernel Name") and r.get("gpu__time_duration.sum", "").replace(".", "").replace(",", "").isdigit()]
idx = [i for i, r in enumerate(rows) if "adamw" in r["Kernel Name"]]
step = rows[idx[0] + 1: idx[1] + 1] if len(idx) >= 2 else rows
agg = collections.defaultdict(lambda: [0, 0.0])
for r in step:
    a = agg[r["Kernel Name"][:70]]; a[0] += 1; a[1] += float(r["gpu__time_duration.sum"].replace(",", "")) / 1e6  # ns (--print-units base) to ms
ks = sorted(({"kernel": k, "calls": c, "ms": round(t, 3)} for k, (c, t) in agg.items()), key=lambda d: -d["ms"])
res = {"kernels_per_step": len(step), "kernel_ms_total": round(sum(d["ms"] for d in ks), 2), "kernels": ks}
json.dump(res, open(f"{out}/ncu-step.json", "w"), indent=1)
print(res["kernels_per_step"], res["kernel_ms_total"])
for d in ks[:40]: print(f'{d["ms"]:8.3f} {d["calls"]:5d} {d["kernel"]}')
PY
