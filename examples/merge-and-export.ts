/**
 * Merges a trained adapter into its base model and exports the result as a plain timm-named
 * safetensors checkpoint: no adapter, no snella needed to use it (timm's `VisionTransformer`
 * `load_state_dict` reads it, and so does `VitModel.load`).
 *
 *   npx tsx examples/merge-and-export.ts --adapter runs/imagefolder/adapter \
 *     --classes runs/imagefolder/classes.json --out runs/imagefolder/merged.safetensors
 *
 * Steps: load the base checkpoint, `loadAdapter`, `merge()` (W = W0 + ΔWᵀ in every adapted weight),
 * read every tensor by its timm name with `model.tensor(name)` (`cls_token`, `pos_embed`,
 * `patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`,
 * `head.*`), write them as F32 with the config (and class names) in the metadata, then reload the
 * exported file and check that it gives the merged model's logits.
 *
 * Options (defaults in brackets):
 *   --adapter DIR   adapter folder written by saveAdapter (required)
 *   --out FILE      the merged checkpoint to write (required; refuses to overwrite without --overwrite)
 *   --model FILE    the base checkpoint the adapter was trained on [assets/models/vit_tiny_patch8_64.safetensors]
 *   --classes FILE  JSON array of class names (index = label), stored in the metadata as `classes`
 *   --device D      auto | cpu | cuda [cpu]
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { readSafetensors, VitModel, writeSafetensors, type F32Tensor, type VitConfig } from 'snella';

const ROOT = path.resolve(__dirname, '..');
const { values: a } = parseArgs({
  options: {
    adapter: { type: 'string' },
    out: { type: 'string' },
    model: { type: 'string', default: path.join(ROOT, 'assets/models/vit_tiny_patch8_64.safetensors') },
    classes: { type: 'string' },
    device: { type: 'string', default: 'cpu' },
    overwrite: { type: 'boolean', default: false },
  },
});

/** Every tensor of a timm ViT by name, with its timm shape, for `cfg` and a head of `classes`. */
function timmTensors(cfg: VitConfig, classes: number): Record<string, number[]> {
  const { embed_dim: d, patch_size: p, in_chans: c, mlp_hidden: h, img_size: s } = cfg;
  const tokens = 1 + (s / p) ** 2;
  const shapes: Record<string, number[]> = {
    cls_token: [1, 1, d],
    pos_embed: [1, tokens, d],
    'patch_embed.proj.weight': [d, c, p, p],
    'patch_embed.proj.bias': [d],
  };
  for (let i = 0; i < cfg.depth; i++) {
    const b = `blocks.${i}`;
    Object.assign(shapes, {
      [`${b}.norm1.weight`]: [d],
      [`${b}.norm1.bias`]: [d],
      [`${b}.attn.qkv.weight`]: [3 * d, d],
      [`${b}.attn.qkv.bias`]: [3 * d],
      [`${b}.attn.proj.weight`]: [d, d],
      [`${b}.attn.proj.bias`]: [d],
      [`${b}.norm2.weight`]: [d],
      [`${b}.norm2.bias`]: [d],
      [`${b}.mlp.fc1.weight`]: [h, d],
      [`${b}.mlp.fc1.bias`]: [h],
      [`${b}.mlp.fc2.weight`]: [d, h],
      [`${b}.mlp.fc2.bias`]: [d],
    });
  }
  Object.assign(shapes, { 'norm.weight': [d], 'norm.bias': [d], 'head.weight': [classes, d], 'head.bias': [classes] });
  return shapes;
}

/** A fixed pseudo-random batch of `n` normalised images (for the logit checks). */
function probeBatch(n: number, size: number): Float32Array {
  const x = new Float32Array(n * 3 * size * size);
  let state = 12345;
  for (let i = 0; i < x.length; i++) {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0;
    x[i] = (state / 2 ** 32) * 4 - 2;
  }
  return x;
}

function maxAbsDiff(p: Float32Array, q: Float32Array): number {
  let m = 0;
  for (let i = 0; i < p.length; i++) m = Math.max(m, Math.abs(p[i] - q[i]));
  return m;
}

async function main(): Promise<void> {
  if (!a.adapter || !a.out) throw new Error('--adapter DIR and --out FILE are required');
  if (fs.existsSync(a.out) && !a.overwrite) throw new Error(`${a.out} exists: pass --overwrite or another --out`);
  const classNames: string[] | undefined = a.classes ? JSON.parse(fs.readFileSync(a.classes, 'utf8')) : undefined;
  const device = a.device as 'auto' | 'cpu' | 'cuda';

  const model = VitModel.load(a.model!, { device }).loadAdapter(a.adapter);
  try {
    const cfg = model.config;
    const method = (JSON.parse(fs.readFileSync(path.join(a.adapter, 'adapter_config.json'), 'utf8')) as { method?: { kind?: string } }).method?.kind;
    const x = probeBatch(4, cfg.img_size);
    const before = await model.predict(x, 4);
    const classes = before.length / 4;
    if (classNames && classNames.length !== classes) {
      throw new Error(`${a.classes} names ${classNames.length} classes but the adapter's head has ${classes}`);
    }
    model.merge();
    const merged = await model.predict(x, 4);
    console.log(`merged ${method ?? 'adapter'} into ${path.basename(a.model!)}: max |Δlogit| vs the adapter model ${maxAbsDiff(before, merged).toExponential(2)}`);

    const tensors: Record<string, F32Tensor> = {};
    let values = 0;
    for (const [name, shape] of Object.entries(timmTensors(cfg, classes))) {
      const t = model.tensor(name);
      if (t.shape.join(',') !== shape.join(',')) throw new Error(`tensor ${name}: shape [${t.shape}], timm expects [${shape}]`);
      tensors[name] = t;
      values += t.data.length;
    }
    const metadata: Record<string, string> = {
      arch: 'vit',
      img_size: String(cfg.img_size),
      patch_size: String(cfg.patch_size),
      in_chans: String(cfg.in_chans),
      embed_dim: String(cfg.embed_dim),
      depth: String(cfg.depth),
      num_heads: String(cfg.num_heads),
      mlp_ratio: String(cfg.mlp_hidden / cfg.embed_dim),
      qkv_bias: 'true',
      num_classes: String(classes),
      mean: cfg.mean.join(','),
      std: cfg.std.join(','),
      merged_from: JSON.stringify({ base: path.basename(a.model!), adapter: path.resolve(a.adapter), method }),
      ...(classNames ? { classes: JSON.stringify(classNames) } : {}),
    };
    fs.mkdirSync(path.dirname(path.resolve(a.out)), { recursive: true });
    writeSafetensors(a.out, tensors, { metadata, overwrite: a.overwrite });
    const header = readSafetensors(a.out);
    console.log(
      `wrote ${a.out}: ${Object.keys(header.tensors).length} tensors, ${values.toLocaleString('en-US')} F32 values, ` +
        `${(fs.statSync(a.out).size / 2 ** 20).toFixed(1)} MiB`,
    );

    const exported = VitModel.load(a.out, { device });
    try {
      const again = await exported.predict(x, 4);
      const diff = maxAbsDiff(merged, again);
      console.log(`reloaded ${path.basename(a.out)}: max |Δlogit| vs the merged model ${diff.toExponential(2)}`);
      if (!(diff <= 1e-5)) throw new Error(`the exported checkpoint does not reproduce the merged logits (max |Δ| ${diff})`);
    } finally {
      exported.dispose();
    }
  } finally {
    model.dispose();
  }
}

main().catch((e) => {
  console.error(e instanceof Error ? `error: ${e.message}` : e);
  process.exitCode = 1;
});
