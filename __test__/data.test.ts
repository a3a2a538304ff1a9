import test from 'ava';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { FLOWERS } from './helpers/tiny';

import {
  BatchLoader,
  IMAGENET_NORMALIZATION,
  ImageDataset,
  ImageDecodeError,
  TarSource,
  mulberry32,
  parseListText,
  permutation,
  type BatchSource,
  type Normalization,
} from '../ts/data';
import {
  GRAY_VALUE,
  QUAD_RGB,
  RGBA_PIXELS,
  SOLID_RGB,
  TRAIN_LIST,
  makeDataFixtures,
  type DataFixtures,
} from './fixtures/data/make';

const IDENTITY: Normalization = { mean: [0, 0, 0], std: [1, 1, 1] };

let fx: DataFixtures;
let tmp: string;

test.before(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'snella-data-'));
  fx = await makeDataFixtures(tmp);
});

test.after.always(() => {
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

/** The expected float32 value of 8-bit value `x` in channel `c`. */
function norm(x: number, c: number, n: Normalization = IMAGENET_NORMALIZATION): number {
  return Math.fround((x / 255 - n.mean[c]) / n.std[c]);
}

function assertClose(t: import('ava').ExecutionContext, actual: number, expected: number, tol: number, what: string): void {
  t.true(Math.abs(actual - expected) <= tol, `${what}: got ${actual}, expected ${expected} ± ${tol}`);
}

// ---------------------------------------------------------------- list files

for (const kind of ['listTar', 'listDir'] as const) {
  test(`fromList (${kind}): labels, order, classes from classes.json`, async (t) => {
    const ds = await ImageDataset.fromList(fx[kind], 'train.txt', { imageSize: 4 });
    t.is(ds.length, TRAIN_LIST.length);
    t.deepEqual([...ds.labels], TRAIN_LIST.map(([, l]) => l));
    t.deepEqual(
      ds.samples.map((s) => s.path),
      TRAIN_LIST.map(([p]) => p),
    );
    t.is(ds.numClasses, 3);
    t.deepEqual(ds.classNames, ['zero', 'one', 'two']);
    t.true(ds.labels instanceof Int32Array);
    if (kind === 'listTar') t.true(ds.describe(0).endsWith(`images.tar:cls1/gray.png`));
    else t.is(ds.describe(0), path.join(fx.listDir, 'cls1', 'gray.png'));
  });
}

test('fromList errors: missing list, bad line, missing image, label out of range', async (t) => {
  const e1 = await t.throwsAsync(ImageDataset.fromList(fx.listTar, 'nope.txt', { imageSize: 4 }));
  t.regex(e1!.message, /list file not found: .*nope\.txt/);

  const e2 = await t.throwsAsync(ImageDataset.fromList(fx.listTar, 'malformed.txt', { imageSize: 4 }));
  t.true(e2!.message.includes(`${path.join(fx.listTar, 'malformed.txt')}:2:`), e2!.message);

  for (const kind of ['listTar', 'listDir'] as const) {
    const e3 = await t.throwsAsync(ImageDataset.fromList(fx[kind], 'missing.txt', { imageSize: 4 }));
    t.true(e3!.message.includes('cls0/nope.png (line 2)'), e3!.message);
    t.true(e3!.message.includes('1 image(s)'), e3!.message);
  }

  const e4 = await t.throwsAsync(ImageDataset.fromList(fx.listTar, 'range.txt', { imageSize: 4, numClasses: 2 }));
  t.true(e4!.message.includes('range.txt:2: label 2 is out of range 0..1'), e4!.message);
  // Without numClasses the 3 names of classes.json bound the labels, and 2 fits.
  t.is((await ImageDataset.fromList(fx.listTar, 'range.txt', { imageSize: 4 })).numClasses, 3);
});

test('parseListText: paths with spaces, blank lines, CRLF, bad label', (t) => {
  t.deepEqual(parseListText('a b/c.jpg 3\r\n\n  x.png 0  \n', 'l.txt'), [
    { path: 'a b/c.jpg', label: 3, line: 1 },
    { path: 'x.png', label: 0, line: 3 },
  ]);
  t.throws(() => parseListText('x.png -1\n', 'l.txt'), { message: /^l\.txt:1: expected/ });
  t.throws(() => parseListText('ok.png 1\nonlypath\n', 'l.txt'), { message: /^l\.txt:2: / });
});

// The bundled 10-class subset of the real Flowers-102 images (assets/flowers10-64, see its PROVENANCE),
// so the test needs nothing outside the repository.
test('real flowers (bundled 10-class subset): list labels and one batch', async (t) => {
  const root = FLOWERS;
  const listFile = path.join(root, 'train.txt');
  const lines = fs.readFileSync(listFile, 'utf8').split('\n').filter(Boolean);
  const firstLines = [lines[0], lines[100], lines[239]];
  const expected = firstLines.map((l) => Number(l.trim().split(/\s+/)[1]));

  const ds = await ImageDataset.open(root, 'train', { imageSize: 64 });
  t.is(ds.length, 240);
  t.deepEqual([ds.labels[0], ds.labels[100], ds.labels[239]], expected);
  t.is(ds.samples[0].path, firstLines[0].split(/\s+/)[0]);
  t.is(ds.numClasses, 10);
  t.is(ds.classNames?.length, 10);
  t.true(ds.labels.every((l) => l >= 0 && l < 10));
  t.is(new Set(ds.labels).size, 10);

  const x = await ds.load([0, 1]);
  t.is(x.length, 2 * 3 * 64 * 64);
  // Every value lies within the normalised range of its channel.
  for (let c = 0; c < 3; c++) {
    const lo = norm(0, c);
    const hi = norm(255, c);
    for (let n = 0; n < 2; n++) {
      const plane = x.subarray((n * 3 + c) * 4096, (n * 3 + c + 1) * 4096);
      t.true(plane.every((v) => v >= lo && v <= hi), `channel ${c} of image ${n}`);
    }
  }
  // The 64 px images are not resized: pixels equal a direct sharp decode.
  const src = await TarSource.open(path.join(root, 'images.tar'));
  const raw = await sharp(await src.read(ds.samples[0].path)).raw().toBuffer();
  t.is(raw.length, 64 * 64 * 3);
  for (const p of [0, 1, 2080, 4095]) {
    for (let c = 0; c < 3; c++) t.is(x[c * 4096 + p], norm(raw[p * 3 + c], c), `pixel ${p} channel ${c}`);
  }
  t.is(ds.cachedCount, 2);

  const testSplit = await ImageDataset.fromList(root, 'test.txt', { imageSize: 64 });
  t.is(testSplit.length, 131);
});

// ---------------------------------------------------------------- ImageFolder

for (const kind of ['folder', 'folderTar'] as const) {
  test(`fromImageFolder (${kind}): sorted class folders give labels 0,1,2`, async (t) => {
    const ds = await ImageDataset.fromImageFolder(fx[kind], { imageSize: 2 });
    t.deepEqual(ds.classNames, ['ant', 'bee', 'cat']);
    t.is(ds.numClasses, 3);
    const long = `bee/${'long'.repeat(32)}.png`;
    t.deepEqual(
      ds.samples.map((s) => s.path),
      ['ant/a1.jpg', 'ant/a2.png', 'bee/b1.PNG', long, 'bee/sub/b2.webp', 'cat/c1.png'],
    );
    t.deepEqual([...ds.labels], [0, 0, 1, 1, 1, 2]);
    // Colour per class (red cat, green ant, blue bee) survives decoding.
    const x = await ds.load([1, 3, 5]);
    const px = (n: number, c: number) => x[(n * 3 + c) * 4];
    t.deepEqual([px(0, 0), px(0, 1), px(0, 2)], [norm(0, 0), norm(255, 1), norm(0, 2)]);
    t.deepEqual([px(1, 0), px(1, 1), px(1, 2)], [norm(0, 0), norm(0, 1), norm(255, 2)]);
    t.deepEqual([px(2, 0), px(2, 1), px(2, 2)], [norm(255, 0), norm(0, 1), norm(0, 2)]);
  });
}

test('fromImageFolder errors: bad archive, empty class folder', async (t) => {
  const tarBytes = fs.readFileSync(fx.folderTar);
  const truncated = path.join(tmp, 'truncated.tar');
  fs.writeFileSync(truncated, tarBytes.subarray(0, 1500));
  await t.throwsAsync(ImageDataset.fromImageFolder(truncated, { imageSize: 2 }), {
    message: /^tar archive .*truncated\.tar is truncated/,
  });
  const notTar = path.join(tmp, 'not-a.tar');
  fs.writeFileSync(notTar, Buffer.alloc(2048, 7));
  await t.throwsAsync(ImageDataset.fromImageFolder(notTar, { imageSize: 2 }), {
    message: /not-a\.tar is not a valid tar archive \(bad header checksum at byte 0\)/,
  });
  const withEmpty = path.join(tmp, 'with-empty');
  fs.cpSync(fx.folder, withEmpty, { recursive: true });
  fs.mkdirSync(path.join(withEmpty, 'dog'));
  fs.writeFileSync(path.join(withEmpty, 'dog', 'readme.md'), 'no images here');
  await t.throwsAsync(ImageDataset.fromImageFolder(withEmpty, { imageSize: 2 }), {
    message: /class folder\(s\) without images .*: dog$/,
  });
  await t.throwsAsync(ImageDataset.fromImageFolder(path.join(tmp, 'absent'), { imageSize: 2 }), {
    message: /image folder not found/,
  });
});

test('open() dispatches on the layout', async (t) => {
  const a = await ImageDataset.open(fx.listTar, 'train', { imageSize: 4 });
  t.deepEqual([...a.labels], TRAIN_LIST.map(([, l]) => l));
  const b = await ImageDataset.open(fx.folder, undefined, { imageSize: 2 });
  t.deepEqual(b.classNames, ['ant', 'bee', 'cat']);
  const c = await ImageDataset.open(fx.folderTar, undefined, { imageSize: 2 });
  t.is(c.length, 6);
  const d = await ImageDataset.open(path.join(fx.listDir, 'train.txt'), undefined, { imageSize: 4 });
  t.is(d.length, TRAIN_LIST.length);
  await t.throwsAsync(ImageDataset.open(fx.listTar, 'val', { imageSize: 4 }), {
    message: /split "val" not found .*list files there: malformed\.txt/,
  });
  await t.throwsAsync(ImageDataset.open(fx.listTar, undefined, { imageSize: 4 }), { message: /pass a split/ });
  await t.throwsAsync(ImageDataset.open(path.join(tmp, 'absent'), undefined, { imageSize: 4 }), {
    message: /data set path not found/,
  });
});

// ---------------------------------------------------------------- pixel values

test('solid colour decodes to the exact normalised values, NCHW', async (t) => {
  const ds = await ImageDataset.fromList(fx.listTar, 'train.txt', { imageSize: 4 });
  const x = await ds.load([1]); // cls0/solid.png, 4x4, no resize
  t.is(x.length, 3 * 16);
  for (let c = 0; c < 3; c++) {
    const want = (SOLID_RGB[c] / 255 - IMAGENET_NORMALIZATION.mean[c]) / IMAGENET_NORMALIZATION.std[c];
    for (let p = 0; p < 16; p++) assertClose(t, x[c * 16 + p], want, 1e-6, `c${c} p${p}`);
  }
  // Hard numbers: (200/255 - 0.485) / 0.229 etc.
  assertClose(t, x[0], 1.3070468, 1e-6, 'R');
  assertClose(t, x[16], -0.2850140, 1e-6, 'G');
  assertClose(t, x[32], -0.9329847, 1e-6, 'B');

  // An 8x8 PNG of the same colour, bicubic-resized to 4x4, stays exact.
  const y = await ds.load([5]);
  for (let c = 0; c < 3; c++) for (let p = 0; p < 16; p++) t.is(y[c * 16 + p], norm(SOLID_RGB[c], c));
  // The 8x8 JPEG (quality 100) is within 2/255 of the colour.
  const z = await ds.load([4]);
  for (let c = 0; c < 3; c++) {
    for (let p = 0; p < 16; p++) {
      assertClose(t, z[c * 16 + p], norm(SOLID_RGB[c], c), 2 / 255 / IMAGENET_NORMALIZATION.std[c] + 1e-6, 'jpeg');
    }
  }
});

test('NCHW layout: channel planes, then rows, then columns', async (t) => {
  const ds = await ImageDataset.fromList(fx.listDir, 'train.txt', { imageSize: 2, normalization: IDENTITY });
  const x = await ds.load([3, 3]); // cls0/quad.png twice
  t.is(x.length, 2 * 3 * 4);
  for (let n = 0; n < 2; n++) {
    for (let c = 0; c < 3; c++) {
      for (let p = 0; p < 4; p++) t.is(x[n * 12 + c * 4 + p], Math.fround(QUAD_RGB[p][c] / 255));
    }
  }
  t.is(x[4 + 1], Math.fround(50 / 255)); // G of pixel (x=1, y=0)
});

test('grayscale and RGBA become 3 channels', async (t) => {
  const grayMeta = await sharp(fs.readFileSync(path.join(fx.listDir, 'cls1', 'gray.png'))).metadata();
  t.is(grayMeta.channels, 1);
  const rgbaMeta = await sharp(fs.readFileSync(path.join(fx.listDir, 'cls2', 'rgba.png'))).metadata();
  t.is(rgbaMeta.channels, 4);

  const ds = await ImageDataset.fromList(fx.listTar, 'train.txt', { imageSize: 2 });
  const gray = await ds.image(0);
  t.is(gray.length, 2 * 2 * 3);
  t.true(gray.every((v) => v === GRAY_VALUE));
  const xg = await ds.load([0]);
  t.is(xg.length, 12);
  for (let c = 0; c < 3; c++) for (let p = 0; p < 4; p++) t.is(xg[c * 4 + p], norm(GRAY_VALUE, c));

  const rgba = await ds.image(2);
  t.deepEqual([...rgba], [10, 20, 30, 10, 20, 30, 10, 20, 30, 0, 0, 0]); // transparent → black
  const xa = await ds.load([2]);
  for (let c = 0; c < 3; c++) {
    for (let p = 0; p < 4; p++) t.is(xa[c * 4 + p], norm(p === 3 ? 0 : RGBA_PIXELS[p][c], c));
  }
});

test('cache: decoded once, reused; cache:false keeps nothing', async (t) => {
  const ds = await ImageDataset.fromList(fx.listTar, 'train.txt', { imageSize: 4 });
  t.is(ds.cachedCount, 0);
  const a = await ds.load([1, 1, 0]);
  t.is(ds.cachedCount, 2);
  const first = await ds.image(1);
  t.is(await ds.image(1), first); // same object: from the cache
  t.deepEqual(a.subarray(0, 48), a.subarray(48, 96));
  await ds.prepare();
  t.is(ds.cachedCount, TRAIN_LIST.length);

  const nc = await ImageDataset.fromList(fx.listTar, 'train.txt', { imageSize: 4, cache: false });
  await nc.prepare();
  t.is(nc.cachedCount, 0);
  t.deepEqual(await nc.load([1, 1, 0]), a);
});

// ---------------------------------------------------------------- corrupt images

test('corrupt, empty and truncated images: errors name the file', async (t) => {
  for (const kind of ['corrupt', 'corruptTar'] as const) {
    const ds = await ImageDataset.fromImageFolder(fx[kind], { imageSize: 2 });
    t.deepEqual(
      ds.samples.map((s) => s.path),
      ['imgs/bad.jpg', 'imgs/empty.png', 'imgs/ok.png', 'imgs/trunc.jpg'],
    );
    const where = kind === 'corruptTar' ? `corrupt.tar:imgs/` : `${path.join(fx.corrupt, 'imgs')}${path.sep}`;
    const e1 = await t.throwsAsync(ds.load([2, 0]), { instanceOf: ImageDecodeError });
    t.true(e1!.message.includes(`${where}bad.jpg`), e1!.message);
    t.regex(e1!.message, /unsupported image format/);
    const e2 = await t.throwsAsync(ds.load([1]), { instanceOf: ImageDecodeError });
    t.true(e2!.message.includes(`${where}empty.png`) && e2!.message.includes('empty file'), e2!.message);
    const e3 = await t.throwsAsync(ds.load([3]), { instanceOf: ImageDecodeError });
    t.true(e3!.message.includes(`${where}trunc.jpg`), e3!.message);
    t.regex(e3!.message, /premature end/i);
    await t.throwsAsync(ds.prepare(), { instanceOf: ImageDecodeError, message: /cannot decode image/ });
    t.is(ds.length, 4);
  }
});

test("onBadImage 'skip': prepare() drops and reports bad images", async (t) => {
  const ds = await ImageDataset.fromImageFolder(fx.corruptTar, { imageSize: 2, onBadImage: 'skip' });
  t.is(ds.length, 4);
  await t.throwsAsync(ds.load([0]), { message: /bad\.jpg.*call await dataset\.prepare\(\)/ });
  await ds.prepare();
  t.true(ds.prepared);
  t.is(ds.length, 1);
  t.deepEqual(
    ds.samples.map((s) => s.path),
    ['imgs/ok.png'],
  );
  t.deepEqual([...ds.labels], [0]);
  t.deepEqual(
    ds.skipped.map((s) => path.basename(s.file)),
    ['bad.jpg', 'empty.png', 'trunc.jpg'],
  );
  t.true(ds.skipped[0].file.endsWith('corrupt.tar:imgs/bad.jpg'));
  t.regex(ds.skipped[1].reason, /empty file/);
  const x = await ds.load([0]);
  t.is(x[0], norm(1, 0));
  t.is(x[4], norm(2, 1));
  t.is(x[8], norm(3, 2));
});

// ---------------------------------------------------------------- options

test('option validation names the field and range', async (t) => {
  await t.throwsAsync(ImageDataset.fromList(fx.listTar, 'train.txt', { imageSize: 0 }), {
    message: 'imageSize must be an integer >= 1, got 0',
  });
  await t.throwsAsync(ImageDataset.fromList(fx.listTar, 'train.txt', { imageSize: 2.5 }), { message: /imageSize/ });
  await t.throwsAsync(
    ImageDataset.fromImageFolder(fx.folder, { imageSize: 2, onBadImage: 'ignore' as unknown as 'skip' }),
    { message: /onBadImage must be 'error' or 'skip'/ },
  );
  await t.throwsAsync(
    ImageDataset.fromImageFolder(fx.folder, { imageSize: 2, normalization: { mean: [0, 0, 0], std: [1, 0, 1] } }),
    { message: /normalization\.std must be > 0/ },
  );
  await t.throwsAsync(ImageDataset.fromImageFolder(fx.folder, { imageSize: 2, numClasses: 2 }), {
    message: /numClasses is 2 but .* has 3 class folders/,
  });
  const ds = await ImageDataset.fromImageFolder(fx.folder, { imageSize: 2 });
  t.throws(() => new BatchLoader(ds, { batchSize: 0, shuffle: true, seed: 1 }), {
    message: 'batchSize must be an integer >= 1, got 0',
  });
  t.throws(() => new BatchLoader(ds, { batchSize: 1.5, shuffle: true, seed: 1 }), { message: /batchSize/ });
  t.throws(() => new BatchLoader(ds, { batchSize: 2, shuffle: true, seed: -1 }), { message: /seed must be/ });
  t.throws(() => new BatchLoader(ds, { batchSize: 2, shuffle: true, prefetch: -1 }), { message: /prefetch/ });
  await t.throwsAsync(ds.load([6]), { instanceOf: RangeError, message: 'indices[0] must be an integer in 0..5, got 6' });
});

// ---------------------------------------------------------------- BatchLoader

/** A fake data set whose image k is the single float k, recording load() calls. */
function fakeSource(n: number): BatchSource & { calls: number[][] } {
  const calls: number[][] = [];
  return {
    length: n,
    labels: Int32Array.from({ length: n }, (_, i) => (i * 7) % 3),
    calls,
    async load(indices: readonly number[]) {
      calls.push([...indices]);
      await new Promise((r) => setTimeout(r, 1));
      return Float32Array.from(indices);
    },
  };
}

async function collect(loader: BatchLoader, e: number) {
  const out = [];
  for await (const b of loader.epoch(e)) out.push(b);
  return out;
}

test('PRNG and permutation are pinned', (t) => {
  const r = mulberry32(0);
  // The reference mulberry32 (seed 0) stream.
  t.deepEqual([r(), r(), r()], [1144304738, 1416247, 958946056]);
  t.deepEqual([...permutation(10, 0, 0)], [...permutation(10, 0, 0)]);
  t.deepEqual([...permutation(10, 42, 3)], [4, 2, 6, 3, 1, 0, 9, 8, 7, 5]);
  t.deepEqual([...permutation(0, 1, 1)], []);
});

test('BatchLoader: seeded order, each index once, partial last batch', async (t) => {
  const src = fakeSource(10);
  const a = new BatchLoader(src, { batchSize: 4, shuffle: true, seed: 7 });
  const b = new BatchLoader(src, { batchSize: 4, shuffle: true, seed: 7 });
  t.is(a.stepsPerEpoch, 3);
  const a0 = await collect(a, 0);
  const b0 = await collect(b, 0);
  const order = (bs: { indices: number[] }[]) => bs.flatMap((x) => x.indices);
  t.deepEqual(order(a0), order(b0));
  t.deepEqual(order(a0), [...permutation(10, 7, 0)]);
  t.deepEqual(
    a0.map((x) => x.size),
    [4, 4, 2],
  );
  t.deepEqual([...order(a0)].sort((x, y) => x - y), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
  t.notDeepEqual(order(a0), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
  for (const batch of a0) {
    t.deepEqual([...batch.images], batch.indices); // images follow the indices
    t.deepEqual([...batch.labels], batch.indices.map((i) => (i * 7) % 3));
    t.true(batch.labels instanceof Uint32Array);
  }

  const a1 = await collect(a, 1);
  t.notDeepEqual(order(a1), order(a0));
  t.deepEqual([...order(a1)].sort((x, y) => x - y), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
  const c0 = await collect(new BatchLoader(src, { batchSize: 4, shuffle: true, seed: 8 }), 0);
  t.notDeepEqual(order(c0), order(a0));

  const dl = new BatchLoader(src, { batchSize: 4, shuffle: true, seed: 7, dropLast: true });
  t.is(dl.stepsPerEpoch, 2);
  const d0 = await collect(dl, 0);
  t.deepEqual(
    d0.map((x) => x.size),
    [4, 4],
  );
  t.deepEqual(order(d0), order(a0).slice(0, 8));

  const plain = await collect(new BatchLoader(src, { batchSize: 3, shuffle: false }), 5);
  t.deepEqual(
    plain.map((x) => x.indices),
    [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]],
  );
  t.throws(() => a.epoch(-1), { instanceOf: RangeError, message: /epoch must be an integer/ });
});

test('BatchLoader prefetches the next batches while the consumer works', async (t) => {
  for (const prefetch of [0, 1, 2]) {
    const src = fakeSource(12);
    const loader = new BatchLoader(src, { batchSize: 2, shuffle: false, prefetch });
    const it = loader.epoch(0)[Symbol.asyncIterator]();
    const first = await it.next();
    t.deepEqual(first.value?.indices, [0, 1]);
    t.is(src.calls.length, 1 + prefetch, `prefetch ${prefetch}`);
    await new Promise((r) => setTimeout(r, 10));
    t.is(src.calls.length, 1 + prefetch);
    await it.next();
    t.is(src.calls.length, 2 + prefetch);
    await it.return?.();
  }
  // Default prefetch is 2; all 6 batches come out in order.
  const src = fakeSource(12);
  const batches = await collect(new BatchLoader(src, { batchSize: 2, shuffle: false }), 0);
  t.deepEqual(batches.flatMap((b) => b.indices), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
});

test('BatchLoader over a real ImageDataset', async (t) => {
  const ds = await ImageDataset.fromImageFolder(fx.folderTar, { imageSize: 3 });
  const loader = new BatchLoader(ds, { batchSize: 4, shuffle: true, seed: 3 });
  const batches = await collect(loader, 0);
  t.deepEqual(
    batches.map((b) => b.size),
    [4, 2],
  );
  for (const b of batches) {
    t.is(b.images.length, b.size * 3 * 3 * 3);
    t.deepEqual([...b.labels], b.indices.map((i) => ds.labels[i]));
    const single = await ds.load(b.indices);
    t.deepEqual(b.images, single);
  }
  // A decode error surfaces through the iteration.
  const bad = await ImageDataset.fromImageFolder(fx.corrupt, { imageSize: 2 });
  await t.throwsAsync(collect(new BatchLoader(bad, { batchSize: 4, shuffle: false }), 0), {
    instanceOf: ImageDecodeError,
  });
});

test('a CMYK JPEG decodes to 3 sRGB channels, as libvips converts it', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'snella-cmyk-'));
  const rgb = { r: 200, g: 40, b: 90 };
  const file = path.join(dir, 'cmyk', 'a.jpg');
  fs.mkdirSync(path.dirname(file));
  await sharp({ create: { width: 8, height: 8, channels: 3, background: rgb } }).toColourspace('cmyk').jpeg({ quality: 100 }).toFile(file);
  t.is((await sharp(file).metadata()).space, 'cmyk');
  const ds = await ImageDataset.fromImageFolder(dir, { imageSize: 8 });
  const px = await ds.image(0);
  t.is(px.length, 8 * 8 * 3);
  // The same pixels as libvips' own CMYK → sRGB conversion, and still the source's colour: red
  // dominant (the round trip through an unprofiled CMYK JPEG moves levels by up to ~20).
  const ref = await sharp(file).toColourspace('srgb').removeAlpha().raw().toBuffer();
  for (let i = 0; i < px.length; i++) t.true(Math.abs(px[i] - ref[i]) <= 2, `value ${i}: ${px[i]} vs ${ref[i]}`);
  t.true(px[0] > 150 && px[1] < 80 && px[2] < 130, `rgb ${px[0]},${px[1]},${px[2]}`);
});
