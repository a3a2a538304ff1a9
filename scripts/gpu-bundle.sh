#!/usr/bin/env bash
# Packs what a GPU run needs into .gpu/ (git-ignored; name it in the device tool's `carry`):
#   .gpu/bin/<crate>-<test>   Rust test executables of snella-cuda and snella-model (CUDA vs CPU)
#   .gpu/run.sh               runs them all on the GPU machine, logs to $OUT
# Usage: scripts/gpu-bundle.sh [cargo test filters...]; then on the device: bash .gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export SNELLA_CUDA_ARCHS=${SNELLA_CUDA_ARCHS:-90}
rm -rf .gpu/bin && mkdir -p .gpu/bin
cargo test --release -p snella-cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys, shutil, os
for line in sys.stdin:
    try: m = json.loads(line)
    except Exception: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"]
        dst = os.path.join(".gpu/bin", m["package_id"].split("#")[0].rsplit("/", 1)[-1].split("@")[0] + "-" + name)
        shutil.copy(m["executable"], dst); print("bundled", dst)
'
cat > .gpu/run.sh <<'RUN'
#!/usr/bin/env bash
# Runs every bundled test executable; each one's output goes to $OUT/<name>.log.
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-/tmp/out}; mkdir -p "$out"; fail=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for t in bin/*; do
  echo "== $t"; "$t" --test-threads=1 "$@" 2>&1 | tee "$out/$(basename "$t").log" | tail -25
  [ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
done
exit $fail
RUN
chmod +x .gpu/run.sh; du -sh .gpu
