/**
 * A dependency-free training entry point for machines without node_modules (the GPU machine):
 * trains from pre-decoded {@link TensorDataset} files and prints one JSON result line.
 *
 * `node dist/gpu/train-tensors.js --model M --train T.safetensors --test E.safetensors
 *   [--device cuda] [--precision f32|tf32|bf16] [--method snella] [--rank 8] [--s0 0.01] [--sT 0.5] [--epochs 40] [--batch 64]
 *   [--lr 1e-3] [--wd 0.05] [--warmup 4] [--seed 0] [--out DIR]`
 * @module
 */
import { TensorDataset } from '../data/tensor';
import { VitModel, type Device, type Method, type Precision } from '../model';
import { evaluate, train } from '../train';

function args(argv: string[]): Record<string, string> {
  const o: Record<string, string> = {};
  for (let i = 0; i < argv.length; i++) {
    if (!argv[i].startsWith('--')) throw new Error(`unexpected argument ${argv[i]}`);
    o[argv[i].slice(2)] = argv[i + 1];
    i++;
  }
  return o;
}

async function main(): Promise<void> {
  const a = args(process.argv.slice(2));
  const num = (k: string, d: number) => (a[k] === undefined ? d : Number(a[k]));
  const model = VitModel.load(a.model, { device: (a.device ?? 'auto') as Device, precision: (a.precision ?? 'f32') as Precision });
  const { mean, std } = model.config;
  const tr = TensorDataset.fromSafetensors(a.train, { normalization: { mean, std } });
  const te = TensorDataset.fromSafetensors(a.test, { normalization: { mean, std } });
  model.attach({ method: (a.method ?? 'snella') as Method, numClasses: tr.numClasses, rank: num('rank', 8), s0: num('s0', 0.01), seed: num('seed', 0) });
  const r = await train(model, {
    train: tr,
    epochs: num('epochs', 40),
    batchSize: num('batch', 64),
    lr: num('lr', 1e-3),
    weightDecay: num('wd', 0.05),
    warmupEpochs: num('warmup', 4),
    sT: num('sT', 0.5),
    seed: num('seed', 0),
    callbacks: { onEpochEnd: (e) => void process.stderr.write(`epoch ${e.epoch} loss ${e.loss.toFixed(4)} acc ${e.accuracy.toFixed(3)} ${e.imagesPerSecond.toFixed(0)} img/s\n`) },
  });
  const ev = await evaluate(model, te, 256);
  const rep = model.report();
  const total = rep.reduce((s, l) => s + l.entries, 0);
  if (a.out) model.saveAdapter(a.out, { overwrite: true });
  process.stdout.write(
    JSON.stringify({
      method: a.method ?? 'snella',
      device: model.device,
      test_top1: ev.top1,
      n_test: ev.count,
      train_s: r.seconds,
      img_per_s: r.imagesPerSecond,
      kept_fraction: total ? rep.reduce((s, l) => s + l.kept, 0) / total : null,
      trainable: model.trainableCount,
    }) + '\n',
  );
  model.dispose();
}

main().catch((e) => {
  process.stderr.write(`error: ${(e as Error).message}\n`);
  process.exitCode = 1;
});
