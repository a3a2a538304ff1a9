#!/usr/bin/env bash
# Packs the Node side of a GPU run into .gpu-node/ (git-ignored; carry it): the Node binary (xz),
# the compiled JS (dist/), the addon, the GPU smoke tests, and the recipe's 2,637 flowers images.
# On the device: bash .gpu-node/run.sh [methods...]   (see that script); bash .gpu-node/recipe-seeds.sh SEEDS...
set -euo pipefail
cd "$(dirname "$0")/../.."
b=.gpu-node
mkdir -p $b/native $b/test
/work/shared/gpu/pack-node.sh $b 2>/dev/null || ../shared/gpu/pack-node.sh $b
rm -rf $b/dist && cp -r dist $b/dist
cp native/binding.js $b/native/
# the addon travels xz-compressed (run.sh unpacks it) to keep the tree + carry under 64 MiB
rm -f $b/native/snella.linux-x64-gnu.node
strip -o /tmp/snella-addon.node native/snella.linux-x64-gnu.node && xz -9 -c /tmp/snella-addon.node > $b/native/snella.linux-x64-gnu.node.xz
cp __test__/gpu/*.cjs $b/test/
cp scripts/gpu/decode_split.py scripts/gpu/nccl-env.sh scripts/gpu/recipe-seeds.sh $b/
[ -d $b/flowers102-64 ] || python3 scripts/gpu/make-flowers-subset.py ../shared/data/flowers102-64 $b/flowers102-64
cp scripts/gpu/run-node.sh $b/run.sh
du -sh $b
