#!/usr/bin/env bash
# Packs what a GPU test-and-benchmark run needs into .gpu/ (git-ignored; name it in the device
# tool's `carry`):
#   .gpu/bin/<crate>-<test>  Rust test executables: snella-cuda (every kernel vs its CPU reference)
#                            and snella-model with CUDA (one GPU training step vs the CPU step;
#                            data-parallel NCCL training, world size 1 and every visible GPU)
#   .gpu/bin/gpu_bench       the GPU benchmarks (crates/snella-model/examples/gpu_bench.rs)
#   .gpu/bin/dp_bench        the data-parallel scaling benchmark (examples/dp_bench.rs);
#                            .gpu/run-dp-bench.sh runs it into $OUT/dp-bench.json
#   .gpu/ref_snella.py       the PyTorch reference, timed side by side by run-bench.sh
#   .gpu/run.sh              runs the tests; .gpu/run-bench.sh runs tests + benchmarks
#   .gpu/one-call.sh         tests, bench beside the reference, an A/B (AB_ENV), recipe seeds, in one deadline
# Usage: scripts/gpu-bundle.sh; then on the device: bash .gpu/run.sh   or   bash .gpu/run-bench.sh
# SNELLA_BUNDLE_XZ=1 packs bin/ as bin.tar.xz (≈ 3 MB instead of ≈ 25 MB, so that .gpu and
# .gpu-node fit the device tool's 64 MiB together); run.sh unpacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
export SNELLA_CUDA_ARCHS=${SNELLA_CUDA_ARCHS:-90}
rm -rf .gpu/bin && mkdir -p .gpu/bin
cargo test --release -p snella-cuda -p snella-model --features snella-model/cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    try: m = json.loads(line)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"]
        pkg = m["package_id"].split("#")[0].rsplit("/", 1)[-1].split("@")[0]
        if pkg == "snella-model" and name not in ("cuda_step", "nccl_step"): continue  # CPU-only tests stay here
        dst = os.path.join(".gpu/bin", pkg + "-" + name)
        shutil.copy(m["executable"], dst); print("bundled", dst)
'
cargo build --release -p snella-model --features cuda --example gpu_bench --example dp_bench
cp target/release/examples/gpu_bench target/release/examples/dp_bench .gpu/bin/
strip .gpu/bin/* 2>/dev/null || true
ref=../shared/reference/ref_snella.py
[ -f "$ref" ] && cp "$ref" .gpu/ref_snella.py
cp scripts/gpu/one-call.sh scripts/gpu/run-bench.sh scripts/gpu/ncu-step.sh scripts/gpu/run-dp-bench.sh scripts/gpu/nccl-env.sh scripts/gpu/check_timm.py scripts/gpu/assemble_bench.py .gpu/
cat > .gpu/run.sh <<'RUN'
#!/usr/bin/env bash
# Runs every bundled test executable; each one's output goes to $OUT/<name>.log.
set -uo pipefail
cd "$(dirname "$0")"
[ -d bin ] || tar xJf bin.tar.xz   # a bundle made with SNELLA_BUNDLE_XZ=1
out=${OUT:-/tmp/out}; mkdir -p "$out"; fail=0
source ./nccl-env.sh   # NCCL_NVLS_ENABLE=0 and libnccl.so.2's folder on LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for t in bin/*; do
  case "$(basename "$t")" in gpu_bench|dp_bench) continue ;; esac
  echo "== $t"; "$t" --test-threads=1 --nocapture "$@" 2>&1 | tee "$out/$(basename "$t").log" | grep -E "test result|FAILED|panicked|worst|rel err|skipped|NCCL" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
done
# the timing reports (ignored tests: they assert nothing) into their own log
for t in bin/snella-cuda-snella_ops bin/snella-cuda-vit_ops; do "$t" --ignored --nocapture timing; done > "$out/timing-reports.log" 2>&1
exit $fail
RUN
chmod +x .gpu/run.sh .gpu/run-bench.sh; ls -la .gpu/bin
rm -f .gpu/bin.tar.xz
if [ "${SNELLA_BUNDLE_XZ:-0}" = 1 ]; then (cd .gpu && tar cJf bin.tar.xz bin && rm -rf bin); fi
du -sh .gpu
