import test from 'ava';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { decodeImage, normalizationTable, TarSource, VitModel, writeNCHW } from '../ts';
import { readSafetensors } from '../ts';

const ROOT = path.resolve(__dirname, '..');
const DATA = path.join(ROOT, 'assets/flowers10-64');
const MODEL = path.join(ROOT, 'assets/models/vit_tiny_patch8_64.safetensors');
const run = promisify(execFile);

/** Runs `examples/<name>` with tsx (as `npx tsx examples/<name> …` does); returns stdout. */
async function example(name: string, args: string[]): Promise<string> {
  try {
    const r = await run(process.execPath, ['--import=tsx', path.join('examples', name), ...args], {
      cwd: ROOT,
      timeout: 120_000,
      maxBuffer: 16 << 20,
    });
    return r.stdout;
  } catch (e) {
    const x = e as { stdout?: string; stderr?: string; message: string };
    throw new Error(`${name} failed: ${x.message}\n${x.stdout ?? ''}\n${x.stderr ?? ''}`);
  }
}

/**
 * A tiny user data set from the bundled images: an ImageFolder of 3 classes (class names with
 * spaces) × 8 images plus one corrupt file, and a folder of 4 unlabelled new images.
 */
async function tinyImageFolder(): Promise<{ root: string; photos: string; fresh: string; classes: string[]; freshLabels: Map<string, string> }> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'snella-examples-'));
  const tar = await TarSource.open(path.join(DATA, 'images.tar'));
  const names: string[] = JSON.parse(fs.readFileSync(path.join(DATA, 'classes.json'), 'utf8'));
  const files = await tar.list();
  const photos = path.join(root, 'photos');
  const fresh = path.join(root, 'new');
  fs.mkdirSync(fresh, { recursive: true });
  const picked = [0, 1, 2].map((label) => ({ label, dir: String(label * 10 + 1).padStart(3, '0') }));
  const freshLabels = new Map<string, string>();
  for (const { label, dir } of picked) {
    const mine = files.filter((f) => f.startsWith(`${dir}/`));
    const cls = path.join(photos, names[label]);
    fs.mkdirSync(cls, { recursive: true });
    for (const f of mine.slice(0, 8)) fs.writeFileSync(path.join(cls, path.basename(f)), await tar.read(f));
    if (label === 2) continue;
    for (const f of mine.slice(-2)) {
      fs.writeFileSync(path.join(fresh, path.basename(f)), await tar.read(f));
      freshLabels.set(path.basename(f), names[label]);
    }
  }
  fs.writeFileSync(path.join(photos, names[1], 'broken.jpg'), 'not a jpeg');
  return { root, photos, fresh, classes: [0, 1, 2].map((l) => names[l]).sort(), freshLabels };
}

