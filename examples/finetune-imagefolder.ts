/**
 * Fine-tunes the bundled ViT (or any timm-named checkpoint) on your own images, laid out as an
 * ImageFolder: one sub-folder per class, images (.jpg, .jpeg, .png, .webp) anywhere below it.
 *
 *   my-photos/
 *     cats/   001.jpg 002.png …
 *     dogs/   a.jpg b.jpg …
 *
 *   npx tsx examples/finetune-imagefolder.ts --data my-photos --out runs/my-photos
 *   npx tsx examples/finetune-imagefolder.ts --data my-photos --test my-photos-test --epochs 20
 *
 * Without --test, a seeded `--holdout` fraction of every class (default 0.2) is kept aside as the
 * test set. Images that cannot be decoded are skipped and listed. The run writes
 * OUT/adapter/ (adapter_model.safetensors + adapter_config.json; `VitModel.loadAdapter` reads it)
 * and OUT/classes.json (class names, index = label) for examples/merge-and-export.ts and
 * examples/infer-folder.ts.
 *
 * Options (defaults in brackets):
 *   --data DIR       the ImageFolder (required)          --test DIR   a separate test ImageFolder
 *   --model FILE     checkpoint [assets/models/vit_tiny_patch8_64.safetensors]
 *   --out DIR        output folder [runs/imagefolder]    --holdout X  test fraction per class [0.2]
 *   --method M       snella | snell | lora | linear | full [snella]
 *   --epochs N [10]  --batch N [32]  --lr X [2e-3]  --warmup N [1]  --rank R [8]
 *   --s0 X [0.01]    --sT X [0.5]    --seed N [0]   --device auto|cpu|cuda [auto]
 *   --overwrite      replace an adapter already in OUT/adapter
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { evaluate, ImageDataset, permutation, train, VitModel, type Method, type SampleRef } from 'snella';

const ROOT = path.resolve(__dirname, '..');
const { values: a } = parseArgs({
  options: {
    data: { type: 'string' },
    test: { type: 'string' },
    model: { type: 'string', default: path.join(ROOT, 'assets/models/vit_tiny_patch8_64.safetensors') },
    out: { type: 'string', default: 'runs/imagefolder' },
    holdout: { type: 'string', default: '0.2' },
    method: { type: 'string', default: 'snella' },
    epochs: { type: 'string', default: '10' },
    batch: { type: 'string', default: '32' },
    lr: { type: 'string', default: '2e-3' },
    warmup: { type: 'string', default: '1' },
    rank: { type: 'string', default: '8' },
    s0: { type: 'string', default: '0.01' },
    sT: { type: 'string', default: '0.5' },
    seed: { type: 'string', default: '0' },
    device: { type: 'string', default: 'auto' },
    overwrite: { type: 'boolean', default: false },
  },
});

/**
 * Splits `ds` per class: a seeded `fraction` of each class (at least one image when the class has
 * two or more) goes to the test part, the rest to the training part.
 */
function holdout(ds: ImageDataset, fraction: number, seed: number): { trainSet: ImageDataset; testSet: ImageDataset } {
  const byClass = new Map<number, SampleRef[]>();
  for (const s of ds.samples) byClass.set(s.label, [...(byClass.get(s.label) ?? []), s]);
  const tr: SampleRef[] = [];
  const te: SampleRef[] = [];
  for (const [label, list] of [...byClass].sort((x, y) => x[0] - y[0])) {
    const order = permutation(list.length, seed, label);
    const nTest = list.length < 2 ? 0 : Math.max(1, Math.round(list.length * fraction));
    order.forEach((idx, k) => (k < nTest ? te : tr).push(list[idx]));
  }
  const opts = { imageSize: ds.imageSize, normalization: ds.normalization, numClasses: ds.numClasses, onBadImage: ds.onBadImage };
  return { trainSet: new ImageDataset(tr, opts, ds.classNames), testSet: new ImageDataset(te, opts, ds.classNames) };
}

