/**
 * The data of a training report: what {@link ReportRecorder} collects during {@link train} and
 * {@link renderReport} draws. Plain JSON (no classes, no typed arrays), so it can be saved with
 * `JSON.stringify` and rendered later.
 * @module
 */
import type { AllocatorRound, LayerReport } from '../model';
import type { EvalResult } from '../train';

/** One optimizer step of a {@link TrainingHistory}. */
export interface StepRecord {
  /** Optimizer step, 1-based over the run. */
  step: number;
  /** Epoch, 0-based. */
  epoch: number;
  /** Mean cross-entropy of the batch, in nats. */
  loss: number;
  /** Top-1 accuracy of the batch, in [0, 1]. */
  accuracy: number;
  /** Learning rate used for the step. */
  lr: number;
  /** Images per second of the step (wall clock since the previous step). */
  imagesPerSecond: number;
  /** Seconds since the recording started (wall clock), when the step finished. */
  time: number;
}

/** One epoch of a {@link TrainingHistory}. */
export interface EpochRecord {
  /** Epoch, 0-based (the page shows it 1-based, like the CLI's progress bar). */
  epoch: number;
  /** Mean training cross-entropy over the epoch's images, in nats. */
  loss: number;
  /** Training top-1 over the epoch, in [0, 1] (measured on the fly, while the weights change). */
  trainTop1: number;
  /** Test top-1 after the epoch, in [0, 1]; absent when no test set was evaluated per epoch. */
  testTop1?: number;
  /** Test mean cross-entropy after the epoch, in nats; absent like `testTop1`. */
  testLoss?: number;
  /** Wall seconds of the epoch's training steps (the test evaluation not included). */
  seconds: number;
  /** Training images per second over the epoch. */
  imagesPerSecond: number;
  /** Mean sparsity over adapted layers weighted by size (fraction zeroed), SNELLA/SNELL only. */
  sparsity?: number;
  /**
   * The process's peak resident set size so far, in bytes (`process.resourceUsage().maxRSS`),
   * read after the epoch (and its test evaluation). Host memory: on CUDA it leaves out GPU memory.
   */
  peakRssBytes: number;
}

/** Peak memory of a {@link TrainingHistory}. */
export interface MemoryRecord {
  /** Peak resident set size of the process over the recording, in bytes (host memory). */
  peakRssBytes: number;
  /**
   * Peak GPU memory in bytes, or `null` when not known: the CPU backend uses none, and the CUDA
   * backend does not expose its peak yet (the page then says n/a).
   */
  gpuPeakBytes: number | null;
}

/** Everything {@link renderReport} draws; made by {@link ReportRecorder.history}. */
export interface TrainingHistory {
  /** Format version: 1. */
  version: 1;
  /** Page title, e.g. `snella · vit_tiny_patch8_64 on flowers10-64`. */
  title: string;
  /** When the recording started, ISO 8601 (UTC). */
  startedAt: string;
  /** When {@link ReportRecorder.history} was called, ISO 8601 (UTC). */
  finishedAt: string;
  /** Device the model ran on. */
  device: 'cpu' | 'cuda';
  /** Run settings shown as a table, name → value (e.g. `{ method: 'snella', lr: 0.002 }`). */
  settings: Record<string, string | number | boolean>;
  /** Trainable scalar values of the model. */
  trainable: number;
  /** Every optimizer step, oldest first. */
  steps: StepRecord[];
  /** Every finished epoch, oldest first. */
  epochs: EpochRecord[];
  /**
   * Adapted layers at the end (SNELLA/SNELL; empty for other methods), in {@link VitModel.report}
   * order: the rows of the sparsity heatmap.
   */
  layers: LayerReport[];
  /**
   * The allocator's rounds, oldest first ({@link VitModel.allocator}`().history`; empty without an
   * allocator). Round `r` decided the sparsities used in epoch `r`; `sparsities[i]` and `scores[i]`
   * belong to `layers[i]`.
   */
  allocator: AllocatorRound[];
  /** Peak memory. */
  memory: MemoryRecord;
  /** Final test result, when known. */
  test?: EvalResult;
  /** Wall seconds of training (steps only: per-epoch test evaluations left out). */
  trainSeconds: number;
  /** Wall seconds spent on per-epoch test evaluations. */
  evalSeconds: number;
  /** Whether training stopped early (abort signal). */
  aborted: boolean;
}
