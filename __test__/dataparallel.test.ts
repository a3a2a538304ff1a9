// Gradient accumulation and data-parallel training through the API and the CLI, on the CPU:
// - `devices: [0, 1, 2]` (3 CPU ranks in this process) equals `microBatches: 3` bit for bit
//   (every trained tensor and the allocator's statistics, the step losses, the sparsities);
// - a multi-process group (`distributed`, two models joining over a TCP rendezvous on localhost)
//   equals `microBatches: 2` bit for bit; so does the CLI with two real processes;
// - both are within 1e-5 of plain training (f32 summation order only);
// - options out of range are CONFIG errors naming the field.
import test from 'ava';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { readSafetensors, SnellaError, train, VitModel, type TrainOptions, type TrainResult } from '../ts';
import { cli, smallData } from './helpers/cli';
import { TINY, VIT_TINY, randomSource, tmpDir } from './helpers/tiny';


/** A TCP port that was free a moment ago on localhost. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

interface Run {
  result: TrainResult;
  losses: number[];
  sparsities: number[];
  tensors: Record<string, Float32Array>;
  file: Buffer;
}

/** Trains the tiny ViT (SNELLA) on 30 random images, 3 epochs of batches 8, 8, 8, 6, and saves the adapter. */
async function run(extra: Partial<TrainOptions>): Promise<Run> {
  const m = VitModel.load(TINY, { device: 'cpu' });
  m.attach({ method: 'snella', numClasses: 5, rank: 4, s0: 0.3, seed: 7 });
  const losses: number[] = [];
  const result = await train(m, {
    train: randomSource(30, { seed: 5 }),
    epochs: 3,
    batchSize: 8,
    lr: 1e-2,
    warmupEpochs: 1,
    sT: 0.6,
    seed: 3,
    callbacks: { onStep: (s) => void losses.push(s.loss) },
    ...extra,
  });
  const dir = tmpDir('snella-dp-');
  m.saveAdapter(dir);
  const file = path.join(dir, 'adapter_model.safetensors');
  const tensors = Object.fromEntries(Object.entries(readSafetensors(file).tensors).map(([k, v]) => [k, v.data]));
  const out = { result, losses, sparsities: m.report().map((l) => l.sparsity), tensors, file: fs.readFileSync(file) };
  m.dispose();
  fs.rmSync(dir, { recursive: true, force: true });
  return out;
}

function maxAbsDiff(a: Record<string, Float32Array>, b: Record<string, Float32Array>): number {
  let d = 0;
  for (const [k, x] of Object.entries(a)) {
    if (k.startsWith('allocator.')) continue;
    const y = b[k];
    for (let i = 0; i < x.length; i++) d = Math.max(d, Math.abs(x[i] - y[i]));
  }
  return d;
}

test('devices: 3 CPU ranks equal microBatches: 3 bit for bit, and plain training within 1e-5', async (t) => {
  const [micro, ranks, plain] = [await run({ microBatches: 3 }), await run({ devices: [0, 1, 2] }), await run({})];
  t.deepEqual(ranks.result.dataParallel, { kind: 'local', world: 3, rank: 0, localRanks: 3 });
  t.is(micro.result.dataParallel, undefined);
  t.is(ranks.losses.length, 12);
  t.deepEqual(ranks.losses, micro.losses);
  t.deepEqual(ranks.sparsities, micro.sparsities);
  t.notDeepEqual(ranks.sparsities, ranks.sparsities.map(() => 0.3), 'the allocator re-allocated');
  t.true(ranks.file.equals(micro.file), 'adapter file (trained tensors + allocator statistics) byte-identical');
  t.false(plain.file.equals(micro.file), 'splitting the batch does change the rounding');
  const d = maxAbsDiff(plain.tensors, ranks.tensors);
  t.log(`3 CPU ranks vs plain: max |Δ| ${d.toExponential(2)}`);
  t.true(d <= 1e-5, `max |Δ| ${d}`);
});

test('distributed: two models joining over a TCP rendezvous equal microBatches: 2 bit for bit', async (t) => {
  t.timeout(120_000);
  const port = await freePort();
  const rendezvous = `127.0.0.1:${port}`;
  const [r0, r1] = await Promise.all([0, 1].map((rank) => run({ distributed: { rendezvous, rank, world: 2, timeoutSeconds: 60 } })));
  const micro = await run({ microBatches: 2 });
  t.deepEqual(r0.result.dataParallel, { kind: 'tcp', world: 2, rank: 0, localRanks: 1 });
  t.deepEqual(r1.result.dataParallel, { kind: 'tcp', world: 2, rank: 1, localRanks: 1 });
  for (const r of [r0, r1]) {
    t.deepEqual(r.losses, micro.losses);
    t.true(r.file.equals(micro.file), 'adapter file byte-identical');
  }
});

test('distributed: a rendezvous nobody joins is a COMM_ERROR naming the address', async (t) => {
  const port = await freePort();
  const e = await t.throwsAsync(run({ distributed: { rendezvous: `127.0.0.1:${port}`, rank: 0, world: 2, timeoutSeconds: 0.5 } }), { instanceOf: SnellaError });
  t.is(e?.code, 'COMM_ERROR');
  t.regex(e?.message ?? '', new RegExp(`127\\.0\\.0\\.1:${port}.*ranks 1 of world 2`));
});