async function main(): Promise<void> {
  if (!a.data) throw new Error('--data DIR is required (an ImageFolder: one sub-folder per class)');
  const n = (k: keyof typeof a) => Number(a[k]);
  const adapterDir = path.join(a.out!, 'adapter');
  if (!a.overwrite && fs.existsSync(path.join(adapterDir, 'adapter_model.safetensors'))) {
    throw new Error(`${adapterDir} already holds an adapter: pass --overwrite or another --out`);
  }

  const model = VitModel.load(a.model!, { device: a.device as 'auto' | 'cpu' | 'cuda' });
  try {
    if (model.deviceReason) console.log(`device: cpu (${model.deviceReason})`);
    const { img_size, mean, std } = model.config;
    const opts = { imageSize: img_size, normalization: { mean, std }, onBadImage: 'skip' as const };
    const all = await ImageDataset.open(a.data, undefined, opts);
    let trainSet: ImageDataset;
    let testSet: ImageDataset;
    if (a.test) {
      trainSet = all;
      testSet = await ImageDataset.open(a.test, undefined, { ...opts, numClasses: all.numClasses });
      const names = testSet.classNames ?? [];
      if (names.some((c, i) => c !== all.classNames?.[i])) {
        throw new Error(`the class folders of ${a.test} (${names.join(', ')}) differ from those of ${a.data}`);
      }
    } else {
      ({ trainSet, testSet } = holdout(all, n('holdout'), n('seed')));
    }
    await Promise.all([trainSet.prepare(), testSet.prepare()]);
    for (const s of [...trainSet.skipped, ...testSet.skipped]) console.log(`skipped ${s.file}: ${s.reason}`);
    const classes = trainSet.classNames ?? [];
    console.log(`${classes.length} classes (${classes.join(', ')}); ${trainSet.length} training, ${testSet.length} test images`);

    model.attach({ method: a.method as Method, numClasses: trainSet.numClasses, rank: n('rank'), s0: n('s0'), seed: n('seed') });
    console.log(`${a.method}: ${model.trainableCount.toLocaleString('en-US')} trainable values on ${model.device}`);
    const r = await train(model, {
      train: trainSet,
      epochs: n('epochs'),
      batchSize: n('batch'),
      lr: n('lr'),
      warmupEpochs: n('warmup'),
      sT: n('sT'),
      seed: n('seed'),
      callbacks: {
        onEpochEnd: (e) =>
          console.log(
            `epoch ${e.epoch + 1}/${a.epochs}: loss ${e.loss.toFixed(4)}, train top-1 ${(e.accuracy * 100).toFixed(1)}%, ` +
              `${e.imagesPerSecond.toFixed(1)} img/s` +
              (e.sparsity === undefined ? '' : `, sparsity ${(e.sparsity * 100).toFixed(1)}%`),
          ),
      },
    });
    const ev = testSet.length ? await evaluate(model, testSet, 64) : undefined;
    if (ev) console.log(`test top-1: ${(ev.top1 * 100).toFixed(2)}% on ${ev.count} images (loss ${ev.loss.toFixed(4)})`);
    model.saveAdapter(adapterDir, { overwrite: a.overwrite });
    fs.writeFileSync(path.join(a.out!, 'classes.json'), JSON.stringify(classes, null, 1) + '\n');
    fs.writeFileSync(
      path.join(a.out!, 'results.json'),
      JSON.stringify({ method: a.method, classes, trainImages: trainSet.length, testTop1: ev?.top1 ?? null, trainSeconds: r.seconds }, null, 2) + '\n',
    );
    console.log(`adapter written to ${adapterDir}/, class names to ${path.join(a.out!, 'classes.json')}`);
  } finally {
    model.dispose();
  }
}

main().catch((e) => {
  console.error(e instanceof Error ? `error: ${e.message}` : e);
  process.exitCode = 1;
});
