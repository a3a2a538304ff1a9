import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CHECKPOINT_FILE, ImageDataset, SnellaError, VitModel, train, type BatchSource, type TrainOptions } from '../ts';
import { FLOWERS, TINY, VIT_TINY, randomSource, tmpDir } from './helpers/tiny';

const ckptBytes = (dir: string) => fs.readFileSync(path.join(dir, CHECKPOINT_FILE));

/** Every trainable tensor (from the model's checkpoint file) with bits, for readable diffs. */
function sameCheckpoint(t: import('ava').ExecutionContext, a: string, b: string): void {
  const x = ckptBytes(a);
  const y = ckptBytes(b);
  t.true(x.length > 1000);
  t.true(x.equals(y), 'checkpoint files (parameters, AdamW moments, allocator, trainer) are byte-identical');
}

// (b) The acceptance run: SNELLA on the bundled flowers subset, 2 epochs of batch 120. A run stopped
// after epoch 0 and resumed in a fresh model ends bit-identical to an uninterrupted one.
test.serial('train() with checkpointDir + resume on flowers10-64 equals an uninterrupted run bit for bit', async (t) => {
  const tr = await ImageDataset.open(FLOWERS, 'train', { imageSize: 64 });
  await tr.prepare();
  const opts = { train: tr, epochs: 2, batchSize: 120, warmupEpochs: 1, lr: 2e-3, sT: 0.5, seed: 5 } satisfies TrainOptions;
  const attach = (m: VitModel) => m.attach({ method: 'snella', numClasses: 10, rank: 8, seed: 2 });

  const straightDir = tmpDir();
  const a = VitModel.load(VIT_TINY, { device: 'cpu' });
  attach(a);
  const ra = await train(a, { ...opts, checkpointDir: straightDir });
  t.is(ra.steps, 4);
  t.false(ra.aborted);

  const dir = tmpDir();
  const b = VitModel.load(VIT_TINY, { device: 'cpu' });
  attach(b);
  const ac = new AbortController();
  const rb = await train(b, { ...opts, checkpointDir: dir, signal: ac.signal, callbacks: { onEpochEnd: () => ac.abort() } });
  t.true(rb.aborted);
  t.is(rb.steps, 2);
  b.dispose(); // the process "dies"

  const c = VitModel.load(VIT_TINY, { device: 'cpu' }); // fresh: the checkpoint attaches the method
  attach(c);
  const seen: number[] = [];
  const rc = await train(c, { ...opts, checkpointDir: dir, resume: true, callbacks: { onStep: (s) => void seen.push(s.step) } });
  t.deepEqual(seen, [3, 4], 'finished batches are skipped, step numbers continue');
  t.deepEqual(rc.resumedFrom, { epoch: 1, batch: 0, beginEpoch: true, step: 2, finished: false });
  sameCheckpoint(t, straightDir, dir);
  t.deepEqual(c.allocator(), a.allocator());
  for (const name of ['head.weight', 'cls_token', 'blocks.3.attn.q.snella_A', 'blocks.11.mlp.fc2.snella_mix']) {
    t.deepEqual(Array.from(c.tensor(name).data), Array.from(a.tensor(name).data), name);
  }
  // Resuming a finished run does nothing.
  const rd = await train(c, { ...opts, checkpointDir: dir, resume: true });
  t.is(rd.steps, 0);
  a.dispose();
  c.dispose();
});

