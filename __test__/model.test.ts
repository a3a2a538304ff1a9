import test from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ImageDataset, SnellaError, VitModel, evaluate, train } from '../ts';

const ROOT = path.resolve(__dirname, '..');
const MODEL = path.join(ROOT, 'assets/models/vit_tiny_patch8_64.safetensors');
const DATA = path.join(ROOT, 'assets/flowers10-64');

function tmp(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'snella-test-'));
}

async function demoData(split: string) {
  const ds = await ImageDataset.open(DATA, split, { imageSize: 64 });
  await ds.prepare();
  return ds;
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

test('config comes from the checkpoint metadata', (t) => {
  const m = VitModel.load(MODEL, { device: 'cpu' });
  const c = m.config;
  t.deepEqual([c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads, c.mlp_hidden, c.num_classes], [64, 8, 192, 12, 3, 768, 100]);
  t.deepEqual(c.mean.map((v) => +v.toFixed(3)), [0.485, 0.456, 0.406]);
  m.dispose();
  m.dispose(); // idempotent
  const e = t.throws(() => m.config) as SnellaError;
  t.is(e.code, 'DISPOSED');
});

test('cuda is an error value naming what is missing; auto falls back to the CPU with a reason', (t) => {
  const e = t.throws(() => VitModel.load(MODEL, { device: 'cuda' })) as SnellaError;
  t.is(e.code, 'CUDA_UNAVAILABLE');
  const m = VitModel.load(MODEL);
  t.is(m.device, 'cpu');
  t.regex(m.deviceReason ?? '', /CUDA/);
  m.dispose();
});

test('a bad checkpoint path is a FILE error naming the file', (t) => {
  const e = t.throws(() => VitModel.load('/nonexistent/vit.safetensors', { device: 'cpu' })) as SnellaError;
  t.is(e.code, 'FILE');
  t.regex(e.message, /nonexistent\/vit\.safetensors/);
});

test('a target that matches nothing lists the real names', (t) => {
  const m = VitModel.load(MODEL, { device: 'cpu' });
  const e = t.throws(() => m.attach({ method: 'snella', numClasses: 10, targets: ['q', 'mlp.fc3'] })) as SnellaError;
  t.is(e.code, 'TARGET');
  t.regex(e.message, /mlp\.fc3/);
  t.regex(e.message, /blocks\.0\.attn\.q/);
  m.dispose();
});

test('attach: trainable counts are exact per method (spec §1, §4)', (t) => {
  const counts: Record<string, number> = {};
  for (const method of ['linear', 'snella', 'snell', 'lora', 'full'] as const) {
    const m = VitModel.load(MODEL, { device: 'cpu' });
    t.is(m.numClasses, 100, 'the checkpoint head before attach');
    m.attach({ method, numClasses: 10, rank: 8 });
    t.is(m.numClasses, 10, `${method}: the new head after attach`);
    t.is(m.config.num_classes, 100, 'config stays the checkpoint');
    counts[method] = m.trainableCount;
    m.dispose();
  }
  const head = 10 * 192 + 10;
  const cls = 192;
  // per block: q,k,v,proj [192x192] and fc1 [192x768], fc2 [768x192]: (in+out)·r each
  const perBlock = 4 * (192 + 192) * 8 + 2 * (192 + 768) * 8;
  t.is(counts.linear, head + cls);
  t.is(counts.snell, head + cls + 12 * perBlock);
  t.is(counts.snella, head + cls + 12 * (perBlock + 6 * 3));
  t.is(counts.lora, head + cls + 12 * perBlock);
  t.true(counts.full > 5_000_000);
});

test('report: kept entries are exactly N − ⌊s·N⌋', (t) => {
  const m = VitModel.load(MODEL, { device: 'cpu' });
  m.attach({ method: 'snella', numClasses: 10, s0: 0.3 });
  const r = m.report();
  t.is(r.length, 72);
  for (const l of r) {
    t.is(l.entries, l.n_in * l.n_out);
    t.is(l.kept, l.entries - Math.floor(0.3 * l.entries));
  }
  m.dispose();
});

test('train with callbacks, evaluate, save → load gives bit-identical logits; no silent overwrite', async (t) => {
  const [tr, te] = await Promise.all([demoData('train'), demoData('test')]);
  const m = VitModel.load(MODEL, { device: 'cpu' });
  m.attach({ method: 'snella', numClasses: tr.numClasses, rank: 8, seed: 1 });
  const steps: number[] = [];
  const epochs: number[] = [];
  const r = await train(m, {
    train: tr,
    epochs: 2,
    batchSize: 64,
    warmupEpochs: 1,
    sT: 0.5,
    callbacks: { onStep: (s) => void steps.push(s.step), onEpochEnd: (e) => void epochs.push(e.epoch) },
  });
  t.deepEqual(steps, [1, 2, 3, 4, 5, 6, 7, 8]);
  t.deepEqual(epochs, [0, 1]);
  t.false(r.aborted);
  const hist = m.allocator();
  t.is(hist?.history.length, 2);
  // round 1 re-allocates: budget VT + (V0 − VT)(1 − 1/2)^3 (spec §5)
  const N = m.report().reduce((s, l) => s + l.entries, 0);
  const v0 = 0.99 * N;
  const vT = 0.5 * N;
  t.true(Math.abs((hist?.history[1].budget ?? 0) - (vT + (v0 - vT) * 0.125)) < 1e-6 * N);
  const kept = m.report().reduce((s, l) => s + l.kept, 0);
  t.true(Math.abs(kept - (vT + (v0 - vT) * 0.125)) <= 72, `kept ${kept}`);

  const ev = await evaluate(m, te);
  t.is(ev.count, te.length);
  const x = await te.load([0, 1, 2, 3]);
  const before = await m.predict(x, 4);
  const dir = tmp();
  m.saveAdapter(dir);
  const e = t.throws(() => m.saveAdapter(dir)) as SnellaError;
  t.is(e.code, 'FILE');
  t.regex(e.message, /already exists/);
  const m2 = VitModel.load(MODEL, { device: 'cpu' }).loadAdapter(dir);
  const after = await m2.predict(x, 4);
  t.deepEqual(Array.from(after), Array.from(before), 'bit-identical logits after reload');
  t.deepEqual(m2.report(), m.report().map((l) => ({ ...l, score: m2.report().find((q) => q.name === l.name)?.score ?? 0 })));
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'adapter_config.json'), 'utf8'));
  t.is(cfg.method.kind, 'snella');
  t.is(Object.keys(cfg.sparsities).length, 72);
  t.is(cfg.trainer.allocator.history.length, 2);
  m.dispose();
  m2.dispose();
});

