"""On the GPU machine: joins our gpu_bench JSON and the PyTorch reference's JSON lines (ref_snella.py)
from the same run into the results layout of bench/results/, with the command that made them.
Usage: python3 assemble_bench.py OUT_DIR COMMAND   (reads OUT_DIR/ours.json, OUT_DIR/ref.jsonl;
writes OUT_DIR/gpu-bench.json)"""
import json
import sys

out, command = sys.argv[1], sys.argv[2]
ours = json.load(open(f"{out}/ours.json"))
ref = [json.loads(l) for l in open(f"{out}/ref.jsonl") if l.strip()]
rm = {(r["n_in"], r["n_out"]): r["ms"] for r in ref if r.get("op")}
for m in ours["merge"]:
    m["reference_ms"] = rm.get(tuple(m["shape"]))
    m["speedup"] = round(m["reference_ms"] / m["ours_ms"], 2) if m["reference_ms"] else None
rb = [r for r in ref if r.get("model")]
r64 = next(r for r in rb if r["batch"] == 64)
ours["vit_b16_step"]["reference"] = {"img_per_s": r64["img_per_s"], "peak_mib": r64["peak_mib"], "step_ms": r64["step_ms"], "dtype": r64["dtype"]}
ours["reference_b8_fp32"] = [r for r in rb if r["batch"] == 8]
ours["command"] = command
json.dump(ours, open(f"{out}/gpu-bench.json", "w"), indent=1)
