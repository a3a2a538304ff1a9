/**
 * {@link ReportRecorder}: collects a {@link TrainingHistory} from {@link train}'s callbacks.
 * @module
 */
import type { BatchSource } from '../data';
import type { VitModel } from '../model';
import { evaluate, type EvalResult, type EpochInfo, type StepInfo, type TrainCallbacks, type TrainResult } from '../train';
import type { EpochRecord, StepRecord, TrainingHistory } from './history';

/** Options of {@link ReportRecorder}. */
export interface ReportRecorderOptions {
  /**
   * A test set to evaluate after every epoch (top-1 and loss per epoch on the page). Costs one
   * forward pass over it per epoch, not counted in the epoch's seconds or throughput. Leave it out
   * for no per-epoch test curve, or record results yourself with {@link ReportRecorder.recordTest}.
   */
  testSet?: BatchSource;
  /** Images per forward pass of the per-epoch evaluation, integer ≥ 1 (default 128). */
  evalBatchSize?: number;
  /** Page title (default `snella training report`). */
  title?: string;
  /** Run settings for the page's table, name → value (e.g. method, rank, lr, data folder). */
  settings?: Record<string, string | number | boolean>;
}

/** The process's peak resident set size so far, in bytes (`maxRSS` is in KiB). */
function peakRss(): number {
  return process.resourceUsage().maxRSS * 1024;
}

/**
 * Collects what a training report shows: per-step loss, learning rate and throughput, per-epoch
 * train (and optionally test) top-1, peak memory, and the allocator's per-layer sparsities and
 * scores, for {@link renderReport}.
 *
 * @example
 * ```ts
 * const rec = new ReportRecorder(model, { testSet: test, settings: { method: 'snella', lr: 2e-3 } });
 * const r = await train(model, { train: ds, epochs: 10, callbacks: rec.callbacks({
 *   onEpochEnd: (e) => console.log(e.epoch, rec.lastTest?.top1),
 * }) });
 * fs.writeFileSync('runs/report.html', renderReport(rec.history({ result: r })));
 * model.dispose(); // after history(): it reads the model's report and allocator
 * ```
 */
export class ReportRecorder {
  private readonly model: VitModel;
  private readonly opts: ReportRecorderOptions;
  private readonly t0 = performance.now();
  private readonly startedAt = new Date().toISOString();
  private readonly steps: StepRecord[] = [];
  private readonly epochs: EpochRecord[] = [];
  private readonly tests = new Map<number, EvalResult>();
  private evalMs = 0;
  private last?: EvalResult;

  /**
   * Starts recording (the clock of {@link StepRecord.time} starts here).
   * @param model - the model being trained (with a method attached); read again by
   *   {@link ReportRecorder.history}, so dispose it only after that.
   * @param opts - see {@link ReportRecorderOptions}.
   */
  constructor(model: VitModel, opts: ReportRecorderOptions = {}) {
    this.model = model;
    this.opts = opts;
  }

  /** The latest test result recorded (per-epoch evaluation or {@link ReportRecorder.recordTest}). */
  get lastTest(): EvalResult | undefined {
    return this.last;
  }

  /** Wall seconds spent so far in per-epoch test evaluations. */
  get evalSeconds(): number {
    return this.evalMs / 1000;
  }

  /**
   * Callbacks for {@link TrainOptions.callbacks} that record each step and epoch, evaluate the test
   * set after each epoch when one was given, then call `inner`'s hooks (awaited), so `inner`'s
   * `onEpochEnd` sees {@link ReportRecorder.lastTest} of that epoch.
   * @param inner - your own callbacks, called after recording.
   */
  callbacks(inner: TrainCallbacks = {}): TrainCallbacks {
    return {
      onEpochStart: inner.onEpochStart ? (e) => inner.onEpochStart!(e) : undefined,
      onStep: async (s: StepInfo) => {
        this.steps.push({
          step: s.step,
          epoch: s.epoch,
          loss: s.loss,
          accuracy: s.accuracy,
          lr: s.lr,
          imagesPerSecond: s.imagesPerSecond,
          time: (performance.now() - this.t0) / 1000,
        });
        await inner.onStep?.(s);
      },
      onEpochEnd: async (e: EpochInfo) => {
        if (this.opts.testSet) {
          const t = performance.now();
          const r = await evaluate(this.model, this.opts.testSet, this.opts.evalBatchSize ?? 128);
          this.evalMs += performance.now() - t;
          this.tests.set(e.epoch, r);
          this.last = r;
        }
        const test = this.tests.get(e.epoch);
        this.epochs.push({
          epoch: e.epoch,
          loss: e.loss,
          trainTop1: e.accuracy,
          ...(test ? { testTop1: test.top1, testLoss: test.loss } : {}),
          seconds: e.seconds,
          imagesPerSecond: e.imagesPerSecond,
          ...(e.sparsity !== undefined ? { sparsity: e.sparsity } : {}),
          peakRssBytes: peakRss(),
        });
        await inner.onEpochEnd?.(e);
      },
    };
  }

  /**
   * Records a test result for `epoch` (0-based) measured by you, e.g. from your own `onEpochEnd`
   * with {@link evaluate}; replaces one recorded for that epoch.
   * @param epoch - the epoch just finished, 0-based.
   * @param result - its test result.
   */
  recordTest(epoch: number, result: EvalResult): void {
    this.tests.set(epoch, result);
    this.last = result;
    const rec = this.epochs.find((e) => e.epoch === epoch);
    if (rec) Object.assign(rec, { testTop1: result.top1, testLoss: result.loss });
  }

  /**
   * A snapshot of everything recorded, plus the model's current per-layer report and allocator
   * history. Call it before disposing the model; it can be called more than once.
   * @param final - `test`: the final test result (default: the last one recorded); `result`: what
   *   {@link train} returned (for total seconds and `aborted`).
   * @throws {@link SnellaError} `DISPOSED` when the model was disposed.
   */
  history(
    final: {
      /** The final test result (default: the last one recorded). */
      test?: EvalResult;
      /** What {@link train} returned: total seconds and `aborted`. */
      result?: TrainResult;
    } = {},
  ): TrainingHistory {
    const alloc = this.model.allocator();
    const evalSeconds = this.evalMs / 1000;
    const stepsSeconds = this.epochs.reduce((s, e) => s + e.seconds, 0);
    const test = final.test ?? this.last;
    return {
      version: 1,
      title: this.opts.title ?? 'snella training report',
      startedAt: this.startedAt,
      finishedAt: new Date().toISOString(),
      device: this.model.device,
      settings: { ...(this.opts.settings ?? {}) },
      trainable: this.model.trainableCount,
      steps: this.steps.map((s) => ({ ...s })),
      epochs: this.epochs.map((e) => ({ ...e })),
      layers: this.model.report(),
      allocator: alloc ? alloc.history : [],
      memory: { peakRssBytes: peakRss(), gpuPeakBytes: null },
      ...(test ? { test: { ...test } } : {}),
      trainSeconds: final.result ? Math.max(0, final.result.seconds - evalSeconds) : stepsSeconds,
      evalSeconds,
      aborted: final.result?.aborted ?? false,
    };
  }
}
