/**
 * Classifies every image of a folder (searched recursively: .jpg, .jpeg, .png, .webp) with a
 * checkpoint — e.g. the merged one written by examples/merge-and-export.ts — and prints one line per
 * image: its path, the predicted class name and its softmax probability.
 *
 *   npx tsx examples/infer-folder.ts --model runs/imagefolder/merged.safetensors --images new-photos
 *   npx tsx examples/infer-folder.ts --model merged.safetensors --images new-photos --top 3 --json
 *
 * Class names come from --classes (a JSON array, index = label), else from the checkpoint's
 * `classes` metadata (written by merge-and-export.ts), else they are `class <index>`. Images are
 * decoded and normalised exactly as for training (sharp, bicubic resize to the model's input side,
 * the checkpoint's mean/std). Files that cannot be decoded are reported and skipped.
 *
 * Options (defaults in brackets):
 *   --model FILE     timm-named checkpoint (required)    --images DIR  folder of images (required)
 *   --classes FILE   class names JSON                    --top K       names per image [1]
 *   --batch N        images per forward pass [32]        --json        one JSON object per line
 *   --device D       auto | cpu | cuda [auto]
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { decodeImage, IMAGE_EXTENSIONS, ImageDecodeError, normalizationTable, readSafetensors, VitModel, writeNCHW } from 'snella';

const { values: a } = parseArgs({
  options: {
    model: { type: 'string' },
    images: { type: 'string' },
    classes: { type: 'string' },
    top: { type: 'string', default: '1' },
    batch: { type: 'string', default: '32' },
    json: { type: 'boolean', default: false },
    device: { type: 'string', default: 'auto' },
  },
});

/** Image files under `dir`, as paths relative to it, sorted; hidden entries are skipped. */
function listImages(dir: string, rel = ''): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(path.join(dir, rel), { withFileTypes: true }).sort((x, y) => (x.name < y.name ? -1 : 1))) {
    if (e.name.startsWith('.')) continue;
    const r = path.join(rel, e.name);
    if (e.isDirectory()) out.push(...listImages(dir, r));
    else if (IMAGE_EXTENSIONS.has(path.extname(e.name).toLowerCase())) out.push(r);
  }
  return out;
}

function softmax(row: Float32Array): Float64Array {
  const m = Math.max(...row);
  const e = Float64Array.from(row, (v) => Math.exp(v - m));
  const s = e.reduce((p, v) => p + v, 0);
  return e.map((v) => v / s);
}

async function main(): Promise<void> {
  if (!a.model || !a.images) throw new Error('--model FILE and --images DIR are required');
  const top = Number(a.top);
  const batch = Number(a.batch);
  let names: string[] | undefined;
  if (a.classes) names = JSON.parse(fs.readFileSync(a.classes, 'utf8'));
  else {
    const meta = readSafetensors(a.model).metadata;
    if (meta.classes) names = JSON.parse(meta.classes);
  }
  const files = listImages(a.images);
  if (files.length === 0) throw new Error(`no images (${[...IMAGE_EXTENSIONS].join(', ')}) under ${a.images}`);

  const model = VitModel.load(a.model, { device: a.device as 'auto' | 'cpu' | 'cuda' });
  try {
    const { img_size: size, mean, std } = model.config;
    const lut = normalizationTable({ mean, std });
    for (let start = 0; start < files.length; start += batch) {
      const chunk = files.slice(start, start + batch);
      const pixels: { file: string; rgb: Uint8Array }[] = [];
      for (const file of chunk) {
        const full = path.join(a.images, file);
        try {
          pixels.push({ file, rgb: await decodeImage(fs.readFileSync(full), size, full) });
        } catch (e) {
          if (!(e instanceof ImageDecodeError)) throw e;
          console.error(`skipped ${e.message}`);
        }
      }
      if (pixels.length === 0) continue;
      const x = new Float32Array(pixels.length * 3 * size * size);
      pixels.forEach((p, k) => writeNCHW(x, k, p.rgb, size, lut));
      const logits = await model.predict(x, pixels.length);
      const classes = logits.length / pixels.length;
      pixels.forEach((p, k) => {
        const prob = softmax(logits.subarray(k * classes, (k + 1) * classes));
        const best = [...prob.keys()].sort((i, j) => prob[j] - prob[i]).slice(0, top);
        const named = best.map((i) => ({ label: i, name: names?.[i] ?? `class ${i}`, p: prob[i] }));
        if (a.json) console.log(JSON.stringify({ file: p.file, predictions: named }));
        else console.log(`${p.file}\t${named.map((n) => `${n.name} (${(n.p * 100).toFixed(1)}%)`).join(', ')}`);
      });
    }
  } finally {
    model.dispose();
  }
}

main().catch((e) => {
  console.error(e instanceof Error ? `error: ${e.message}` : e);
  process.exitCode = 1;
});
