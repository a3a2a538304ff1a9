/**
 * Compares the five fine-tuning methods — linear probe, LoRA, SNELL, SNELLA and full fine-tuning —
 * on one data set under one recipe, each from a freshly loaded checkpoint, and prints a table.
 *
 *   npx tsx examples/compare-methods.ts                       # bundled demo data, 3 epochs
 *   npx tsx examples/compare-methods.ts --epochs 10 --methods snella,lora
 *   npx tsx examples/compare-methods.ts --data ../shared/data/flowers102-64 \
 *     --train-split train800val200 --test-split test --epochs 40 --batch 64 --lr 1e-3
 *
 * Options (defaults in brackets):
 *   --model FILE          timm-named ViT safetensors [assets/models/vit_tiny_patch8_64.safetensors]
 *   --data DIR            list files + images.tar, or ImageFolder class folders [assets/flowers10-64]
 *   --train-split NAME    training split (list file without .txt, or sub-folder) [train]
 *   --test-split NAME     test split [test]
 *   --methods LIST        comma-separated [linear,lora,snell,snella,full]
 *   --epochs N            epochs [3]      --batch N   batch size [32]     --lr X   peak lr [2e-3]
 *   --warmup N            warm-up epochs [1]          --rank R   rank of LoRA/SNELL/SNELLA [8]
 *   --s0 X / --sT X       initial / target sparsity of SNELL(A) [0.01 / 0.5]
 *   --train-per-class N   use only the first N training images of each class [all]
 *   --test-per-class N    use only the first N test images of each class [all]
 *   --seed N              seed of head/adapter init and batch order [0]
 *   --device D            auto | cpu | cuda [auto]
 *
 * SNELL keeps one fixed sparsity (s0) in every layer; SNELLA starts at s0 and its allocator moves the
 * layers to sT overall. The `kept ΔW` column is the fraction of adapter entries kept at the end.
 */
import { parseArgs } from 'node:util';
import * as path from 'node:path';
import { evaluate, ImageDataset, train, VitModel, type Method, type SampleRef } from 'snella';

const ROOT = path.resolve(__dirname, '..');
const { values: a } = parseArgs({
  options: {
    model: { type: 'string', default: path.join(ROOT, 'assets/models/vit_tiny_patch8_64.safetensors') },
    data: { type: 'string', default: path.join(ROOT, 'assets/flowers10-64') },
    'train-split': { type: 'string', default: 'train' },
    'test-split': { type: 'string', default: 'test' },
    methods: { type: 'string', default: 'linear,lora,snell,snella,full' },
    epochs: { type: 'string', default: '3' },
    batch: { type: 'string', default: '32' },
    lr: { type: 'string', default: '2e-3' },
    warmup: { type: 'string', default: '1' },
    rank: { type: 'string', default: '8' },
    s0: { type: 'string', default: '0.01' },
    sT: { type: 'string', default: '0.5' },
    'train-per-class': { type: 'string' },
    'test-per-class': { type: 'string' },
    seed: { type: 'string', default: '0' },
    device: { type: 'string', default: 'auto' },
  },
});

/** The first `k` images of every class of `ds`, as a new data set (same classes and options). */
function perClass(ds: ImageDataset, k: number | undefined): ImageDataset {
  if (k === undefined) return ds;
  const seen = new Map<number, number>();
  const picked: SampleRef[] = ds.samples.filter((s) => {
    const n = seen.get(s.label) ?? 0;
    seen.set(s.label, n + 1);
    return n < k;
  });
  const opts = { imageSize: ds.imageSize, normalization: ds.normalization, numClasses: ds.numClasses };
  return new ImageDataset(picked, opts, ds.classNames);
}

interface Row {
  method: Method;
  trainable: number;
  kept?: number;
  seconds: number;
  imagesPerSecond: number;
  top1: number;
}

async function main(): Promise<void> {
  const num = (k: keyof typeof a) => (a[k] === undefined ? undefined : Number(a[k]));
  const methods = a.methods!.split(',').map((m) => m.trim()) as Method[];
  const probe = VitModel.load(a.model!, { device: a.device as 'auto' | 'cpu' | 'cuda' });
  const { img_size, mean, std } = probe.config;
  if (probe.deviceReason) console.log(`device: cpu (${probe.deviceReason})`);
  probe.dispose();
  const opts = { imageSize: img_size, normalization: { mean, std } };
  const trainSet = perClass(await ImageDataset.open(a.data!, a['train-split'], opts), num('train-per-class'));
  const testSet = perClass(await ImageDataset.open(a.data!, a['test-split'], opts), num('test-per-class'));
  await Promise.all([trainSet.prepare(), testSet.prepare()]); // decode once, shared by every method
  console.log(
    `${trainSet.length} training / ${testSet.length} test images, ${trainSet.numClasses} classes; ` +
      `${a.epochs} epochs, batch ${a.batch}, lr ${a.lr}`,
  );

  const rows: Row[] = [];
  for (const method of methods) {
    const model = VitModel.load(a.model!, { device: a.device as 'auto' | 'cpu' | 'cuda' });
    try {
      model.attach({ method, numClasses: trainSet.numClasses, rank: num('rank'), s0: num('s0'), seed: num('seed') });
      const r = await train(model, {
        train: trainSet,
        epochs: num('epochs'),
        batchSize: num('batch'),
        lr: num('lr'),
        warmupEpochs: num('warmup'),
        sT: num('sT'),
        seed: num('seed'),
      });
      const ev = await evaluate(model, testSet, 64);
      const rep = model.report();
      const entries = rep.reduce((s, l) => s + l.entries, 0);
      rows.push({
        method,
        trainable: model.trainableCount,
        kept: entries ? rep.reduce((s, l) => s + l.kept, 0) / entries : undefined,
        seconds: r.seconds,
        imagesPerSecond: r.imagesPerSecond,
        top1: ev.top1,
      });
      console.log(`  ${method}: done in ${r.seconds.toFixed(1)} s`);
    } finally {
      model.dispose();
    }
  }

  const table = [
    ['method', 'trainable', 'kept ΔW', 'train s', 'img/s', 'top-1'],
    ...rows.map((r) => [
      r.method,
      r.trainable.toLocaleString('en-US'),
      r.kept === undefined ? '-' : `${(r.kept * 100).toFixed(1)}%`,
      r.seconds.toFixed(1),
      r.imagesPerSecond.toFixed(1),
      `${(r.top1 * 100).toFixed(2)}%`,
    ]),
  ];
  const widths = table[0].map((_, c) => Math.max(...table.map((row) => row[c].length)));
  const line = (row: string[]) => row.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]) : cell.padStart(widths[c]))).join(' | ');
  console.log('');
  console.log(line(table[0]));
  console.log(widths.map((w) => '-'.repeat(w)).join('-|-'));
  for (const row of table.slice(1)) console.log(line(row));
}

main().catch((e) => {
  console.error(e instanceof Error ? `error: ${e.message}` : e);
  process.exitCode = 1;
});
