#!/usr/bin/env bash
# Packaging test: builds the two npm tarballs the napi-rs way and installs them into an empty
# folder the way a user would, with no Rust or CUDA toolchain on PATH, then runs a tiny real job.
#
#   1. `npm pack` of the root package `snella` (dist/ + native/binding.{js,d.ts}, no .node), with
#      `optionalDependencies: { "@snella/snella-linux-x64-gnu": "<version>" }` added to the packed
#      package.json (what `napi prepublish` does at release; not in the repo, where it would make
#      `npm ci` fail while the platform package is unpublished);
#   2. `npm pack` of the platform package `@snella/snella-linux-x64-gnu` (npm/linux-x64-gnu/ with
#      the built native/snella.linux-x64-gnu.node copied in);
#   3. `npm install --no-audit --no-fund <root.tgz> <platform.tgz>` into an empty temp folder with
#      `cargo`, `rustc` and `nvcc` removed from PATH (`env PATH=<filtered>`);
#   4. `node -e "require('snella')…"`: load the bundled ViT from this checkout's assets/ (the npm
#      package does not ship the 21 MB model), attach `linear`, decode 2 images and predict; checks
#      that the addon came from the platform package and that the logits are finite.
#
# Needs: native/snella.linux-x64-gnu.node built (npm run build:native) and npm's cache or registry
# access for the runtime dependencies (sharp, commander, tar, cli-progress). `npm pack` rebuilds
# dist/ (the root package's prepack script runs tsc).
# Prints `PACK TEST OK` and exits 0 on success. KEEP=1 keeps the temp folder.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TRIPLE=linux-x64-gnu
NODE_FILE="$ROOT/native/snella.$TRIPLE.node"
PLATFORM_DIR="$ROOT/npm/$TRIPLE"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/snella-pack.XXXXXX")
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

[ -f "$NODE_FILE" ] || { echo "missing $NODE_FILE: run npm run build:native first" >&2; exit 1; }

step "pack the platform package from $PLATFORM_DIR"
cp "$NODE_FILE" "$PLATFORM_DIR/"
(cd "$PLATFORM_DIR" && npm pack --silent --pack-destination "$WORK" >/dev/null)
step "pack the root package (its prepack script rebuilds dist/ with tsc)"
mkdir "$WORK/raw" "$WORK/stage"
(cd "$ROOT" && npm pack --silent --pack-destination "$WORK/raw" >/dev/null)
# Like `napi prepublish` at release time, declare the platform package as an optional dependency
# in the packed package.json only: in the repo it would break `npm ci` until it is published.
tar xzf "$WORK/raw/snella-0.1.0.tgz" -C "$WORK/stage"
node -e '
const fs = require("node:fs");
const f = process.argv[1];
const p = JSON.parse(fs.readFileSync(f, "utf8"));
p.optionalDependencies = { ...p.optionalDependencies, [`${p.napi.packageName}-${process.argv[2]}`]: p.version };
fs.writeFileSync(f, JSON.stringify(p, null, 2) + "\n");
console.log("optionalDependencies:", JSON.stringify(p.optionalDependencies));
' "$WORK/stage/package/package.json" "$TRIPLE"
(cd "$WORK/stage/package" && npm pack --silent --ignore-scripts --pack-destination "$WORK" >/dev/null)
ROOT_TGZ="$WORK/snella-0.1.0.tgz"
PLAT_TGZ="$WORK/snella-snella-$TRIPLE-0.1.0.tgz"
ls -l "$ROOT_TGZ" "$PLAT_TGZ"

# The root tarball must stay small: no .node, no assets, no sources.
if tar tzf "$ROOT_TGZ" | grep -E '\.node$|^package/(assets|crates|ts|kernels|__test__)/'; then
  echo "root tarball holds files it must not" >&2
  exit 1
fi
tar tzf "$PLAT_TGZ" | grep -qx "package/snella.$TRIPLE.node" || { echo "platform tarball lacks the .node" >&2; exit 1; }
tar xzOf "$ROOT_TGZ" package/package.json | grep -q '"@snella/snella-linux-x64-gnu": "0.1.0"' ||
  { echo "root tarball lacks the optional dependency on the platform package" >&2; exit 1; }