// (2) AbortSignal after step 2 (mid-epoch): the checkpoint is saved at that step boundary and the
// resumed run ends bit-identical to an uninterrupted one.
test('abort after step 2 saves a checkpoint; resuming gives the uninterrupted parameters bit for bit', async (t) => {
  const data = randomSource(40, { seed: 11 });
  const opts = { train: data, epochs: 3, batchSize: 8, warmupEpochs: 1, lr: 1e-2, sT: 0.6, seed: 9 } satisfies TrainOptions;
  const attach = (m: VitModel) => m.attach({ method: 'snella', numClasses: 5, rank: 4, s0: 0.1, seed: 4 });

  const straightDir = tmpDir();
  const a = VitModel.load(TINY, { device: 'cpu' });
  attach(a);
  t.is((await train(a, { ...opts, checkpointDir: straightDir })).steps, 15);

  const dir = tmpDir();
  const b = VitModel.load(TINY, { device: 'cpu' });
  attach(b);
  const ac = new AbortController();
  const rb = await train(b, { ...opts, checkpointDir: dir, signal: ac.signal, callbacks: { onStep: (s) => { if (s.step === 2) ac.abort(); } } });
  t.true(rb.aborted);
  t.is(rb.steps, 2);
  b.dispose();

  const c = VitModel.load(TINY, { device: 'cpu' });
  const info = c.loadCheckpoint(dir); // attaches the saved method
  t.deepEqual(info.resume, { epoch: 0, batch: 2, beginEpoch: false, step: 2, finished: false });
  t.deepEqual(info.extra, { seed: 9, trainLength: 40 });
  const steps: number[] = [];
  await train(c, { ...opts, checkpointDir: dir, resume: true, callbacks: { onStep: (s) => void steps.push(s.step) } });
  t.deepEqual(steps, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
  sameCheckpoint(t, straightDir, dir);
  a.dispose();
  c.dispose();
});

test('checkpoint options: no silent replacement, no resume from nothing, same batch order required', async (t) => {
  const data = randomSource(8);
  const dir = tmpDir();
  const m = VitModel.load(TINY, { device: 'cpu' });
  m.attach({ method: 'linear', numClasses: 5 });
  const e0 = t.throws(() => m.saveCheckpoint(dir)) as SnellaError;
  t.is(e0.code, 'CONFIG', 'nothing to checkpoint before training is prepared');
  await train(m, { train: data, epochs: 1, batchSize: 4, warmupEpochs: 0, checkpointDir: dir });
  const e1 = (await t.throwsAsync(() => train(m, { train: data, epochs: 1, batchSize: 4, warmupEpochs: 0, checkpointDir: dir }))) as SnellaError;
  t.is(e1.code, 'FILE');
  t.regex(e1.message, /checkpoint\.safetensors: a checkpoint is already there; pass resume/);
  const e2 = t.throws(() => m.saveCheckpoint(dir)) as SnellaError;
  t.is(e2.code, 'FILE');
  t.regex(e2.message, /already exists/);
  const empty = tmpDir();
  const e3 = (await t.throwsAsync(() => train(m, { train: data, epochs: 1, batchSize: 4, warmupEpochs: 0, checkpointDir: empty, resume: true }))) as SnellaError;
  t.is(e3.code, 'FILE');
  t.regex(e3.message, /no checkpoint to resume from/);
  const m2 = VitModel.load(TINY, { device: 'cpu' });
  m2.attach({ method: 'linear', numClasses: 5 });
  const e4 = (await t.throwsAsync(() => train(m2, { train: data, epochs: 1, batchSize: 4, warmupEpochs: 0, seed: 3, checkpointDir: dir, resume: true }))) as SnellaError;
  t.is(e4.code, 'CONFIG');
  t.regex(e4.message, /seed = 3: must equal the checkpoint's value 0/);
  const e5 = (await t.throwsAsync(() => train(m2, { train: data, epochs: 1, batchSize: 4, warmupEpochs: 0, lr: 5e-3, checkpointDir: dir, resume: true }))) as SnellaError;
  t.is(e5.code, 'CONFIG');
  t.regex(e5.message, /train\.lr = 0\.005: must equal the checkpoint's value 0\.001/);
  const m3 = VitModel.load(TINY, { device: 'cpu' });
  m3.attach({ method: 'snella', numClasses: 5, rank: 4 });
  const e6 = t.throws(() => m3.loadCheckpoint(dir)) as SnellaError;
  t.is(e6.code, 'CONFIG');
  t.regex(e6.message, /method\.kind = "snella": must equal the checkpoint's value "linear"/);
  // A damaged checkpoint is an error naming the file, never a crash.
  const bad = tmpDir();
  const bytes = ckptBytes(dir);
  fs.writeFileSync(path.join(bad, CHECKPOINT_FILE), bytes.subarray(0, bytes.length - 7));
  const m4 = VitModel.load(TINY, { device: 'cpu' });
  const e7 = t.throws(() => m4.loadCheckpoint(bad)) as SnellaError;
  t.is(e7.code, 'TENSOR', 'the cut tensor is named');
  t.true(e7.message.includes(path.join(bad, CHECKPOINT_FILE)), e7.message);
  t.regex(e7.message, /outside the file's \d+ data bytes \(truncated file/);
  for (const x of [m, m2, m3, m4]) x.dispose();
});

// (3) Numerics: a NaN image in epoch 1 stops training at that step naming the loss; the checkpoint
// of epoch 0 stays as it was and still loads.
test('a NaN batch stops train() at that step with NON_FINITE; the last good checkpoint is kept', async (t) => {
  let poisoned = false;
  const data = randomSource(8, { poison: (i) => poisoned && i === 3 });
  const dir = tmpDir();
  const m = VitModel.load(TINY, { device: 'cpu' });
  m.attach({ method: 'snella', numClasses: 5, rank: 4 });
  let good: Buffer | undefined;
  const steps: number[] = [];
  const e = (await t.throwsAsync(() =>
    train(m, {
      train: data, epochs: 3, batchSize: 4, warmupEpochs: 0, checkpointDir: dir,
      callbacks: {
        onStep: (s) => void steps.push(s.step),
        onEpochStart: (ep) => {
          if (ep === 1) {
            good = ckptBytes(dir); // saved at the end of epoch 0
            poisoned = true;
          }
        },
      },
    }),
  )) as SnellaError;
  t.is(e.code, 'NON_FINITE');
  const at = Number(/non-finite value in 'loss' at step (\d+)$/.exec(e.message)?.[1]);
  t.true(at === 3 || at === 4, e.message);
  t.deepEqual(steps, [1, 2, 3].slice(0, at - 1), 'training stops at the bad step');
  t.truthy(good);
  t.true(ckptBytes(dir).equals(good!), 'the last good checkpoint is not overwritten');
  const back = VitModel.load(TINY, { device: 'cpu' });
  t.is(back.loadCheckpoint(dir).resume.step, 2);
  // A NaN loss is caught before any update: the parameters stay finite and can still be saved.
  t.notThrows(() => m.saveCheckpoint(tmpDir()));
  m.dispose();
  back.dispose();
});

test('a learning rate that overflows the parameters names the first non-finite parameter; nothing is saved', async (t) => {
  const data = randomSource(8);
  const dir = tmpDir();
  const m = VitModel.load(TINY, { device: 'cpu' });
  m.attach({ method: 'snella', numClasses: 5, rank: 4 });
  await train(m, { train: data, epochs: 2, batchSize: 4, warmupEpochs: 0, lr: 1e-3, checkpointDir: dir });
  const good = ckptBytes(dir);
  const m2 = VitModel.load(TINY, { device: 'cpu' });
  m2.attach({ method: 'snella', numClasses: 5, rank: 4 });
  const e = (await t.throwsAsync(() => train(m2, { train: data, epochs: 2, batchSize: 4, warmupEpochs: 0, lr: 1e39, checkpointDir: dir, overwriteCheckpoint: true }))) as SnellaError;
  t.is(e.code, 'NON_FINITE');
  t.regex(e.message, /non-finite value in 'cls_token \(after the update\)' at step 1/);
  t.true(ckptBytes(dir).equals(good), 'the previous checkpoint is kept');
  const e2 = t.throws(() => m2.saveCheckpoint(dir, { overwrite: true })) as SnellaError;
  t.is(e2.code, 'NON_FINITE', 'a poisoned state is never saved');
  t.true(ckptBytes(dir).equals(good));
  m.dispose();
  m2.dispose();
});

test('data order of a resumed epoch: the remaining batches are those the loader would have given', async (t) => {
  const { BatchLoader } = await import('../ts/data');
  const { batchesFrom } = await import('../ts/checkpoint');
  const data: BatchSource = randomSource(23);
  const loader = new BatchLoader(data, { batchSize: 5, shuffle: true, seed: 77, prefetch: 1 });
  const all: number[][] = [];
  for await (const b of loader.epoch(3)) all.push(b.indices);
  for (const start of [0, 1, 3, 4, 5]) {
    const rest: number[][] = [];
    for await (const b of batchesFrom(loader, 3, start)) {
      rest.push(b.indices);
      t.deepEqual(Array.from(b.labels), b.indices.map((i) => data.labels[i]));
    }
    t.deepEqual(rest, all.slice(start), `from batch ${start}`);
  }
});
