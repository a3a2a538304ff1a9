// GPU smoke tests of data-parallel training through the TypeScript API (compiled JS), run on the GPU
// machine by the node bundle (scripts/gpu/run-node.sh, which puts libnccl.so.2 on LD_LIBRARY_PATH):
// - `devices: [0]` trains through NCCL with world size 1 and equals plain CUDA training (bit for bit
//   when plain CUDA training is itself reproducible, else within 1e-6);
// - a device that does not exist is a CONFIG error naming how many GPUs there are;
// - with 2 or more GPUs, `devices: [0, 1]` is within 1e-5 of one GPU with `microBatches: 2`.
// Without CUDA every test reports "skipped: no CUDA".
const test = require('node:test');
const assert = require('node:assert');
const path = require('node:path');
const fs = require('node:fs');
const os = require('node:os');
const root = path.resolve(__dirname, '..');
const { VitModel } = require(path.join(root, 'dist/model.js'));
const { train } = require(path.join(root, 'dist/train.js'));
const { readSafetensors } = require(path.join(root, 'dist/io.js'));

const MODEL = process.env.SNELLA_MODEL ?? path.join(root, '../assets/models/vit_tiny_patch8_64.safetensors');

function cudaOrSkip(t) {
  try {
    return VitModel.load(MODEL, { device: 'cuda' });
  } catch (e) {
    t.skip(`skipped: no CUDA (${e.message})`);
    return null;
  }
}

/** 96 seeded random 64×64 images, labels i % 10. */
function source() {
  const per = 3 * 64 * 64;
  return {
    length: 96,
    labels: Array.from({ length: 96 }, (_, i) => i % 10),
    async load(idx) {
      const out = new Float32Array(idx.length * per);
      idx.forEach((i, k) => {
        let z = (i + 1) * 2654435761;
        for (let j = 0; j < per; j++) {
          z = (Math.imul(z ^ (z >>> 15), 0x2c1b3c6d) + j) | 0;
          out[k * per + j] = ((z >>> 0) / 2 ** 32) * 2 - 1;
        }
      });
      return out;
    },
  };
}

/** Trains a fresh CUDA model (SNELLA, 2 epochs of 3 batches of 32) and returns its adapter tensors. */
async function run(t, extra) {
  const m = cudaOrSkip(t);
  if (!m) return null;
  m.attach({ method: 'snella', numClasses: 10, rank: 8, s0: 0.3, seed: 2 });
  const r = await train(m, { train: source(), epochs: 2, batchSize: 32, lr: 1e-3, warmupEpochs: 1, seed: 1, ...extra });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snella-dp-gpu-'));
  m.saveAdapter(dir);
  const file = path.join(dir, 'adapter_model.safetensors');
  const tensors = readSafetensors(file).tensors;
  const bytes = fs.readFileSync(file);
  m.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
  return { r, tensors, bytes };
}

function maxAbs(a, b) {
  let d = 0;
  for (const [k, x] of Object.entries(a)) {
    if (k.startsWith('allocator.')) continue;
    for (let i = 0; i < x.data.length; i++) d = Math.max(d, Math.abs(x.data[i] - b[k].data[i]));
  }
  return d;
}

test('devices: [0] (NCCL, world size 1) equals plain CUDA training', async (t) => {
  const p1 = await run(t, {});
  if (!p1) return;
  const p2 = await run(t, {});
  const d = await run(t, { devices: [0] });
  assert.deepStrictEqual(d.r.dataParallel, { kind: 'nccl', world: 1, rank: 0, localRanks: 1 });
  if (p1.bytes.equals(p2.bytes)) {
    assert.ok(d.bytes.equals(p1.bytes), 'NCCL world size 1 should equal plain CUDA training bit for bit');
    console.log('NCCL world size 1 ≡ plain CUDA training, bit for bit');
  } else {
    const e = maxAbs(p1.tensors, d.tensors);
    console.log(`plain CUDA training is not bit-reproducible here; NCCL world size 1 vs plain: max |Δ| ${e.toExponential(2)}`);
    assert.ok(e <= 1e-6, `max |Δ| ${e}`);
  }
});

test('devices beyond this machine\'s GPUs: a CONFIG error naming how many there are', async (t) => {
  const m = cudaOrSkip(t);
  if (!m) return;
  m.attach({ method: 'snella', numClasses: 10, rank: 8 });
  await assert.rejects(train(m, { train: source(), epochs: 1, warmupEpochs: 0, batchSize: 32, devices: [0, 64] }), (e) => {
    console.log(e.message);
    return e.code === 'CONFIG' && /device 64 does not exist/.test(e.message) && /it has \d+/.test(e.message);
  });
  m.dispose();
});

test('devices: [0, 1] (NCCL) is within 1e-5 of one GPU with microBatches: 2', async (t) => {
  let two;
  try {
    two = await run(t, { devices: [0, 1] });
  } catch (e) {
    if (e.code === 'CONFIG' && /it has 1 /.test(e.message)) {
      t.skip(`one GPU here: ${e.message}`);
      return;
    }
    throw e;
  }
  if (!two) return;
  const micro = await run(t, { microBatches: 2 });
  const e = maxAbs(micro.tensors, two.tensors);
  console.log(`2 GPUs (NCCL) vs 1 GPU × 2 micro-batches: max |Δ| ${e.toExponential(2)}`);
  assert.ok(e <= 1e-5, `max |Δ| ${e}`);
});
