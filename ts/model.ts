/**
 * The ViT model façade: load a timm-named checkpoint, attach a fine-tuning method, predict,
 * report, merge and save/load adapters.
 * @module
 */
import type { NativeModel } from '../native/binding';
import { fromNative, native, nativeAsync, SnellaError } from './errors';
import { binding } from './native';
import { loadCheckpoint, saveCheckpoint, type CheckpointInfo } from './checkpoint';
import { validateAttachKeys } from './validate';

/**
 * Where to compute: `cpu` (the f32 reference backend, multi-threaded), `cuda` (first GPU; needs an
 * addon built with the `cuda` feature and a working driver) or `auto`: CUDA when it works, else the
 * CPU, with the reason in {@link VitModel.deviceReason}.
 */
export type Device = 'auto' | 'cpu' | 'cuda';

/**
 * How the GEMMs multiply on CUDA (accumulation is f32 in every mode): `f32` strict (the CPU-parity
 * reference), `tf32` (TF32 tensor cores, 10-bit mantissa inputs) or `bf16` (bf16 operands, as
 * PyTorch's autocast; the fastest and smallest). In `bf16` a linear layer's input is kept in bf16
 * between forward and backward, the MLP pre-activation and the LayerNorms' normalised inputs are
 * kept in bf16 (their outputs rebuilt in backward, computed from the rounded values in forward too),
 * and attention with head dim 64 is fused
 * (FlashAttention-2: the probabilities are recomputed, not stored; `P` and `dS` enter their products
 * as bf16 hi + lo pairs; the environment variable `SNELLA_ATTENTION=unfused` turns this off); an
 * adapted layer multiplies by one bf16 effective weight `W0 + ΔWᵀ` (as mixed precision casts a
 * master weight; `SNELLA_DELTA_PRODUCTS=separate` multiplies `W0` and `ΔWᵀ` apart, one more GEMM per
 * layer, the same accuracy over five seeds of the recipe); other tensors stay f32. The CPU always
 * computes in f32.
 */
export type Precision = 'f32' | 'tf32' | 'bf16';

/**
 * Fine-tuning methods, compared under one trainer (every one re-initialises the head and trains it
 * together with `cls_token`):
 *
 * - `snella`: SNELLA (arXiv 2510.24037): per adapted linear layer a sparse `ΔW` from a low-rank pair
 *   `A`, `B` merged through a nonlinear kernel, intra-layer top-k, and the inter-layer allocator
 *   re-deciding each layer's sparsity every epoch (spec §1–§5).
 * - `snell`: SNELL (Shen et al., NeurIPS 2024): the kernelized low-rank merge with one fixed
 *   sparsity for every layer (no allocator).
 * - `lora`: LoRA (Hu et al., arXiv 2106.09685): `ΔW = B·A` of rank r, dense.
 * - `linear`: linear probe, only the head (and `cls_token`) is trained.
 * - `full`: full fine-tuning, every tensor is trained.
 */
export type Method = 'snella' | 'snell' | 'lora' | 'linear' | 'full';