test('finetune-imagefolder → merge-and-export → infer-folder on a tiny ImageFolder', async (t) => {
  const d = await tinyImageFolder();
  const out = path.join(d.root, 'run');

  // 1. fine-tune on the user's folder (held-out test split, the corrupt file skipped)
  const ft = await example('finetune-imagefolder.ts', ['--data', d.photos, '--out', out, '--epochs', '1', '--batch', '8', '--device', 'cpu']);
  t.log(ft.trim());
  t.regex(ft, /skipped .*broken\.jpg/);
  t.regex(ft, /3 classes \(fire lily, pink primrose, snapdragon\); \d+ training, \d+ test images/);
  t.regex(ft, /test top-1: \d+\.\d+% on \d+ images/);
  t.true(fs.existsSync(path.join(out, 'adapter/adapter_model.safetensors')));
  t.deepEqual(JSON.parse(fs.readFileSync(path.join(out, 'classes.json'), 'utf8')), d.classes);

  // 2. merge and export as a timm-named checkpoint that reproduces the merged logits
  const merged = path.join(out, 'merged.safetensors');
  const mx = await example('merge-and-export.ts', [
    '--adapter', path.join(out, 'adapter'), '--classes', path.join(out, 'classes.json'), '--out', merged,
  ]);
  t.log(mx.trim());
  t.regex(mx, /reloaded merged\.safetensors: max \|Δlogit\| vs the merged model/);
  const h = readSafetensors(merged);
  t.is(Object.keys(h.tensors).length, 4 + 12 * 12 + 4);
  const raw = fs.readFileSync(merged);
  const header = JSON.parse(raw.subarray(8, 8 + Number(raw.readBigUInt64LE(0))).toString('utf8')) as Record<string, { dtype?: string }>;
  t.true(Object.entries(header).every(([k, v]) => k === '__metadata__' || v.dtype === 'F32'), 'every tensor stored as F32');
  t.deepEqual(h.tensors['patch_embed.proj.weight'].shape, [192, 3, 8, 8]);
  t.deepEqual(h.tensors['head.weight'].shape, [3, 192]);
  t.deepEqual(JSON.parse(h.metadata.classes), d.classes);
  // every base tensor the adapter does not touch is copied bit for bit
  const base = VitModel.load(MODEL, { device: 'cpu' });
  const exported = VitModel.load(merged, { device: 'cpu' });
  t.deepEqual(exported.tensor('blocks.3.norm1.weight').data, base.tensor('blocks.3.norm1.weight').data);
  t.notDeepEqual(exported.tensor('blocks.3.attn.qkv.weight').data, base.tensor('blocks.3.attn.qkv.weight').data);
  base.dispose();

  // 3. inference on a folder of new images with the merged checkpoint, class names from its metadata
  const inf = await example('infer-folder.ts', ['--model', merged, '--images', d.fresh, '--json', '--top', '2', '--device', 'cpu']);
  const rows = inf.trim().split('\n').map((l) => JSON.parse(l) as { file: string; predictions: { label: number; name: string; p: number }[] });
  t.is(rows.length, d.freshLabels.size);
  for (const r of rows) {
    t.true(d.freshLabels.has(r.file));
    t.is(r.predictions.length, 2);
    t.true(d.classes.includes(r.predictions[0].name), r.predictions[0].name);
    t.true(r.predictions[0].p >= r.predictions[1].p && r.predictions[0].p <= 1);
  }
  // the printed classes are the adapter model's own predictions
  const withAdapter = VitModel.load(MODEL, { device: 'cpu' }).loadAdapter(path.join(out, 'adapter'));
  const { img_size: s, mean, std } = withAdapter.config;
  const x = new Float32Array(rows.length * 3 * s * s);
  for (let k = 0; k < rows.length; k++) {
    writeNCHW(x, k, await decodeImage(fs.readFileSync(path.join(d.fresh, rows[k].file)), s, rows[k].file), s, normalizationTable({ mean, std }));
  }
  const logits = await withAdapter.predict(x, rows.length);
  rows.forEach((r, k) => {
    const row = Array.from(logits.subarray(k * 3, k * 3 + 3));
    t.is(r.predictions[0].label, row.indexOf(Math.max(...row)));
  });
  withAdapter.dispose();
  exported.dispose();
  const plain = await example('infer-folder.ts', ['--model', merged, '--images', d.fresh, '--device', 'cpu']);
  t.log(plain.trim());
  t.regex(plain, /^image_\d+\.jpg\t(fire lily|pink primrose|snapdragon) \(\d+\.\d%\)$/m);
  fs.rmSync(d.root, { recursive: true, force: true });
});

test('compare-methods prints a row with a finite top-1 for each of the five methods', async (t) => {
  const outText = await example('compare-methods.ts', [
    '--epochs', '1', '--batch', '10', '--train-per-class', '4', '--test-per-class', '4', '--device', 'cpu',
  ]);
  t.log(outText.trim());
  for (const m of ['linear', 'lora', 'snell', 'snella', 'full']) {
    const row = new RegExp(`^${m}\\s*\\|([^\\n]*)\\|\\s*([0-9.]+)%\\s*$`, 'm').exec(outText);
    t.truthy(row, `no row for ${m}`);
    const top1 = Number(row![2]);
    t.true(Number.isFinite(top1) && top1 >= 0 && top1 <= 100, `${m}: top-1 ${row![2]}`);
  }
  t.regex(outText, /^snella\s*\|\s*[\d,]+\s*\|\s*\d+\.\d%/m); // kept fraction reported for SNELLA
});
