/**
 * {@link renderReport}: a {@link TrainingHistory} as one self-contained HTML page, with Apache
 * ECharts inlined from `node_modules` (no network access needed to view it).
 * @module
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SnellaError } from '../errors';
import { CLIENT_JS } from './client';
import type { TrainingHistory } from './history';

let echartsCache: { js: string; version: string } | undefined;

/** The minified ECharts bundle and its version, read once from the installed `echarts` package. */
function echartsBundle(): { js: string; version: string } {
  if (echartsCache) return echartsCache;
  let file: string;
  try {
    file = require.resolve('echarts/dist/echarts.min.js');
  } catch (e) {
    throw new SnellaError('FILE', `the report needs the echarts package (a dependency of snella): ${(e as Error).message}`);
  }
  const js = fs.readFileSync(file, 'utf8');
  let version = '';
  try {
    version = (JSON.parse(fs.readFileSync(path.join(path.dirname(file), '..', 'package.json'), 'utf8')) as { version?: string }).version ?? '';
  } catch {
    // the version is only shown in the footer
  }
  // An inline <script> ends at the first "</script": make sure the bundle cannot contain one.
  echartsCache = { js: js.replace(/<\/(script)/gi, '<\\/$1'), version };
  return echartsCache;
}

const esc = (s: string): string =>
  s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);

const pct = (x: number, d = 1): string => `${(x * 100).toFixed(d)}%`;

function bytes(b: number): string {
  if (b >= 1024 ** 3) return `${(b / 1024 ** 3).toFixed(2)} GiB`;
  return `${(b / 1024 ** 2).toFixed(0)} MiB`;
}

function duration(s: number): string {
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s - m * 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

function count(n: number): string {
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e4) return `${(n / 1e3).toFixed(1)} k`;
  return n.toLocaleString('en-US');
}

/** The summary cards: [label, value, detail]. */
function cards(h: TrainingHistory): [string, string, string][] {
  const out: [string, string, string][] = [];
  const tested = h.epochs.filter((e) => e.testTop1 !== undefined);
  const last = h.epochs.at(-1);
  out.push(h.test ? ['test top-1', pct(h.test.top1), `${h.test.count} images · loss ${h.test.loss.toFixed(3)}`] : ['test top-1', 'n/a', 'no test set evaluated']);
  if (tested.length) {
    const best = tested.reduce((a, b) => (b.testTop1! > a.testTop1! ? b : a));
    out.push(['best test top-1', pct(best.testTop1!), `epoch ${best.epoch + 1} of ${h.epochs.length}`]);
  }
  if (last) out.push(['train top-1', pct(last.trainTop1), `last epoch · loss ${last.loss.toFixed(3)}`]);
  const secs = h.epochs.reduce((s, e) => s + e.seconds, 0);
  const imgs = h.epochs.reduce((s, e) => s + e.seconds * e.imagesPerSecond, 0);
  if (secs > 0) out.push(['throughput', `${(imgs / secs).toFixed(1)} img/s`, `training images, ${h.device}`]);
  out.push(['training time', duration(h.trainSeconds), h.evalSeconds > 0 ? `+ ${duration(h.evalSeconds)} per-epoch testing` : `${h.steps.length} steps`]);
  if (h.device === 'cpu') out.push(['peak memory', bytes(h.memory.peakRssBytes), 'process RSS peak']);
  else out.push(['peak GPU memory', h.memory.gpuPeakBytes === null ? 'n/a' : bytes(h.memory.gpuPeakBytes), `not exposed by the CUDA backend · host RSS peak ${bytes(h.memory.peakRssBytes)}`]);
  const entries = h.layers.reduce((s, l) => s + l.entries, 0);
  if (entries) {
    const kept = h.layers.reduce((s, l) => s + l.kept, 0);
    out.push(['sparsity', pct(1 - kept / entries), `${count(kept)} of ${count(entries)} ΔW entries kept`]);
  }
  out.push(['trainable', count(h.trainable), `values in ${h.layers.length || 'no'} adapted layers + head`]);
  return out;
}

