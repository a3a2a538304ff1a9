/**
 * The ViT model façade: load a timm-named checkpoint, attach a fine-tuning method, predict,
 * report, merge and save/load adapters.
 * @module
 */
import type { NativeModel } from '../native/binding';
import { native, nativeAsync, SnellaError } from './errors';
import { binding } from './native';

/** Where to compute: `auto` uses CUDA when it works, else the CPU (with a one-line reason). */
export type Device = 'auto' | 'cpu' | 'cuda';

/** Fine-tuning methods, compared under one trainer. */
export type Method = 'snella' | 'snell' | 'lora' | 'linear' | 'full';

/** How the kept set turns the merged matrix into `ΔW` (spec §2). */
export type SparsifyRule = 'magnitude-product' | 'soft-threshold' | 'mask';

/** The shape of a timm `VisionTransformer`, read from the checkpoint. */
export interface VitConfig {
  /** Input side in pixels. */
  img_size: number;
  /** Patch side in pixels. */
  patch_size: number;
  /** Input channels. */
  in_chans: number;
  /** Embedding dimension D. */
  embed_dim: number;
  /** Number of blocks. */
  depth: number;
  /** Attention heads. */
  num_heads: number;
  /** MLP hidden size. */
  mlp_hidden: number;
  /** Classes of the checkpoint's own head. */
  num_classes: number;
  /** LayerNorm epsilon. */
  ln_eps: number;
  /** Normalisation mean per channel (RGB, for pixel values in [0, 1]). */
  mean: [number, number, number];
  /** Normalisation std per channel. */
  std: [number, number, number];
}

/** Options of {@link VitModel.attach}. */
export interface AttachOptions {
  /** The method. */
  method: Method;
  /** Classes of the new head (re-initialised, PyTorch `nn.Linear` default init). */
  numClasses: number;
  /** Rank r of SNELLA/SNELL/LoRA (default 8). SNELLA needs a multiple of `heads`. */
  rank?: number;
  /** Kernel pieces H (default 2, spec §1). */
  heads?: number;
  /**
   * Adapter targets: names such as `q`, `fc1`, `blocks.3.attn.proj`, or regexes matching whole names
   * (default `q, k, v, proj, fc1, fc2` in every block). A target matching nothing throws
   * `TARGET` listing the real names.
   */
  targets?: string[];
  /** Initial sparsity s0 of every SNELLA/SNELL layer, fraction zeroed in [0, 1) (default 0.01). */
  s0?: number;
  /** Sparsify rule (default `magnitude-product`, the released code's rule). */
  rule?: SparsifyRule;
  /** Seed of the head and adapter initialisation (default 0). */
  seed?: number;
}

/** One row of {@link VitModel.report}: an adapted layer's kept entries and allocator score. */
export interface LayerReport {
  /** Adapter name, e.g. `blocks.0.attn.q`. */
  name: string;
  /** Input features. */
  n_in: number;
  /** Output features. */
  n_out: number;
  /** Entries of ΔW (`in × out`). */
  entries: number;
  /** Entries kept at the current sparsity: `entries − ⌊sparsity·entries⌋`. */
  kept: number;
  /** Sparsity: fraction of entries zeroed. */
  sparsity: number;
  /** The allocator's normalised importance score (sums to 1 over layers; 0 before training). */
  score: number;
}

/** One allocator round: budget, per-layer sparsities and scores (spec §5). */
export interface AllocatorRound {
  /** Round (epoch) index. */
  round: number;
  /** Kept-entry budget V of the round. */
  budget: number;
  /** Per-layer sparsities decided this round, in {@link VitModel.report} order. */
  sparsities: number[];
  /** Per-layer normalised scores used. */
  scores: number[];
}

/** A non-finite importance value seen by the allocator (set to 0 and reported). */
export interface AllocatorEvent {
  /** Optimizer step. */
  step: number;
  /** Adapter name. */
  layer: string;
  /** `A` or `B`. */
  param: string;
  /** How many entries were non-finite. */
  count: number;
}

const dispose: typeof Symbol.dispose = (Symbol as { dispose?: typeof Symbol.dispose }).dispose ?? (Symbol.for('Symbol.dispose') as typeof Symbol.dispose);

/**
 * A Vision Transformer loaded from a timm-named safetensors checkpoint, with optional adapters.
 * Owns native memory: call {@link VitModel.dispose} (or use `using`) when done.
 *
 * @example
 * ```ts
 * const model = VitModel.load('vit_tiny_patch8_64.safetensors');
 * model.attach({ method: 'snella', numClasses: 102, rank: 8 });
 * ```
 */
export class VitModel {
  /** The raw binding object (advanced use). */
  readonly native: NativeModel;
  /** The device in use after `auto` was resolved. */
  readonly device: 'cpu' | 'cuda';
  /** Why `auto` chose the CPU, when it did. */
  readonly deviceReason?: string;
  /** The checkpoint path. */
  readonly source: string;

  private constructor(n: NativeModel, device: 'cpu' | 'cuda', source: string, reason?: string) {
    this.native = n;
    this.device = device;
    this.source = source;
    this.deviceReason = reason;
  }

