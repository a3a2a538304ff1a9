/**
 * The CLI job's use of the report (`snella train|demo --report DIR`): the recorder with the run's
 * settings, and the files written.
 * @module
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { JobOptions } from '../cli/job';
import type { BatchSource } from '../data';
import type { VitModel } from '../model';
import type { EvalResult, TrainCallbacks, TrainResult } from '../train';
import { ReportRecorder } from './recorder';
import { renderReport } from './render';

/** A recorder when the job writes a report or evaluates every epoch, else undefined. */
export function jobRecorder(model: VitModel, o: JobOptions, testSet: BatchSource): ReportRecorder | undefined {
  const everyEpoch = o.evalEveryEpoch ?? o.report !== undefined;
  if (o.report === undefined && !everyEpoch) return undefined;
  const stem = (p: string) => path.basename(p).replace(/\.safetensors$/, '');
  // paths as given, or relative to the working folder when they are under it
  const show = (p: string) => {
    const rel = path.relative(process.cwd(), path.resolve(p));
    return rel && !rel.startsWith('..') && !path.isAbsolute(rel) && rel.length < p.length ? rel : p;
  };
  return new ReportRecorder(model, {
    testSet: everyEpoch ? testSet : undefined,
    evalBatchSize: Math.max(o.batch, 64),
    title: `snella · ${stem(o.model)} on ${stem(o.data)}`,
    settings: {
      method: o.method,
      ...(['snella', 'snell', 'lora'].includes(o.method) ? { rank: o.rank } : {}),
      ...(['snella', 'snell'].includes(o.method) ? { heads: o.heads, s0: o.s0, sT: o.sT } : {}),
      ...(o.method === 'snella' ? { 'allocator β1': o.beta1, 'allocator β2': o.beta2 } : {}),
      epochs: o.epochs,
      batch: o.batch,
      lr: o.lr,
      'weight decay': o.wd,
      'warm-up epochs': o.warmup,
      seed: o.seed,
      model: show(o.model),
      data: show(o.data),
      'train split': o.trainSplit,
      'test split': o.testData ? `${show(o.testData)} (${o.testSplit})` : o.testSplit,
      'test after every epoch': everyEpoch,
      ...(o.resume ? { resumed: true } : {}),
    },
  });
}

/** The recorder's callbacks around `cb`, or `cb` alone without a recorder. */
export function wrapCallbacks(rec: ReportRecorder | undefined, cb: TrainCallbacks): TrainCallbacks {
  return rec ? rec.callbacks(cb) : cb;
}

/** `{ epochTestTop1 }` for the job's result when the test set was evaluated after epochs. */
export function epochTestTop1(rec: ReportRecorder): { epochTestTop1?: number[] } {
  const t = rec.history().epochs.flatMap((e) => (e.testTop1 === undefined ? [] : [e.testTop1]));
  return t.length ? { epochTestTop1: t } : {};
}

/** Writes `dir/report.html` and `dir/history.json` (each atomically); returns the HTML's path. */
export function writeJobReport(rec: ReportRecorder, dir: string, test: EvalResult, result: TrainResult): string {
  const h = rec.history({ test, result });
  fs.mkdirSync(dir, { recursive: true });
  const write = (name: string, text: string) => {
    const file = path.join(dir, name);
    const tmp = `${file}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, text);
    fs.renameSync(tmp, file);
    return file;
  };
  write('history.json', JSON.stringify(h, null, 1) + '\n');
  return write('report.html', renderReport(h));
}
