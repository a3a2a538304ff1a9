import test from 'ava';
import * as fs from 'node:fs';
import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import { VitModel, liveObjects, train } from '../ts';
import { TINY, randomSource } from './helpers/tiny';

/** Bytes of all tensors of a safetensors file (all F32 here), from its header. */
function fileTensorBytes(p: string): number {
  const b = fs.readFileSync(p);
  const n = Number(b.readBigUInt64LE(0));
  const h = JSON.parse(b.subarray(8, 8 + n).toString()) as Record<string, { data_offsets: [number, number] }>;
  return Object.entries(h).filter(([k]) => k !== '__metadata__').reduce((s, [, v]) => s + v.data_offsets[1] - v.data_offsets[0], 0);
}

// Serial: the counters are process-wide.
test.serial('live native objects: flat over 2000 training steps, back to 0 after dispose', async (t) => {
  t.deepEqual(liveObjects(), { models: 0, bytes: 0 });
  const m = VitModel.load(TINY, { device: 'cpu' });
  t.deepEqual(liveObjects(), { models: 1, bytes: fileTensorBytes(TINY) }, 'a loaded model counts its tensors');
  m.attach({ method: 'linear', numClasses: 5 });
  const attached = liveObjects();
  t.true(attached.bytes > fileTensorBytes(TINY), 'trainable tensors add gradient and AdamW moments');
  const seen = new Set<string>();
  const rss0 = process.memoryUsage().rss;
  const r = await train(m, {
    train: randomSource(4000),
    epochs: 1,
    batchSize: 2,
    warmupEpochs: 0,
    prefetch: 1,
    callbacks: { onStep: () => void seen.add(JSON.stringify(liveObjects())) },
  });
  t.is(r.steps, 2000);
  t.deepEqual([...seen], [JSON.stringify(attached)], 'the counts never change during training');
  t.log(`rss growth over 2000 steps: ${((process.memoryUsage().rss - rss0) / 2 ** 20).toFixed(1)} MiB`);
  m.dispose();
  t.deepEqual(liveObjects(), { models: 0, bytes: 0 });
  m.dispose(); // idempotent: no double count
  t.deepEqual(liveObjects(), { models: 0, bytes: 0 });
});

test.serial('many models loaded and disposed leave nothing behind; merge/unmerge are counted', async (t) => {
  const models = Array.from({ length: 25 }, () => VitModel.load(TINY, { device: 'cpu' }));
  t.is(liveObjects().models, 25);
  t.is(liveObjects().bytes, 25 * fileTensorBytes(TINY));
  const m = models[0];
  m.attach({ method: 'snella', numClasses: 5, rank: 4 });
  const before = liveObjects().bytes;
  m.merge();
  t.true(liveObjects().bytes > before, 'merged layers keep W0');
  m.unmerge();
  t.is(liveObjects().bytes, before);
  for (const x of models) x.dispose();
  t.deepEqual(liveObjects(), { models: 0, bytes: 0 });
});

test.serial('a model that is never disposed is released when garbage-collected', async (t) => {
  v8.setFlagsFromString('--expose_gc');
  const gc = vm.runInNewContext('gc') as () => void;
  (() => {
    VitModel.load(TINY, { device: 'cpu' }).attach({ method: 'linear', numClasses: 5 });
  })();
  t.is(liveObjects().models, 1);
  for (let i = 0; i < 50 && liveObjects().models > 0; i++) {
    gc();
    await new Promise((r) => setTimeout(r, 20));
  }
  t.deepEqual(liveObjects(), { models: 0, bytes: 0 });
});