step "PATH without cargo, rustc, nvcc"
FILTERED=""
IFS=: read -r -a DIRS <<<"$PATH"
for d in "${DIRS[@]}"; do
  [ -n "$d" ] || continue
  if [ -e "$d/cargo" ] || [ -e "$d/rustc" ] || [ -e "$d/nvcc" ]; then
    if [ -e "$d/node" ] || [ -e "$d/npm" ]; then
      echo "$d holds both node/npm and cargo/rustc/nvcc: cannot filter PATH" >&2
      exit 1
    fi
    echo "dropped $d"
    continue
  fi
  FILTERED="${FILTERED:+$FILTERED:}$d"
done
for tool in cargo rustc nvcc; do
  if env PATH="$FILTERED" bash -c "command -v $tool" >/dev/null 2>&1; then
    echo "$tool is still on the filtered PATH" >&2
    exit 1
  fi
done
echo "PATH=$FILTERED"

step "install both tarballs into an empty folder"
APP="$WORK/app"
mkdir "$APP"
cd "$APP"
echo '{ "name": "snella-pack-test", "version": "1.0.0", "private": true }' >package.json
# Offline first (npm's cache from this checkout's install), the registry only when that fails.
if ! env PATH="$FILTERED" npm install --no-audit --no-fund --offline "$ROOT_TGZ" "$PLAT_TGZ" >install.log 2>&1; then
  echo "(offline install failed, retrying with the registry)"
  env PATH="$FILTERED" npm install --no-audit --no-fund --prefer-offline "$ROOT_TGZ" "$PLAT_TGZ" >install.log 2>&1 || {
    cat install.log >&2
    exit 1
  }
fi
tail -n 3 install.log

step "run a tiny job with the installed package"
env PATH="$FILTERED" SNELLA_ASSETS="$ROOT/assets" node -e '
const fs = require("node:fs");
const path = require("node:path");
const s = require("snella");
const assets = process.env.SNELLA_ASSETS;
(async () => {
  const pkgDir = path.dirname(require.resolve("snella/package.json"));
  const local = fs.readdirSync(path.join(pkgDir, "native")).filter((f) => f.endsWith(".node"));
  if (local.length) throw new Error("the root package ships a .node: " + local);
  const plat = require.resolve("@snella/snella-linux-x64-gnu");
  const model = s.VitModel.load(path.join(assets, "models/vit_tiny_patch8_64.safetensors"), { device: "cpu" });
  const { img_size, mean, std } = model.config;
  const ds = await s.ImageDataset.open(path.join(assets, "flowers10-64"), "test", { imageSize: img_size, normalization: { mean, std } });
  model.attach({ method: "linear", numClasses: ds.numClasses });
  const logits = await model.predict(await ds.load([0, 1]), 2);
  if (logits.length !== 2 * ds.numClasses || !logits.every(Number.isFinite)) throw new Error("bad logits " + logits.length);
  const top = [0, 1].map((i) => { const row = Array.from(logits.subarray(i * ds.numClasses, (i + 1) * ds.numClasses)); return ds.classNames[row.indexOf(Math.max(...row))]; });
  console.log("addon from", path.relative(process.cwd(), plat));
  console.log("predicted (random head):", top.join(", "));
  console.log("exports:", Object.keys(s).sort().join(" "));
  model.dispose();
})().catch((e) => { console.error(e); process.exit(1); });
'
env PATH="$FILTERED" ./node_modules/.bin/snella --help | head -n 3
# the demo, from the installed package (1 epoch; the model and data come from this checkout's assets/)
env PATH="$FILTERED" ./node_modules/.bin/snella demo --device cpu --epochs 1 --out "$PWD/demo-out" \
  --model "$ROOT/assets/models/vit_tiny_patch8_64.safetensors" --data "$ROOT/assets/flowers10-64" | grep -E "test top-1|overall|adapter written"
test -f "$PWD/demo-out/adapter/adapter_model.safetensors"

echo
echo "PACK TEST OK"
