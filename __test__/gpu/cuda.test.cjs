// GPU smoke tests of the built addon through the TypeScript API (compiled JS), run on the GPU
// machine with Node's built-in runner: `node --test test/` inside the node bundle
// (scripts/gpu/bundle-node.sh). No node_modules there: only dist/ modules that need none.
// Without CUDA every test reports "skipped: no CUDA".
const test = require('node:test');
const assert = require('node:assert');
const path = require('node:path');
const fs = require('node:fs');
const os = require('node:os');
const root = path.resolve(__dirname, '..');
const { VitModel } = require(path.join(root, 'dist/model.js'));
const { train, evaluate } = require(path.join(root, 'dist/train.js'));
const { TensorDataset } = require(path.join(root, 'dist/data/tensor.js'));

const MODEL = process.env.SNELLA_MODEL ?? path.join(root, '../assets/models/vit_tiny_patch8_64.safetensors');
const DATA = process.env.SNELLA_TENSORS ?? '/tmp/snella-data';

function cudaOrSkip(t) {
  try {
    const m = VitModel.load(MODEL, { device: 'cuda' });
    return m;
  } catch (e) {
    t.skip(`skipped: no CUDA (${e.message})`);
    return null;
  }
}

function rel(a, b) {
  let d = 0, s = 1e-6;
  for (let i = 0; i < a.length; i++) { d = Math.max(d, Math.abs(a[i] - b[i])); s = Math.max(s, Math.abs(b[i])); }
  return d / s;
}

test('auto picks CUDA here; CUDA and CPU logits agree (f32, rel ≤ 1e-4)', async (t) => {
  const g = cudaOrSkip(t);
  if (!g) return;
  const auto = VitModel.load(MODEL);
  assert.strictEqual(auto.device, 'cuda');
  auto.dispose();
  const c = VitModel.load(MODEL, { device: 'cpu' });
  for (const m of [g, c]) m.attach({ method: 'snella', numClasses: 102, rank: 8, s0: 0.3, seed: 4 });
  const ds = TensorDataset.fromSafetensors(path.join(DATA, 'test.safetensors'), { normalization: g.config });
  const x = await ds.load([0, 1, 2, 3, 4, 5, 6, 7]);
  const [lg, lc] = [await g.predict(x, 8), await c.predict(x, 8)];
  const e = rel(lg, lc);
  console.log(`logits rel err ${e.toExponential(2)}`);
  assert.ok(e <= 1e-4, `rel err ${e}`);
  assert.deepStrictEqual(g.report().map((l) => l.kept), c.report().map((l) => l.kept));
  g.dispose();
  c.dispose();
});

test('train on CUDA, save, reload on the CPU: same predictions', async (t) => {
  const g = cudaOrSkip(t);
  if (!g) return;
  const tr = TensorDataset.fromSafetensors(path.join(DATA, 'train.safetensors'), { normalization: g.config });
  const te = TensorDataset.fromSafetensors(path.join(DATA, 'test.safetensors'), { normalization: g.config });
  g.attach({ method: 'snella', numClasses: tr.numClasses, rank: 8 });
  const r = await train(g, { train: tr, epochs: 2, batchSize: 64, warmupEpochs: 1 });
  assert.strictEqual(r.steps, 2 * Math.ceil(tr.length / 64));
  const ev = await evaluate(g, te, 256);
  assert.strictEqual(ev.count, te.length);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snella-gpu-'));
  g.saveAdapter(dir);
  const c = VitModel.load(MODEL, { device: 'cpu' }).loadAdapter(dir);
  const x = await te.load([0, 1, 2, 3]);
  const e = rel(await c.predict(x, 4), await g.predict(x, 4));
  console.log(`reloaded-on-CPU logits rel err ${e.toExponential(2)}`);
  assert.ok(e <= 1e-4);
  g.merge();
  const em = rel(await g.predict(x, 4), await c.predict(x, 4));
  assert.ok(em <= 1e-4, `merged rel err ${em}`);
  g.dispose();
  c.dispose();
});
