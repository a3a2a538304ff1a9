import test from 'ava';
import { SnellaError, VitModel, train, type AttachOptions, type TrainOptions } from '../ts';
import { TINY, randomSource } from './helpers/tiny';

// Every configuration error names the field as the user spells it and its allowed range. The tiny
// model: dim 12, MLP 48, 5 classes.

const attachCases: [string, Partial<AttachOptions>, RegExp][] = [
  ['rank larger than a dimension', { rank: 16 }, /^invalid config: rank = 16: an integer in \[1, 12\]/],
  ['rank 0', { rank: 0 }, /^invalid config: rank = 0: an integer in \[1, 12\]/],
  ['rank not a multiple of the kernel pieces', { rank: 3 }, /^invalid config: rank = 3: a multiple of the kernel pieces H = 2/],
  ['s0 ≥ 1', { s0: 1 }, /^invalid config: s0 = 1: a sparsity in \[0, 1\)/],
  ['s0 < 0', { s0: -0.5 }, /^invalid config: s0 = -0.5: a sparsity in \[0, 1\)/],
  ['numClasses 0', { numClasses: 0 }, /^invalid config: numClasses = 0: an integer ≥ 1/],
  ['unknown method', { method: 'adalora' as AttachOptions['method'] }, /^invalid config: method = adalora: one of snella, snell, lora, linear, full/],
  ['a misspelt option', { numclasses: 5 } as Partial<AttachOptions>, /^invalid config: numclasses: not an option of attach\(\); did you mean numClasses\? its options: method, numClasses, rank, heads, targets, s0, rule, seed$/],
];

for (const [what, opts, re] of attachCases) {
  test(`attach: ${what}`, (t) => {
    const m = VitModel.load(TINY, { device: 'cpu' });
    const e = t.throws(() => m.attach({ method: 'snella', numClasses: 5, rank: 4, ...opts })) as SnellaError;
    t.is(e.code, 'CONFIG');
    t.regex(e.message, re);
    m.dispose();
  });
}

test('attach: an unknown target names it and lists the real layer names', (t) => {
  const m = VitModel.load(TINY, { device: 'cpu' });
  const e = t.throws(() => m.attach({ method: 'lora', numClasses: 5, rank: 4, targets: ['qkv'] })) as SnellaError;
  t.is(e.code, 'TARGET');
  t.regex(e.message, /^target 'qkv' matches no adaptable layer; available: blocks\.0\.attn\.q, blocks\.0\.attn\.k/);
  t.regex(e.message, /blocks\.1\.mlp\.fc2/);
  m.dispose();
});