test('microBatches, devices and distributed out of range are CONFIG errors naming the field', async (t) => {
  const cases: [Partial<TrainOptions>, RegExp][] = [
    [{ microBatches: 0 }, /microBatches = 0: an integer in \[1, batchSize = 8\]/],
    [{ microBatches: 9 }, /microBatches = 9/],
    [{ devices: [] }, /devices = \[\]: a non-empty array of distinct device ordinals/],
    [{ devices: [0, 0] }, /devices = \[0,0\]/],
    [{ devices: [...Array(9).keys()] }, /at most batchSize = 8 devices/],
    [{ devices: [0, 1], distributed: { rendezvous: 'h:1', rank: 0, world: 2 } }, /not together with distributed/],
    [{ distributed: { rendezvous: 'h:1', rank: 2, world: 2 } }, /distributed\.rank = 2: an integer in \[0, world = 2\)/],
    [{ distributed: { rendezvous: 'h:1', rank: 0, world: 0 } }, /distributed\.world = 0/],
    [{ distributed: { rendezvous: 'localhost', rank: 0, world: 2 } }, /distributed\.rendezvous = localhost: host:port/],
  ];
  for (const [opts, re] of cases) {
    const e = await t.throwsAsync(run(opts), { instanceOf: SnellaError });
    t.is(e?.code, 'CONFIG');
    t.regex(e?.message ?? '', re);
  }
});

test('snella train: two processes (--rendezvous/--world-rank/--world) equal --micro-batches 2 bit for bit', async (t) => {
  t.timeout(600_000);
  const data = smallData();
  const base = ['--model', VIT_TINY, '--data', data, '--train-split', 'train', '--test-split', 'test', '--method', 'snella',
    '--epochs', '2', '--batch', '8', '--lr', '2e-3', '--warmup', '1', '--seed', '4', '--device', 'cpu', '--json'];
  const [out0, out1, outM] = [tmpDir('snella-dp-r0-'), tmpDir('snella-dp-r1-'), tmpDir('snella-dp-m-')];
  const rv = `127.0.0.1:${await freePort()}`;
  const [a, b] = await Promise.all([
    cli([...base, '--out', out0, '--rendezvous', rv, '--world-rank', '0', '--world', '2']),
    cli([...base, '--out', out1, '--rendezvous', rv, '--world-rank', '1', '--world', '2']),
  ]);
  t.is(a.code, 0, a.err);
  t.is(b.code, 0, b.err);
  const m = await cli([...base, '--out', outM, '--micro-batches', '2']);
  t.is(m.code, 0, m.err);
  const f = 'adapter/adapter_model.safetensors';
  t.true(fs.readFileSync(path.join(out0, f)).equals(fs.readFileSync(path.join(outM, f))), 'rank 0 adapter equals the micro-batch run');
  t.false(fs.existsSync(path.join(out1, f)), 'only rank 0 writes the adapter');
  const last = (o: string) => JSON.parse(o.trim().split('\n').at(-1)!) as { testTop1: number; world: number; microBatches: number; precision: string; adapterDir?: string };
  const [r0, r1, rm] = [last(a.out), last(b.out), last(m.out)];
  t.is(r0.testTop1, rm.testTop1);
  // the results say how they were made; rank 1 names no adapter (it writes none)
  t.like(r0, { world: 2, microBatches: 1, precision: 'f32' });
  t.like(rm, { world: 1, microBatches: 2 });
  t.is(r1.adapterDir, undefined);
  t.truthy(r0.adapterDir);
  // usage errors name the flags
  const bad = await cli([...base, '--out', out1, '--gpus', '2']);
  t.is(bad.code, 2);
  t.regex(bad.err, /gpus = 2: --gpus needs CUDA GPUs, and the model runs on the cpu/);
  // an error raised inside training, in the human (progress-bar) mode, ends the process with code 2
  // (a running progress bar used to keep it alive)
  const human = base.filter((x) => x !== '--json');
  const tooMany = await cli([...human, '--out', out1, '--micro-batches', '9']);
  t.is(tooMany.code, 2);
  t.regex(tooMany.err, /error \[CONFIG\]: invalid config: microBatches = 9/);
  const half = await cli([...base, '--out', out1, '--rendezvous', rv]);
  t.is(half.code, 2);
  t.regex(half.err, /--rendezvous host:port, --world-rank R and --world W go together/);
  // a lone rank gives up after --rendezvous-timeout with a COMM_ERROR naming the address
  const lone = `127.0.0.1:${await freePort()}`;
  const started = Date.now();
  const alone = await cli([...base, '--out', out1, '--rendezvous', lone, '--world-rank', '0', '--world', '2', '--rendezvous-timeout', '1']);
  t.is(alone.code, 1); // a failure, not a usage error (EXIT.failure)
  t.regex(alone.err, /COMM_ERROR/);
  t.true(alone.err.includes(lone), alone.err);
  t.true(Date.now() - started < 60_000, 'the lone rank stops after about a second, not the default 600 s');
  // in the human mode no progress bar is drawn before that error, and a bad option of a
  // multi-process run is reported before the wait for the other ranks
  const aloneHuman = await cli([...human, '--out', out1, '--rendezvous', lone, '--world-rank', '0', '--world', '2', '--rendezvous-timeout', '1']);
  t.is(aloneHuman.code, 1);
  t.false(/epoch \d+\/\d+ \|/.test(aloneHuman.out + aloneHuman.err), 'no progress bar before the rendezvous error');
  const badOpt = await cli([...human, '--out', out1, '--rendezvous', lone, '--world-rank', '0', '--world', '2', '--warmup', '99']);
  t.is(badOpt.code, 2);
  t.regex(badOpt.err, /warmupEpochs = 99/);
  t.false((badOpt.out + badOpt.err).includes('waiting for all'), 'the option error comes before the wait');
  const stray = await cli([...base, '--out', out1, '--rendezvous-timeout', '5']);
  t.is(stray.code, 2);
  t.regex(stray.err, /--rendezvous-timeout applies to a multi-process group/);
  for (const d of [data, out0, out1, outM]) fs.rmSync(d, { recursive: true, force: true });
});