/**
 * Renders a training report as one self-contained HTML page (about 1.2 MB, mostly the inlined
 * ECharts; no network access needed): summary cards (test top-1, throughput, peak memory, final
 * sparsity, …), loss and learning rate per step, train and test top-1 per epoch, images/s and peak
 * RSS per epoch, and heatmaps of each layer's sparsity and allocator score per round (layers ×
 * epochs, with tooltips). The page sets `document.body.dataset.rendered` to the number of charts
 * drawn (5 with an allocator, 3 without) once they are drawn.
 *
 * @param history - from {@link ReportRecorder.history} (or a saved copy of it).
 * @returns the HTML text (UTF-8).
 * @throws {@link SnellaError} `FILE` when the `echarts` package cannot be found.
 *
 * @example
 * ```ts
 * fs.writeFileSync('runs/demo/report/report.html', renderReport(recorder.history({ result })));
 * ```
 */
export function renderReport(history: TrainingHistory): string {
  const h = history;
  const { js, version } = echartsBundle();
  const data = JSON.stringify({ device: h.device, steps: h.steps, epochs: h.epochs, layers: h.layers, allocator: h.allocator })
    .replace(/</g, '\\u003c')
    .replace(/\u2028/g, '\\u2028')
    .replace(/\u2029/g, '\\u2029');
  const hasAlloc = h.allocator.length > 0 && h.layers.length > 0;
  const settings = Object.entries({ device: h.device, ...h.settings, started: h.startedAt.replace('T', ' ').replace(/\.\d+Z$/, ' UTC') })
    .map(([k, v]) => `<div class="kv"><span class="k">${esc(k)}</span><span class="v">${esc(typeof v === 'boolean' ? (v ? 'yes' : 'no') : String(v))}</span></div>`)
    .join('');
  const cardHtml = cards(h)
    .map(([k, v, d]) => `<div class="card"><div class="k">${esc(k)}</div><div class="v">${v === 'n/a' ? v : esc(v).replace(/([A-Za-z][A-Za-z/]*)/g, '<span class="u">$1</span>')}</div><div class="d">${esc(d)}</div></div>`)
    .join('');
  const heatRows = Math.max(h.layers.length, 8);
  const heatHeight = Math.min(2400, heatRows * 12 + 110);
  const method = h.settings.method !== undefined ? String(h.settings.method) : '';
  const sub = [method && `method ${method}`, `${h.epochs.length} epochs`, `${h.steps.length} steps`, h.device, h.finishedAt.slice(0, 10)]
    .filter(Boolean)
    .join(' · ');
  const noAlloc = `<p class="empty">No allocator history: ${method ? `the ${esc(method)} method has` : 'this run has'} no per-layer sparsity allocator (SNELLA only) or no round has run.</p>`;
  const testNote = h.epochs.some((e) => e.testTop1 !== undefined) ? '' : ' <span class="note">(no per-epoch test evaluation in this run)</span>';
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="snella">
<title>${esc(h.title)}</title>
<style>
:root { --bg: #f6f7fb; --panel: #ffffff; --ink: #0f172a; --muted: #64748b; --line: #e2e8f0; --accent: #4f46e5; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Liberation Sans", sans-serif; }
main { max-width: 1360px; margin: 0 auto; padding: 28px 28px 16px; }
header { display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; margin-bottom: 18px; }
h1 { font-size: 22px; margin: 0; letter-spacing: -0.01em; }
h1 .brand { color: var(--accent); }
.sub { color: var(--muted); }
.banner { background: #fef3c7; border: 1px solid #fcd34d; border-radius: 8px; padding: 8px 12px; margin: 0 0 16px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; margin-bottom: 18px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em; }
.card .v { font-size: 22px; font-weight: 650; margin-top: 2px; font-variant-numeric: tabular-nums; }
.card .v .u { font-size: 14px; font-weight: 500; color: var(--muted); margin-left: 2px; }
.card .d { color: var(--muted); font-size: 12px; margin-top: 2px; }
.grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 16px; margin-bottom: 16px; }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px 8px; min-width: 0; }
.panel h2 { font-size: 15px; margin: 0 0 2px; }
.panel p.hint { color: var(--muted); margin: 0 0 6px; font-size: 12.5px; }
.chart { width: 100%; height: 330px; }
.heatmaps { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 12px; }
.heatmaps .chart { height: ${heatHeight}px; }
.heatmaps h3 { font-size: 13px; margin: 8px 0 0; color: var(--muted); font-weight: 600; text-align: center; }
.settings { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); column-gap: 20px; font-size: 13px; padding-bottom: 8px; }
.kv { display: flex; gap: 10px; padding: 5px 2px; border-bottom: 1px solid var(--line); min-width: 0; }
.kv .k { color: var(--muted); flex: 0 0 42%; }
.kv .v { font-variant-numeric: tabular-nums; overflow-wrap: anywhere; min-width: 0; }
.empty, .note { color: var(--muted); }
.error { background: #fee2e2; border: 1px solid #fca5a5; border-radius: 8px; padding: 8px 12px; }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 8px 0 20px; }
@media (max-width: 900px) { .grid, .heatmaps { grid-template-columns: 1fr; } }
</style>
</head>
<body>
<main>
<header><h1>${esc(h.title).replace(/^snella\b/, '<span class="brand">snella</span>')}</h1><span class="sub">${esc(sub)}</span></header>
${h.aborted ? '<p class="banner">Training was stopped early (interrupted); the charts show the steps and epochs that finished.</p>' : ''}
<p id="charts-error" class="error" hidden>The charts could not be drawn: the inlined ECharts script did not load.</p>
<section class="cards">${cardHtml}</section>
<section class="grid">
<div class="panel"><h2>Loss and learning rate</h2><p class="hint">Training cross-entropy per step (faint) and smoothed; learning rate on the right axis. Dashed lines: epoch starts.</p><div id="chart-loss" class="chart"></div></div>
<div class="panel"><h2>Top-1 accuracy per epoch</h2><p class="hint">Train top-1 is measured during the epoch; test top-1 after it.${testNote}</p><div id="chart-acc" class="chart"></div></div>
<div class="panel"><h2>Throughput and memory</h2><p class="hint">Training images per second per epoch${h.device === 'cpu' ? '; peak resident memory of the process (RSS) on the right axis' : '; peak GPU memory: n/a (not exposed by the CUDA backend)'}.</p><div id="chart-speed" class="chart"></div></div>
<div class="panel"><h2>Settings</h2><p class="hint">The run's options.</p><div class="settings">${settings}</div></div>
</section>
<section class="panel"><h2>Per-layer sparsity and allocator score, by round</h2>
<p class="hint">Each row is an adapted layer, each column an epoch: the allocator's decision at the start of that epoch. Left: sparsity (fraction of ΔW entries zeroed; darker = sparser). Right: the normalised importance score that drove it (sums to 1 over layers). Hover a cell for kept entries and score rank.</p>
${hasAlloc ? '<div class="heatmaps"><div><h3>sparsity</h3><div id="chart-sparsity" class="chart"></div></div><div><h3>allocator score</h3><div id="chart-score" class="chart"></div></div></div>' : noAlloc}
</section>
<footer>Generated by snella on ${esc(h.finishedAt.replace('T', ' ').replace(/\.\d+Z$/, ' UTC'))} · charts by Apache ECharts ${esc(version)} (inlined, works offline)</footer>
</main>
<script type="application/json" id="snella-data">${data}</script>
<script>${js}</script>
<script>${CLIENT_JS}</script>
</body>
</html>
`;
}
