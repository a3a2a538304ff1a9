/**
 * Resume from a checkpoint: a run that is stopped (Ctrl-C, a crash, an AbortSignal) continues where
 * its last checkpoint left it, and ends exactly as if it had never stopped.
 *
 *   npx tsx examples/resume.ts --out runs/resume              # trains; Ctrl-C any time
 *   npx tsx examples/resume.ts --out runs/resume --resume     # continues from runs/resume/checkpoint
 *   npx tsx examples/resume.ts --out runs/resume --stop-after 3   # stops itself after 3 steps (demo/tests)
 *
 * `train(model, { checkpointDir, resume })` saves the trainable tensors, AdamW moments, allocator
 * state and schedule position at each epoch end and when stopped, atomically; with `resume` it
 * restores them and skips the batches already done (the batch order is a function of seed and epoch).
 *
 * Options (defaults in brackets): --data DIR [assets/flowers10-64] --model FILE
 *   [assets/models/vit_tiny_patch8_64.safetensors] --out DIR [runs/resume] --epochs N [3]
 *   --batch N [60] --resume --stop-after N (abort after N steps of this call) --device D [auto]
 */
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { ImageDataset, train, VitModel, type Device } from 'snella';

const ROOT = path.resolve(__dirname, '..');
const { values: a } = parseArgs({
  options: {
    data: { type: 'string', default: path.join(ROOT, 'assets/flowers10-64') },
    model: { type: 'string', default: path.join(ROOT, 'assets/models/vit_tiny_patch8_64.safetensors') },
    out: { type: 'string', default: 'runs/resume' },
    epochs: { type: 'string', default: '3' },
    batch: { type: 'string', default: '60' },
    resume: { type: 'boolean', default: false },
    'stop-after': { type: 'string' },
    device: { type: 'string', default: 'auto' },
  },
});

async function main(): Promise<void> {
  const model = VitModel.load(a.model!, { device: a.device as Device });
  const cfg = model.config;
  const trainSet = await ImageDataset.open(a.data!, 'train', { imageSize: cfg.img_size, normalization: { mean: cfg.mean, std: cfg.std } });
  // The same method and options as the stopped run (the checkpoint refuses anything else).
  model.attach({ method: 'snella', numClasses: trainSet.numClasses, rank: 8, seed: 0 });
  const ac = new AbortController();
  process.once('SIGINT', () => ac.abort()); // Ctrl-C: stop at the next step boundary, checkpoint kept
  const stopAfter = a['stop-after'] === undefined ? Infinity : Number(a['stop-after']);
  let done = 0;
  const r = await train(model, {
    train: trainSet,
    epochs: Number(a.epochs),
    batchSize: Number(a.batch),
    warmupEpochs: 1,
    checkpointDir: path.join(a.out!, 'checkpoint'),
    resume: a.resume,
    overwriteCheckpoint: !a.resume,
    signal: ac.signal,
    callbacks: {
      onStep: (s) => {
        console.log(`step ${s.step}/${s.totalSteps} epoch ${s.epoch} loss ${s.loss.toFixed(4)}`);
        if (++done >= stopAfter) ac.abort();
      },
    },
  });
  const from = r.resumedFrom ? ` (resumed at step ${r.resumedFrom.step})` : '';
  console.log(r.aborted ? `stopped after step ${model.native.progress()?.step}; continue with --resume` : `finished${from}: ${r.steps} steps in this call`);
  console.log(`head.weight[0..3] = ${Array.from(model.tensor('head.weight').data.slice(0, 3)).join(', ')}`);
  model.dispose();
}

main().catch((e) => {
  console.error(`error: ${(e as Error).message}`);
  process.exitCode = 1;
});