/**
 * How the kept set `S` (top-k of `|M|`) turns the kernel-merged matrix `M` into `ΔW` (spec §2), with
 * `sg` the stop-gradient:
 * `magnitude-product`: `ΔW = M ⊙ sg(|M|) ⊙ 1_S` (the released SNELLA code's rule, default);
 * `soft-threshold`: `ΔW = M ⊙ sg(max(|M| − τ, 0))`, `τ` the largest dropped magnitude (paper Eq. 5);
 * `mask`: `ΔW = M ⊙ 1_S`.
 */
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
  /**
   * Kernel pieces H (default 2, spec §1). On CUDA, H is 1 to 8 and rank/H at most 167, 75, 29 and 6
   * for H = 1, 2, 4, 8 (the merge kernels' shared memory); a larger choice is refused when the model
   * is built, with an error naming `heads` or `heads/rank`.
   */
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
  /**
   * The raw napi binding object. Internal and unstable: its methods take and return snake_case JSON
   * and may change in any release; use the methods of this class instead.
   */
  readonly native: NativeModel;
  /** The device in use after `auto` was resolved. */
  readonly device: 'cpu' | 'cuda';
  /** Why `auto` chose the CPU (one line, e.g. the CUDA driver error), when it did; else undefined. */
  readonly deviceReason?: string;
  /** The checkpoint path, as given to {@link VitModel.load}. */
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
   *
   * The file is a timm `VisionTransformer` state dict in safetensors (F32, F16 or BF16, kept as f32):
   * `cls_token` `[1, 1, D]`, `pos_embed` `[1, 1 + (img/patch)², D]`, `patch_embed.proj.weight`
   * `[D, 3, patch, patch]`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}`,
   * `norm.*`, `head.*`. The shape ({@link VitConfig}) comes from the file's `__metadata__`
   * (`img_size`, `patch_size`, `embed_dim`, `depth`, `num_heads`, `mlp_ratio`, `mean`, `std`, …).
   *
   * @param path - the `.safetensors` checkpoint.
   * @param opts - `device`: see {@link Device} (default `auto`). `precision` of the GEMMs on CUDA
   *   ({@link Precision}): `f32` (default, strict; what the CPU-parity tests use), `tf32` (TF32 tensor
   *   cores: 10-bit mantissa inputs, f32 accumulation) or `bf16` (bf16 operands, f32 accumulation, as
   *   PyTorch's autocast; fastest, and the layer inputs and fused attention's q/k/v are kept in bf16).
   *   Ignored on the CPU.
   * @returns the model, with no method attached (it predicts with the checkpoint's own head).
   * @throws {@link SnellaError} `FILE`/`TENSOR` naming the file and tensor for a bad checkpoint;
   *   `CUDA_UNAVAILABLE` when `cuda` was asked for and cannot be used; `NATIVE_LOAD` when the native
   *   addon cannot be loaded.
   *
   * @example
   * ```ts
   * const model = VitModel.load('assets/models/vit_tiny_patch8_64.safetensors', { device: 'cpu' });
   * console.log(model.config.embed_dim, model.device); // 192 'cpu'
   * model.dispose();
   * ```
   */
  static load(path: string, opts: { device?: Device; precision?: Precision } = {}): VitModel {
    const device = opts.device ?? 'auto';
    const precision = opts.precision ?? 'f32';
    const b = binding();
    if (device === 'auto') {
      try {
        const n = b.NativeModel.load(path, 'cuda', precision);
        return new VitModel(n, 'cuda', path);
      } catch (e) {
        // Fall back only when CUDA itself cannot work; a bad checkpoint is the user's error either way.
        const err = fromNative(e);
        if (!(err instanceof SnellaError) || !['CUDA_UNAVAILABLE', 'CUDA_ERROR'].includes(err.code)) throw err;
        const n = native(() => b.NativeModel.load(path, 'cpu'));
        return new VitModel(n, 'cpu', path, `${err.code}: ${err.message}`);
      }
    }
    const n = native(() => b.NativeModel.load(path, device, precision));
    return new VitModel(n, device === 'cuda' ? 'cuda' : 'cpu', path);
  }

  /**
   * The model's shape and normalisation, read from the checkpoint. Its `num_classes` stays the
   * checkpoint's head after {@link VitModel.attach}; {@link VitModel.numClasses} gives the classes
   * the model predicts now.
   * @throws {@link SnellaError} `DISPOSED` after {@link VitModel.dispose}.
   */
  get config(): VitConfig {
    return native(() => this.native.config()) as VitConfig;
  }

  /**
   * Classes the model predicts now (the width of {@link VitModel.predict}'s logits): the attached
   * method's `numClasses`, or the checkpoint's `num_classes` with no method attached.
   * @throws {@link SnellaError} `DISPOSED` after {@link VitModel.dispose}.
   */
  get numClasses(): number {
    const m = native(() => this.native.method()) as { num_classes: number } | null;
    return m ? m.num_classes : this.config.num_classes;
  }

  /**
   * Attaches a fine-tuning method (spec §4): re-initialises the head for `numClasses`, freezes the
   * backbone (except for `full`), makes the head and `cls_token` trainable and adds adapters
   * (`snella`, `snell`, `lora`) to the target linear layers. See {@link Method} for the methods and
   * their sources. One method per model: attach again on a fresh {@link VitModel.load}. Adapter
   * tensors can be read with {@link VitModel.tensor}: SNELLA/SNELL `<layer>.snella_A`
   * `[heads, in, rank/heads]` and `<layer>.snella_B` `[heads, out, rank/heads]`; LoRA
   * `<layer>.lora_down` `[rank, in]` and `<layer>.lora_up` `[out, rank]` (f32).
   *
   * @param opts - see {@link AttachOptions}.
   * @returns this model (for chaining).
   * @throws {@link SnellaError} `CONFIG` naming the field out of range or a key that is not an
   *   option, or when a method is attached already; `TARGET` listing the real layer names when a target matches nothing.
   *
   * @example
   * ```ts
   * model.attach({ method: 'snella', numClasses: 10, rank: 8, s0: 0.01 });
   * console.log(model.trainableCount, model.report().length); // 72 adapted layers for ViT-Tiny
   * // or LoRA on q and v only, on another freshly loaded model:
   * other.attach({ method: 'lora', numClasses: 10, rank: 4, targets: ['q', 'v'] });
   * ```
   */
  attach(opts: AttachOptions): this {
    validateAttachKeys(opts);
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

  /** Number of trainable scalar values (adapters, head, `cls_token`; everything for `full`). */
  get trainableCount(): number {
    return native(() => this.native.trainableCount());
  }

  /**
   * Logits for a batch of normalised NCHW images (inference mode, no gradients; runs off the main
   * thread).
   * @param images - float32 `[batch, 3, img_size, img_size]`, normalised with the config's
   *   `mean`/`std` as {@link ImageDataset.load} does.
   * @param batch - number of images in `images`, integer ≥ 1.
   * @returns float32 `[batch, classes]` row-major logits (pre-softmax), `classes` being the attached
   *   `numClasses` or the checkpoint's `num_classes`.
   * @throws {@link SnellaError} `TENSOR` when the length does not match the shape.
   */
  predict(images: Float32Array, batch: number): Promise<Float32Array> {
    return nativeAsync(() => this.native.predict(images, batch));
  }

  /**
   * Per-layer report of kept entries, sparsity and allocator score of the SNELLA/SNELL layers, in
   * block order (`q, k, v, proj, fc1, fc2` within a block); empty for other methods.
   */
  report(): LayerReport[] {
    return native(() => this.native.report()) as LayerReport[];
  }

  /**
   * The allocator's state (SNELLA, spec §5), or `null` without kernel adapters or before
   * {@link train}.
   */
  allocator(): {
    /** One entry per round run so far, oldest first. */
    history: AllocatorRound[];
    /** Non-finite importance values seen (set to 0), oldest first. */
    events: AllocatorEvent[];
  } | null {
    return native(() => this.native.allocator()) as { history: AllocatorRound[]; events: AllocatorEvent[] } | null;
  }

  /**
   * Saves the adapter to folder `dir` (created if needed): `adapter_model.safetensors` (trainable
   * tensors as F32 — adapters, head, `cls_token`, every tensor for `full` — and allocator
   * statistics) and `adapter_config.json` (method, per-layer sparsities, allocator state). Files
   * are written atomically (temporary file, then rename).
   * @param dir - output folder.
   * @param opts - `overwrite`: replace existing files (default false).
   * @throws {@link SnellaError} `FILE` when a file exists and `overwrite` is not set, or when writing
   *   fails; `CONFIG` without an attached method.
   */
  saveAdapter(dir: string, opts: { overwrite?: boolean } = {}): void {
    native(() => this.native.saveAdapter(dir, opts.overwrite ?? false));
  }

  /**
   * Loads an adapter folder saved by {@link VitModel.saveAdapter} into this freshly loaded base
   * model (attaching the saved method); logits then match the saved model bit for bit.
   * @param dir - folder holding `adapter_model.safetensors` and `adapter_config.json`.
   * @returns this model (for chaining).
   * @throws {@link SnellaError} `FILE`/`TENSOR` naming the file and tensor at fault (missing file,
   *   shape that does not fit this base model).
   */
  loadAdapter(dir: string): this {
    native(() => this.native.loadAdapter(dir));
    return this;
  }

  /**
   * Saves a training checkpoint to `dir/checkpoint.safetensors` (one file, written atomically:
   * temporary file, fsync, rename): every trainable tensor with its AdamW moments, the trainer
   * (step, epoch, settings), the allocator (statistics, schedule, history), the method, per-layer
   * sparsities and where the data order continues. {@link VitModel.loadCheckpoint} on a freshly
   * loaded base model then continues training bit-exactly. {@link train} does this for you with
   * `checkpointDir`.
   * @param dir - output folder (created if needed).
   * @param opts - `overwrite`: replace an existing checkpoint (default false); `extra`: any JSON
   *   value returned by {@link VitModel.loadCheckpoint}.
   * @throws {@link SnellaError} `FILE` when a checkpoint exists and `overwrite` is not set, or when
   *   writing fails; `CONFIG` before training was prepared or while merged; `NON_FINITE` naming the
   *   first tensor holding NaN/Inf (a poisoned state never replaces a good checkpoint).
   */
  saveCheckpoint(dir: string, opts: { overwrite?: boolean; extra?: unknown } = {}): void {
    saveCheckpoint(this, dir, opts.overwrite ?? false, opts.extra);
  }

  /**
   * Restores a checkpoint saved by {@link VitModel.saveCheckpoint} into this base model: attaches
   * the saved method when none is attached (else it must be the same), and restores the trainer,
   * tensors, moments, sparsities and allocator. A failed check leaves the tensors and the trainer
   * as they were (a method attached from the checkpoint stays attached).
   * @param dir - folder holding `checkpoint.safetensors`.
   * @returns where training continues and the saved `extra`.
   * @throws {@link SnellaError} `FILE`/`TENSOR` naming the file and tensor at fault (missing,
   *   truncated, other base weights, a tensor that does not fit); `CONFIG` naming the first method
   *   or training setting that differs from the checkpoint's.
   */
  loadCheckpoint(dir: string): CheckpointInfo {
    return loadCheckpoint(this, dir);
  }

  /**
   * Writes `W = W0 + ΔWᵀ` into every adapted weight (spec §7): no adapter cost at inference, logits
   * within about 1e-5 of the unmerged model. {@link VitModel.tensor} then returns the merged
   * weights (e.g. for export under timm names).
   */
  merge(): void {
    native(() => this.native.merge());
  }

  /** Restores every original `W0` bit-exactly after {@link VitModel.merge}. */
  unmerge(): void {
    native(() => this.native.unmerge());
  }

  /**
   * A copy of a tensor by its timm name (`cls_token`, `pos_embed`, `patch_embed.proj.weight`,
   * `blocks.3.attn.qkv.weight`, `head.bias`, …) or adapter name (`blocks.0.attn.q.snella_A`).
   * Weights of linear layers are `[out, in]` as in PyTorch; after {@link VitModel.merge} they hold
   * the merged values.
   * @param name - the tensor name.
   * @returns shape (outermost first) and float32 row-major values.
   * @throws {@link SnellaError} `TENSOR` when no tensor has that name.
   */
  tensor(name: string): {
    /** Shape, outermost first. */
    shape: number[];
    /** Values, row-major, float32. */
    data: Float32Array;
  } {
    const t = native(() => this.native.tensor(name)) as { shape: number[]; data: number[] };
    return { shape: t.shape, data: Float32Array.from(t.data) };
  }

  /** Frees native (host or GPU) memory. Idempotent; later calls of other methods throw `DISPOSED`. */
  dispose(): void {
    this.native.dispose();
  }

  /** `using model = VitModel.load(...)` support: calls {@link VitModel.dispose}. */
  [dispose](): void {
    this.dispose();
  }
}
