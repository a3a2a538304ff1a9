// Writes the inputs and our logits for the timm interchange check (scripts/gpu/check_timm.py):
// loads a merged timm-named checkpoint with snella (CPU), predicts 16 flowers102-64 test images.
// npx tsx scripts/gpu/our_logits.ts MERGED.safetensors DATA_DIR OUT.json
import * as fs from 'node:fs';
import { ImageDataset, VitModel } from '../../ts';

async function main(): Promise<void> {
  const [merged, data, out] = process.argv.slice(2);
  const m = VitModel.load(merged, { device: 'cpu' });
  const c = m.config;
  const ds = await ImageDataset.open(data, 'test', { imageSize: c.img_size, normalization: { mean: c.mean, std: c.std } });
  const idx = Array.from({ length: 16 }, (_, i) => i * 97);
  const x = await ds.load(idx);
  const logits = await m.predict(x, idx.length);
  fs.writeFileSync(out, JSON.stringify({ shape: [idx.length, 3, c.img_size, c.img_size], images: Array.from(x), logits: Array.from(logits), classes: c.num_classes }));
  m.dispose();
}
main();