  /**
   * Loads a checkpoint. `device: 'auto'` (default) uses CUDA when it works and otherwise the CPU,
   * recording the reason in {@link VitModel.deviceReason}.
   * @throws {@link SnellaError} `FILE`/`TENSOR` naming the file and tensor for a bad checkpoint;
   *   `CUDA_UNAVAILABLE` when `cuda` was asked for and cannot be used.
   */
  static load(path: string, opts: { device?: Device } = {}): VitModel {
    const device = opts.device ?? 'auto';
    const b = binding();
    if (device === 'auto') {
      try {
        const n = b.NativeModel.load(path, 'cuda');
        return new VitModel(n, 'cuda', path);
      } catch (e) {
        const msg = (e as Error).message;
        if (!/CUDA_UNAVAILABLE|CUDA/.test(msg)) throw native(() => { throw e; });
        const n = native(() => b.NativeModel.load(path, 'cpu'));
        return new VitModel(n, 'cpu', path, msg.replace(/^\[[A-Z_]+\] /, ''));
      }
    }
    const n = native(() => b.NativeModel.load(path, device));
    return new VitModel(n, device === 'cuda' ? 'cuda' : 'cpu', path);
  }

  /** The model's shape and normalisation. */
  get config(): VitConfig {
    return native(() => this.native.config()) as VitConfig;
  }

  /**
   * Attaches a fine-tuning method (spec §4): re-initialises the head for `numClasses`, freezes the
   * backbone (except for `full`), makes the head and `cls_token` trainable and adds adapters.
   * @throws {@link SnellaError} `CONFIG` naming the field out of range; `TARGET` listing the real
   *   layer names when a target matches nothing.
   */
  attach(opts: AttachOptions): this {
    const known = ['snella', 'snell', 'lora', 'linear', 'full'];
    if (!known.includes(opts.method)) {
      throw new SnellaError('CONFIG', `invalid config: method = ${String(opts.method)}: one of ${known.join(', ')}`);
    }
    if (!Number.isInteger(opts.numClasses) || opts.numClasses < 1) {
      throw new SnellaError('CONFIG', `invalid config: numClasses = ${opts.numClasses}: an integer ≥ 1`);
    }
    native(() =>
      this.native.attach({
        kind: opts.method,
        rank: opts.rank ?? 8,
        heads: opts.heads ?? 2,
        targets: opts.targets ?? [],
        s0: opts.s0 ?? 0.01,
        rule: opts.rule ?? 'magnitude-product',
        num_classes: opts.numClasses,
        seed: opts.seed ?? 0,
      }),
    );
    return this;
  }

  /** Number of trainable values (adapters, head, `cls_token`; everything for `full`). */
  get trainableCount(): number {
    return native(() => this.native.trainableCount());
  }

  /**
   * Logits for a batch of normalised NCHW images.
   * @param images float32 `[batch, 3, img_size, img_size]`.
   * @returns float32 `[batch, classes]`.
   * @throws {@link SnellaError} `TENSOR` when the length does not match the shape.
   */
  predict(images: Float32Array, batch: number): Promise<Float32Array> {
    return nativeAsync(() => this.native.predict(images, batch));
  }

  /** Per-layer report of kept entries, sparsity and allocator score (SNELLA/SNELL layers). */
  report(): LayerReport[] {
    return native(() => this.native.report()) as LayerReport[];
  }

  /** The allocator's per-round history and events, or `null` without kernel adapters/training. */
  allocator(): { history: AllocatorRound[]; events: AllocatorEvent[] } | null {
    return native(() => this.native.allocator()) as { history: AllocatorRound[]; events: AllocatorEvent[] } | null;
  }

  /**
   * Saves the adapter to folder `dir`: `adapter_model.safetensors` (trainable tensors, allocator
   * statistics) and `adapter_config.json` (method, per-layer sparsities, allocator state). Files
   * are written atomically.
   * @throws {@link SnellaError} `FILE` when a file exists and `overwrite` is not set.
   */
  saveAdapter(dir: string, opts: { overwrite?: boolean } = {}): void {
    native(() => this.native.saveAdapter(dir, opts.overwrite ?? false));
  }

  /**
   * Loads an adapter folder saved by {@link VitModel.saveAdapter} into this freshly loaded base
   * model; logits then match the saved model bit for bit.
   * @throws {@link SnellaError} `FILE`/`TENSOR` naming the file and tensor at fault.
   */
  loadAdapter(dir: string): this {
    native(() => this.native.loadAdapter(dir));
    return this;
  }

  /** Writes `W = W0 + ΔWᵀ` into every adapted weight (spec §7): no adapter cost at inference. */
  merge(): void {
    native(() => this.native.merge());
  }

  /** Restores every original `W0` bit-exactly after {@link VitModel.merge}. */
  unmerge(): void {
    native(() => this.native.unmerge());
  }

  /**
   * A tensor by its timm name (or adapter name such as `blocks.0.attn.q.snella_A`).
   * @returns shape and float32 values.
   */
  tensor(name: string): { shape: number[]; data: Float32Array } {
    const t = native(() => this.native.tensor(name)) as { shape: number[]; data: number[] };
    return { shape: t.shape, data: Float32Array.from(t.data) };
  }

  /** Frees native memory. Idempotent; later calls throw `DISPOSED`. */
  dispose(): void {
    this.native.dispose();
  }

  /** `using model = VitModel.load(...)` support. */
  [dispose](): void {
    this.dispose();
  }
}