const trainCases: [string, Partial<TrainOptions>, RegExp][] = [
  ['sT ≥ 1', { sT: 1 }, /^invalid config: sT = 1: a sparsity in \[0, 1\)/],
  ['sT < 0', { sT: -0.1 }, /^invalid config: sT = -0.1: a sparsity in \[0, 1\)/],
  ['batch 0', { batchSize: 0 }, /^invalid config: batchSize = 0: an integer ≥ 1/],
  ['epochs 0', { epochs: 0 }, /^invalid config: epochs = 0: an integer ≥ 1/],
  ['fractional epochs', { epochs: 1.5 }, /^invalid config: epochs = 1.5: an integer ≥ 1/],
  [
    'an allocator schedule with no room',
    { epochs: 3, allocatorWarmupRounds: 2, allocatorFinalRounds: 1 },
    /^invalid config: allocatorWarmupRounds \+ allocatorFinalRounds = 2 \+ 1: must be at most epochs − 1 = 2, i\.e\. in \[0, 2\] \(the allocator schedule has no room/,
  ],
  ['negative warm-up rounds', { allocatorWarmupRounds: -1 }, /^invalid config: allocatorWarmupRounds = -1: an integer ≥ 0/],
  ['allocator β1 ≥ 1', { allocatorBeta1: 1 }, /^invalid config: allocatorBeta1 = 1: a number in \[0, 1\)/],
  ['allocator β2 < 0', { allocatorBeta2: -0.2 }, /^invalid config: allocatorBeta2 = -0.2: a number in \[0, 1\)/],
  ['allocator interval 0', { allocatorInterval: 0 }, /^invalid config: allocatorInterval = 0: an integer ≥ 1/],
  ['lr 0', { lr: 0 }, /^invalid config: lr = 0: a finite number > 0/],
  ['lr Infinity', { lr: Infinity }, /^invalid config: lr = Infinity: a finite number > 0/],
  ['lr NaN', { lr: Number.NaN }, /^invalid config: lr = NaN: a finite number > 0/],
  ['fractional warm-up', { warmupEpochs: 0.5 }, /^invalid config: warmupEpochs = 0.5: an integer in \[0, epochs = 2\]/],
  ['negative weight decay', { weightDecay: -1 }, /^invalid config: weightDecay = -1: a finite number ≥ 0/],
  ['warm-up longer than the run', { epochs: 2, warmupEpochs: 5 }, /^invalid config: warmupEpochs = 5: an integer in \[0, epochs = 2\]/],
  ['seed out of range', { seed: 2 ** 32 }, /^invalid config: seed = 4294967296: an integer in \[0, 4294967295\]/],
  ['negative seed', { seed: -1 }, /^invalid config: seed = -1: an integer in \[0, 4294967295\]/],
  ['negative prefetch', { prefetch: -1 }, /^invalid config: prefetch = -1: an integer ≥ 0/],
  ['resume without a folder', { resume: true }, /^invalid config: resume = true: needs checkpointDir/],
  ['an unknown option', { learningRate: 0.01 } as Partial<TrainOptions>, /^invalid config: learningRate: not an option of train\(\); its options: train, epochs, batchSize, lr, /],
  ['a miscased option', { batchsize: 8 } as Partial<TrainOptions>, /^invalid config: batchsize: not an option of train\(\); did you mean batchSize\? /],
  ['empty checkpoint folder name', { checkpointDir: '' }, /^invalid config: checkpointDir = : a folder path/],
];

for (const [what, opts, re] of trainCases) {
  test(`train: ${what}`, async (t) => {
    const m = VitModel.load(TINY, { device: 'cpu' });
    m.attach({ method: 'snella', numClasses: 5, rank: 4 });
    const e = (await t.throwsAsync(() => train(m, { train: randomSource(4), epochs: 2, batchSize: 2, warmupEpochs: 0, ...opts }))) as SnellaError;
    t.is(e.code, 'CONFIG');
    t.regex(e.message, re);
    t.is(m.native.progress(), null, 'nothing was trained');
    m.dispose();
  });
}

test('train: an empty training set and a model without a method', async (t) => {
  const m = VitModel.load(TINY, { device: 'cpu' });
  const e = (await t.throwsAsync(() => train(m, { train: randomSource(4), epochs: 1 }))) as SnellaError;
  t.is(e.code, 'CONFIG');
  t.regex(e.message, /^invalid config: method = none: attach\(\) a method before train\(\)/);
  m.attach({ method: 'linear', numClasses: 5 });
  const e2 = (await t.throwsAsync(() => train(m, { train: randomSource(0), epochs: 1 }))) as SnellaError;
  t.regex(e2.message, /^invalid config: train\.length = 0: at least one training image/);
  m.dispose();
});

// The CLI's exit codes for bad usage: commander's own errors (a bad option value, an unknown
// option, a missing required option) end with 2 like the configuration errors; --help with 0.
test('cli: option errors exit with the usage code 2, --help with 0', async (t) => {
  const { cli } = await import('./helpers/cli');
  const bad = await cli(['--model', 'm.safetensors', '--data', 'd', '--lr', 'abc']);
  t.is(bad.code, 2);
  t.regex(bad.err, /--lr must be a number/);
  const unknown = await cli(['--model', 'm.safetensors', '--data', 'd', '--no-such-option']);
  t.is(unknown.code, 2);
  t.regex(unknown.err, /unknown option '--no-such-option'/);
  const missing = await cli(['--data', 'd']);
  t.is(missing.code, 2);
  t.regex(missing.err, /required option '--model <file>' not specified/);
  const help = await cli(['--help']);
  t.is(help.code, 0);
  t.regex(help.out, /--model <file>/);
});