test('merge: logits within 1e-5 of the unmerged model; unmerge restores W0 bit-exactly', async (t) => {
  const te = await demoData('test');
  const m = VitModel.load(MODEL, { device: 'cpu' });
  m.attach({ method: 'snella', numClasses: 10, rank: 8, s0: 0.5, seed: 3 });
  // make ΔW non-trivial: one short training run
  const tr = await demoData('train');
  await train(m, { train: tr, epochs: 1, batchSize: 120, warmupEpochs: 0, lr: 5e-3 });
  const w0 = m.tensor('blocks.5.mlp.fc1.weight').data;
  const x = await te.load([0, 1, 2, 3, 4, 5]);
  const unmerged = await m.predict(x, 6);
  m.merge();
  const wm = m.tensor('blocks.5.mlp.fc1.weight').data;
  t.true(maxAbsDiff(wm, w0) > 1e-6, 'merge changed W');
  const merged = await m.predict(x, 6);
  t.true(maxAbsDiff(merged, unmerged) <= 1e-5, `max diff ${maxAbsDiff(merged, unmerged)}`);
  m.unmerge();
  t.deepEqual(Array.from(m.tensor('blocks.5.mlp.fc1.weight').data), Array.from(w0));
  t.deepEqual(Array.from(await m.predict(x, 6)), Array.from(unmerged));
  m.dispose();
});

test('an AbortSignal stops training at a step boundary', async (t) => {
  const tr = await demoData('train');
  const m = VitModel.load(MODEL, { device: 'cpu' });
  m.attach({ method: 'linear', numClasses: 10 });
  const ac = new AbortController();
  const r = await train(m, {
    train: tr,
    epochs: 3,
    batchSize: 60,
    warmupEpochs: 0,
    signal: ac.signal,
    callbacks: { onStep: (s) => { if (s.step === 2) ac.abort(); } },
  });
  t.true(r.aborted);
  t.is(r.steps, 2);
  t.deepEqual(m.native.progress(), { step: 2, epoch: 0 });
  m.dispose();
});

test('bad training options name the field and range', async (t) => {
  const tr = await demoData('train');
  const m = VitModel.load(MODEL, { device: 'cpu' });
  m.attach({ method: 'linear', numClasses: 10 });
  const e = (await t.throwsAsync(() => train(m, { train: tr, batchSize: 0 }))) as SnellaError;
  t.is(e.code, 'CONFIG');
  t.regex(e.message, /batchSize = 0: an integer ≥ 1/);
  const e2 = (await t.throwsAsync(() => train(m, { train: tr, epochs: 0 }))) as SnellaError;
  t.regex(e2.message, /epochs = 0/);
  const m2 = VitModel.load(MODEL, { device: 'cpu' });
  const e3 = t.throws(() => m2.attach({ method: 'snella', numClasses: 10, rank: 7 })) as SnellaError;
  t.regex(e3.message, /rank = 7/);
  const e4 = t.throws(() => m2.attach({ method: 'snella', numClasses: 10, rank: 500 })) as SnellaError;
  t.regex(e4.message, /rank = 500.*\[1, 192\]/);
  m.dispose();
  m2.dispose();
});
