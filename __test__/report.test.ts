/**
 * The training report: a real SNELLA run recorded with ReportRecorder, rendered with renderReport
 * and opened in headless Chromium (the charts must be drawn, the screenshot must show them); the
 * CLI job's `--report`; escaping and empty histories.
 */
import test, { type ExecutionContext } from 'ava';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import sharp from 'sharp';
import { ImageDataset, ReportRecorder, VitModel, renderReport, train, type TrainingHistory } from '../ts';
import { runJob, type JobOptions } from '../ts/cli/job';
import { smallData } from './helpers/cli';
import { FLOWERS, TINY, VIT_TINY, tmpDir } from './helpers/tiny';

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const CHARTS = ['chart-loss', 'chart-acc', 'chart-speed', 'chart-sparsity', 'chart-score'];

/** Runs headless Chromium on `file` with `extra` flags; resolves with its stdout. */
function chromium(t: ExecutionContext, file: string, extra: string[]): Promise<string> {
  if (!fs.existsSync(CHROMIUM)) {
    t.fail(`${CHROMIUM} is missing: apt-get install -y chromium (see .ci/run)`);
    return Promise.resolve('');
  }
  const flags = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    `--user-data-dir=${tmpDir('snella-chromium-')}`, '--virtual-time-budget=5000', ...extra, `file://${file}`];
  return new Promise((resolve, reject) => {
    execFile(CHROMIUM, flags, { timeout: 120_000, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`chromium failed: ${err.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

/** The part of the DOM from the element with `id` up to the next chart container. */
function segment(dom: string, id: string): string {
  const i = dom.indexOf(`id="${id}"`);
  if (i < 0) return '';
  const rest = dom.slice(i + id.length + 5);
  const j = rest.search(/id="chart-/);
  return j < 0 ? rest : rest.slice(0, j);
}

/** Opens `html` in Chromium: the rendered marker and the DOM. */
async function dump(t: ExecutionContext, html: string): Promise<{ rendered?: string; dom: string }> {
  const file = path.join(tmpDir('snella-report-'), 'report.html');
  fs.writeFileSync(file, html);
  const dom = await chromium(t, file, ['--dump-dom']);
  const body = /<body[^>]*>/.exec(dom)?.[0] ?? '';
  return { rendered: /data-rendered="([^"]*)"/.exec(body)?.[1], dom };
}

test('a real SNELLA run: ReportRecorder + renderReport give a page whose 5 charts Chromium draws', async (t) => {
  t.timeout(600_000);
  const model = VitModel.load(VIT_TINY, { device: 'cpu' });
  const { img_size, mean, std } = model.config;
  const opts = { imageSize: img_size, normalization: { mean, std } };
  const trainSet = await ImageDataset.open(FLOWERS, 'train', opts);
  const testSet = await ImageDataset.open(FLOWERS, 'test', opts);
  model.attach({ method: 'snella', numClasses: trainSet.numClasses, rank: 8, s0: 0.01 });
  const rec = new ReportRecorder(model, { testSet, title: 'snella · report test', settings: { method: 'snella', epochs: 2, batch: 120 } });
  const seenInCallback: (number | undefined)[] = [];
  const r = await train(model, {
    train: trainSet, epochs: 2, batchSize: 120, lr: 2e-3, warmupEpochs: 1, sT: 0.5,
    callbacks: rec.callbacks({ onEpochEnd: () => void seenInCallback.push(rec.lastTest?.top1) }),
  });
  const h = rec.history({ result: r });
  const html = renderReport(h);
  model.dispose();

  // the history: 4 steps, 2 epochs with train and test top-1, 72 layers, 2 allocator rounds, memory
  t.is(h.steps.length, 4);
  t.deepEqual(h.steps.map((s) => s.step), [1, 2, 3, 4]);
  t.true(h.steps.every((s) => s.loss > 0 && s.lr > 0 && s.imagesPerSecond > 0));
  t.is(h.epochs.length, 2);
  for (const e of h.epochs) {
    t.true(e.trainTop1 >= 0 && e.trainTop1 <= 1);
    t.true(e.testTop1! >= 0 && e.testTop1! <= 1);
    t.true(e.imagesPerSecond > 0 && e.peakRssBytes > 10 << 20);
  }
  t.deepEqual(seenInCallback, h.epochs.map((e) => e.testTop1), 'the inner onEpochEnd sees that epoch\'s test result');
  t.is(h.test?.top1, h.epochs[1].testTop1);
  t.is(h.test?.count, testSet.length);
  t.is(h.layers.length, 72);
  t.is(h.allocator.length, 2);
  t.true(h.allocator.every((a) => a.sparsities.length === 72 && a.scores.length === 72));
  t.true(h.memory.peakRssBytes >= Math.max(...h.epochs.map((e) => e.peakRssBytes)));
  t.is(h.memory.gpuPeakBytes, null);
  t.true(h.evalSeconds > 0 && h.trainSeconds > 0 && h.trainSeconds < r.seconds);
  t.deepEqual(JSON.parse(JSON.stringify(h)), h, 'plain JSON');

  // self-contained: ECharts inlined, no network reference
  t.true(html.length > 500_000, `${html.length} characters: ECharts is inlined`);
  t.notRegex(html, /<(?:script|link|img)[^>]+(?:src|href)\s*=\s*["']?(?:https?:)?\/\//i);
  t.regex(html, /<title>snella · report test<\/title>/);

  // Chromium draws all five charts (ECharts' SVG renderer: an <svg> with paths in each container)
  const { rendered, dom } = await dump(t, html);
  t.is(rendered, '5', 'document.body.dataset.rendered');
  for (const id of CHARTS) t.regex(segment(dom, id), /<svg[\s\S]*<path/, `${id} has an svg with paths`);

  // the screenshot: non-trivial, with the heatmaps' blue (sparsity) and amber (score) cells painted
  const dir = tmpDir('snella-shot-');
  const file = path.join(dir, 'report.html');
  fs.writeFileSync(file, html);
  const png = path.join(dir, 'shot.png');
  await chromium(t, file, [`--screenshot=${png}`, '--window-size=1400,2000']);
  const size = fs.statSync(png).size;
  t.true(size > 30_000, `screenshot is ${size} bytes`);
  const { data, info } = await sharp(png).removeAlpha().raw().toBuffer({ resolveWithObject: true });
  t.is(info.width, 1400);
  t.is(info.height, 2000);
  let blue = 0;
  let amber = 0;
  for (let i = 0; i < data.length; i += 3) {
    const [r8, g8, b8] = [data[i], data[i + 1], data[i + 2]];
    if (b8 > 90 && b8 > r8 + 60 && b8 > g8 + 20) blue++;
    if (r8 > 180 && g8 > 60 && g8 < 200 && b8 < 90) amber++;
  }
  t.true(blue > 5000, `${blue} blue pixels (sparsity heatmap)`);
  t.true(amber > 5000, `${amber} amber pixels (score heatmap, learning-rate line)`);
  const stats = await sharp(png).stats();
  t.true(stats.channels[0].stdev > 10, `pixel stdev ${stats.channels[0].stdev}`);
});

function job(data: string, over: Partial<JobOptions>): JobOptions {
  return {
    model: TINY, data, trainSplit: 'train', testSplit: 'test', method: 'snella', rank: 4, heads: 2, s0: 0.01, sT: 0.5,
    beta1: 0.85, beta2: 0.85, epochs: 2, batch: 8, lr: 2e-3, wd: 0.05, warmup: 1, seed: 0, out: tmpDir('snella-report-out-'),
    device: 'cpu', json: true, overwrite: false, ...over,
  };
}

test.serial('the CLI job: --report writes report.html and history.json; tests after every epoch by default', async (t) => {
  t.timeout(300_000);
  const data = smallData();
  const dir = path.join(tmpDir('snella-report-dir-'), 'nested', 'report');
  const out: string[] = [];
  const write = process.stdout.write;
  process.stdout.write = ((s: string) => (out.push(String(s)), true)) as typeof process.stdout.write;
  let r;
  try {
    r = await runJob(job(data, { report: dir }));
  } finally {
    process.stdout.write = write;
  }
  t.is(r.report, path.join(dir, 'report.html'));
  t.true(fs.statSync(path.join(dir, 'report.html')).size > 500_000);
  const h = JSON.parse(fs.readFileSync(path.join(dir, 'history.json'), 'utf8')) as TrainingHistory;
  t.is(h.epochs.length, 2);
  t.is(h.steps.length, 6);
  t.deepEqual(r.epochTestTop1, h.epochs.map((e) => e.testTop1));
  t.is(r.testTop1, r.epochTestTop1!.at(-1)!, 'the final test result is the last epoch\'s');
  t.is(h.test?.count, 14);
  t.is(h.settings.method, 'snella');
  t.is(h.settings['test after every epoch'], true);
  t.is(h.allocator.length, 2);
  t.true(r.trainSeconds > 0 && h.evalSeconds > 0);
  t.deepEqual(JSON.parse(fs.readFileSync(path.join(r.adapterDir!, '..', 'results.json'), 'utf8')).report, r.report);
  t.is(out.length, 1, 'with --json, one line on stdout');
  const { rendered } = await dump(t, fs.readFileSync(r.report!, 'utf8'));
  t.is(rendered, '5');
});

test.serial('the CLI job: no report and no per-epoch test by default; a method without allocator draws 3 charts', async (t) => {
  t.timeout(300_000);
  const data = smallData();
  const write = process.stdout.write;
  process.stdout.write = (() => true) as typeof process.stdout.write;
  let plain;
  let linear;
  const dir = tmpDir('snella-report-linear-');
  try {
    plain = await runJob(job(data, { epochs: 1 }));
    linear = await runJob(job(data, { method: 'linear', report: dir, evalEveryEpoch: false }));
  } finally {
    process.stdout.write = write;
  }
  t.is(plain.report, undefined);
  t.is(plain.epochTestTop1, undefined);
  t.is(linear.epochTestTop1, undefined);
  const h = JSON.parse(fs.readFileSync(path.join(dir, 'history.json'), 'utf8')) as TrainingHistory;
  t.true(h.epochs.every((e) => e.testTop1 === undefined));
  t.deepEqual(h.allocator, []);
  t.deepEqual(h.layers, []);
  t.is(h.evalSeconds, 0);
  const html = fs.readFileSync(linear.report!, 'utf8');
  t.regex(html, /No allocator history/);
  t.regex(html, /no per-epoch test evaluation/);
  const { rendered, dom } = await dump(t, html);
  t.is(rendered, '3');
  for (const id of CHARTS.slice(0, 3)) t.regex(segment(dom, id), /<svg/);
  t.false(dom.includes('id="chart-sparsity"'));
});

test('renderReport escapes text, keeps the data block intact and renders an empty history', async (t) => {
  const evil = '</script><script>document.body.dataset.pwned = 1</script><b>';
  const h: TrainingHistory = {
    version: 1, title: `snella ${evil}`, startedAt: '2026-01-01T00:00:00.000Z', finishedAt: '2026-01-01T00:01:00.000Z',
    device: 'cuda', settings: { method: 'lora', note: evil, flag: true }, trainable: 1234,
    steps: [], epochs: [], layers: [{ name: evil, n_in: 2, n_out: 2, entries: 4, kept: 2, sparsity: 0.5, score: 1 }],
    allocator: [], memory: { peakRssBytes: 300 << 20, gpuPeakBytes: null }, trainSeconds: 0, evalSeconds: 0, aborted: true,
  };
  const html = renderReport(h);
  t.false(html.includes('<script>document.body.dataset.pwned'));
  t.is(html.match(/<\/script>/g)?.length, 3, 'only the page\'s own three scripts end');
  const json = /<script type="application\/json" id="snella-data">([\s\S]*?)<\/script>/.exec(html)![1];
  t.is(JSON.parse(json).layers[0].name, evil);
  t.regex(html, /peak GPU memory<\/div><div class="v">n\/a/);
  t.regex(html, /stopped early/);
  t.regex(html, /<span class="v">yes<\/span>/);
  const { rendered, dom } = await dump(t, html);
  t.is(rendered, '0');
  t.false(dom.includes('data-pwned'), 'the injected script did not run');
});
