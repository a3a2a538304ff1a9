#!/usr/bin/env bash
# On the GPU machine, in the bundle (.gpu/): where the wall time of a ViT-B/16 b64 bf16 SNELLA step
# goes between kernels. Runs `gpu_bench` under Nsight Systems (CUDA trace), then lists for one step
# (between two `snella_adamw_multi` launches) the GPU busy time, the idle gaps (largest first, with
# the operations on either side) and the host API calls that took longest.
# Writes $OUT/nsys-step.json. Usage: bash nsys-step.sh [gpu_bench args, default: 64 4 quick]
set -uo pipefail
cd "$(dirname "$0")"
[ -d bin ] || tar xJf bin.tar.xz
out=${OUT:-/tmp/out}; mkdir -p "$out"
nsys=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/nsight-systems*/bin/nsys 2>/dev/null | head -1)
[ -n "$nsys" ] || { echo "no nsys on this machine"; exit 1; }
args=${*:-64 4 quick}
"$nsys" profile -t cuda,osrt --force-overwrite true -o /tmp/step bin/gpu_bench $args > /tmp/nsys.out 2>&1 || tail -5 /tmp/nsys.out
for r in cuda_gpu_trace cuda_api_trace; do
  "$nsys" stats --force-export true --report $r --format csv --output /tmp/rep /tmp/step.nsys-rep > /dev/null 2>&1
done
ls /tmp/rep* >&2
python3 - "$out" /tmp <<'PY'
import csv, json, sys, glob, collections
out, d = sys.argv[1], sys.argv[2]
def load(pat):
    f = sorted(glob.glob(f"{d}/rep*{pat}*.csv"))
    return list(csv.DictReader(open(f[0]))) if f else []
g = load("gpu_trace"); a = load("api_trace")
if not g: print("no gpu trace"); sys.exit(0)
def col(row, *names):
    for n in names:
        for k in row:
            if k.startswith(n): return row[k]
ops = [(int(col(r, "Start")), int(col(r, "Duration")), col(r, "Name") or "") for r in g]
ops.sort()
idx = [i for i, o in enumerate(ops) if "adamw" in o[2]]
# gpu_bench quick runs the SNELLA step first (3 warm-up steps, then the timed ones): take the step
# that ends with its AdamW number STEP_AT (default 6, the third timed step)
import os
k = int(os.environ.get("STEP_AT", "6"))
s, e = (idx[k - 2] + 1, idx[k - 1] + 1) if len(idx) >= k else (0, len(ops))
step = ops[s:e]
t0, t1 = step[0][0], step[-1][0] + step[-1][1]
busy = sum(o[1] for o in step)
gaps = []
for p, q in zip(step, step[1:]):
    gap = q[0] - (p[0] + p[1])
    if gap > 0: gaps.append((gap, p[2][:60], q[2][:60]))
gaps.sort(reverse=True)
copies = [o for o in step if "memcpy" in o[2].lower() or "memset" in o[2].lower()]
# the step's wall time measured from the previous step's AdamW end to this one's
wall = (ops[e - 1][0] + ops[e - 1][1]) - (ops[s - 1][0] + ops[s - 1][1]) if s > 0 else t1 - t0
lead = step[0][0] - (ops[s - 1][0] + ops[s - 1][1]) if s > 0 else 0
api = [(int(col(r, "Start")), int(col(r, "Duration")), col(r, "Name") or "") for r in a]
w0 = ops[s - 1][0] if s > 0 else t0
win = [x for x in api if w0 <= x[0] <= t1]
agg = collections.defaultdict(lambda: [0, 0])
for x in win: agg[x[2]][0] += 1; agg[x[2]][1] += x[1]
res = {"ops_per_step": len(step), "wall_ms": round(wall / 1e6, 3), "busy_ms": round(busy / 1e6, 3),
       "idle_ms": round((wall - busy) / 1e6, 3), "idle_before_first_op_ms": round(lead / 1e6, 3),
       "gaps_over_5us": sum(1 for x in gaps if x[0] > 5000), "gap_ms_over_5us": round(sum(x[0] for x in gaps if x[0] > 5000) / 1e6, 3),
       "largest_gaps": [{"us": round(x[0] / 1e3, 1), "after": x[1], "before": x[2]} for x in gaps[:25]],
       "copies": [{"name": c[2][:40], "us": round(c[1] / 1e3, 1)} for c in copies],
       "host_api": sorted(({"call": k, "n": v[0], "ms": round(v[1] / 1e6, 3)} for k, v in agg.items()), key=lambda x: -x["ms"])[:15]}
json.dump(res, open(f"{out}/nsys-step.json", "w"), indent=1)
print(json.dumps(res, indent=1))
PY
