// GPU reliability checks through the TypeScript API, run on the GPU machine by `node --test`
// (scripts/gpu/bundle-node.sh). Without CUDA every test reports "skipped: no CUDA".
const test = require('node:test');
const assert = require('node:assert');
const path = require('node:path');
const fs = require('node:fs');
const os = require('node:os');
const root = path.resolve(__dirname, '..');
const { VitModel } = require(path.join(root, 'dist/model.js'));
const { train } = require(path.join(root, 'dist/train.js'));

const TINY = process.env.SNELLA_TINY ?? path.join(root, '../crates/snella-model/tests/golden/tiny_vit.safetensors');
const MODEL = process.env.SNELLA_MODEL ?? path.join(root, '../assets/models/vit_tiny_patch8_64.safetensors');

function source(n, side = 16, seed = 1) {
  const per = 3 * side * side;
  return {
    length: n,
    labels: Array.from({ length: n }, (_, i) => i % 5),
    async load(idx) {
      const out = new Float32Array(idx.length * per);
      idx.forEach((k, s) => { for (let j = 0; j < per; j++) out[s * per + j] = Math.sin((k + 1) * 12.9898 + j * 78.233 + seed) * 1.5; });
      return out;
    },
  };
}

function cuda(t, file = TINY) {
  try { return VitModel.load(file, { device: 'cuda' }); } catch (e) { t.skip(`skipped: no CUDA (${e.message})`); return null; }
}

function rel(a, b) {
  let d = 0, s = 1e-6;
  for (let i = 0; i < a.length; i++) { d = Math.max(d, Math.abs(a[i] - b[i])); s = Math.max(s, Math.abs(b[i])); }
  return d / s;
}

const names = ['blocks.0.attn.q.snella_A', 'blocks.1.mlp.fc2.snella_B', 'blocks.1.attn.proj.snella_mix', 'head.weight', 'cls_token'];

async function run(seed, extra = {}) {
  const m = VitModel.load(TINY, { device: 'cuda' });
  m.attach({ method: 'snella', numClasses: 5, rank: 4, s0: 0.3, seed });
  await train(m, { train: source(48, 16, seed), epochs: 3, batchSize: 8, warmupEpochs: 1, sT: 0.5, seed, ...extra });
  const out = names.map((n) => m.tensor(n).data);
  m.dispose();
  return out;
}

test('asking for more memory than the GPU has is an error value; a smaller batch then succeeds', async (t) => {
  const m = cuda(t, MODEL);
  if (!m) return;
  m.attach({ method: 'snella', numClasses: 10, rank: 8 });
  const big = 20000; // ~10 MB of activations per 64 px image: ~200 GB, beyond the 139 GiB (b·heads stays under the 65535 grid limit)
  const zeros = { length: big, labels: Array(big).fill(1), load: async (i) => new Float32Array(i.length * 3 * 64 * 64) };
  const err = await train(m, { train: zeros, epochs: 1, batchSize: big, warmupEpochs: 0, prefetch: 0 }).then(() => null, (e) => e);
  assert.ok(err, 'the huge step must fail');
  console.log(`error: ${err.code} ${err.message.slice(0, 200)}`);
  assert.strictEqual(err.code, 'CUDA_OOM');
  assert.match(err.message, /cannot allocate [\d.]+ MiB on the GPU \([\d.]+ MiB free\)/);
  const r = await train(m, { train: { length: 16, labels: Array(16).fill(1), load: async (i) => new Float32Array(i.length * 3 * 64 * 64) }, epochs: 1, batchSize: 8, warmupEpochs: 0 });
  assert.strictEqual(r.steps, 2);
  m.dispose();
});

test('2000 training steps leave device memory flat', async (t) => {
  const m = cuda(t);
  if (!m) return;
  m.attach({ method: 'snella', numClasses: 5, rank: 4 });
  const used = [];
  await train(m, { train: source(4000, 16), epochs: 1, batchSize: 2, warmupEpochs: 0, callbacks: { onStep: (s) => { if (s.step % 250 === 0) used.push(m.native.deviceMemory().usedBytes); } } });
  console.log(`device memory used every 250 steps (MiB): ${used.map((u) => (u / 2 ** 20).toFixed(0)).join(' ')}`);
  assert.strictEqual(used.length, 8);
  const spread = Math.max(...used.slice(1)) - Math.min(...used.slice(1));
  assert.ok(spread <= 64 * 2 ** 20, `device memory moved by ${spread} bytes`);
  m.dispose();
});

test('two models training at once on the GPU give the same results as each alone', async (t) => {
  const probe = cuda(t);
  if (!probe) return;
  probe.dispose();
  const alone = [await run(1), await run(2)];
  const together = await Promise.all([run(1), run(2)]);
  for (let k = 0; k < 2; k++) together[k].forEach((v, i) => assert.ok(rel(v, alone[k][i]) <= 1e-6, `${names[i]} rel ${rel(v, alone[k][i])}`));
});

test('resume on the GPU: 1 epoch, checkpoint, fresh model, rest of the run ≈ uninterrupted (rel ≤ 1e-5)', async (t) => {
  const probe = cuda(t);
  if (!probe) return;
  probe.dispose();
  const straight = await run(3, { checkpointDir: fs.mkdtempSync(path.join(os.tmpdir(), 'g-a-')) });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'g-b-'));
  const ac = new AbortController();
  const m = VitModel.load(TINY, { device: 'cuda' });
  m.attach({ method: 'snella', numClasses: 5, rank: 4, s0: 0.3, seed: 3 });
  const r1 = await train(m, { train: source(48, 16, 3), epochs: 3, batchSize: 8, warmupEpochs: 1, sT: 0.5, seed: 3, checkpointDir: dir, signal: ac.signal, callbacks: { onEpochEnd: () => ac.abort() } });
  assert.ok(r1.aborted);
  m.dispose();
  const resumed = await run(3, { checkpointDir: dir, resume: true });
  resumed.forEach((v, i) => {
    const e = rel(v, straight[i]);
    console.log(`${names[i]} resumed vs straight rel ${e.toExponential(2)}`);
    assert.ok(e <= 1e-5);
  });
});
