/**
 * The browser-side script of the report page (plain ES2017, no backticks so it can live in a
 * string): reads the JSON data block and draws the charts with the inlined ECharts. Sets
 * `document.body.dataset.rendered` to the number of charts drawn when done.
 * @module
 */

/** @internal */
export const CLIENT_JS = String.raw`(function () {
  'use strict';
  var D = JSON.parse(document.getElementById('snella-data').textContent);
  var body = document.body;
  if (typeof echarts === 'undefined') {
    body.dataset.rendered = 'error';
    document.getElementById('charts-error').hidden = false;
    return;
  }
  var C = {
    loss: '#4f46e5', lossRaw: 'rgba(79,70,229,0.28)', lr: '#f59e0b', train: '#0ea5e9', test: '#16a34a',
    speed: '#818cf8', mem: '#e11d48', axis: '#64748b', grid: '#e2e8f0', text: '#0f172a'
  };
  var FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Liberation Sans", sans-serif';
  var charts = [];
  var epochs = D.epochs, steps = D.steps;

  function pct(x, d) { return x === null || x === undefined ? 'n/a' : (x * 100).toFixed(d === undefined ? 1 : d) + '%'; }
  function sci(x) { return x === 0 ? '0' : Math.abs(x) >= 0.01 && Math.abs(x) < 1000 ? String(+x.toPrecision(3)) : x.toExponential(1); }
  function mib(b) { return b / 1048576; }
  function num(x) { return x.toLocaleString('en-US'); }
  function short(name) {
    var m = /^blocks\.(\d+)\.(?:attn|mlp)\.(\w+)$/.exec(name);
    return m ? 'block ' + m[1] + ' · ' + m[2] : name;
  }
  function axisStyle(o) {
    o.axisLine = { lineStyle: { color: C.grid } };
    o.axisTick = { show: false };
    o.axisLabel = Object.assign({ color: C.axis }, o.axisLabel || {});
    o.nameTextStyle = { color: C.axis, padding: o.namePad || 0 };
    delete o.namePad;
    o.splitLine = o.splitLine || { lineStyle: { color: C.grid } };
    return o;
  }
  function draw(id, option) {
    var el = document.getElementById(id);
    if (!el) return;
    var chart = echarts.init(el, null, { renderer: 'svg' });
    option.textStyle = { fontFamily: FONT };
    option.animationDuration = 500;
    option.aria = { enabled: true };
    chart.setOption(option);
    charts.push(chart);
  }
  var legend = { top: 0, left: 'center', icon: 'roundRect', itemWidth: 14, itemHeight: 4, textStyle: { color: C.axis } };
  var tip = { trigger: 'axis', backgroundColor: 'rgba(15,23,42,0.92)', borderWidth: 0, textStyle: { color: '#f8fafc', fontSize: 12 } };

  // 1. loss and learning rate per step
  if (steps.length) {
    var ema = [], e = null, k = Math.min(0.5, 4 / Math.max(1, steps.length / Math.max(1, epochs.length)));
    steps.forEach(function (s) { e = e === null ? s.loss : e + k * (s.loss - e); ema.push([s.step, e]); });
    var starts = [];
    epochs.forEach(function (ep) {
      var first = steps.filter(function (s) { return s.epoch === ep.epoch; })[0];
      if (first && ep.epoch > 0 && epochs.length <= 60) starts.push({ xAxis: first.step - 0.5 });
    });
    draw('chart-loss', {
      legend: legend, tooltip: Object.assign({}, tip, { valueFormatter: function (v) { return typeof v === 'number' ? sci(v) : v; } }),
      grid: { left: 56, right: 64, top: 40, bottom: 44 },
      xAxis: axisStyle({ type: 'value', name: 'step', nameLocation: 'middle', namePad: [14, 0, 0, 0], min: 1, max: steps[steps.length - 1].step, splitLine: { show: false }, minInterval: 1 }),
      yAxis: [
        axisStyle({ type: 'value', name: 'loss (nats)', scale: true, axisLabel: { formatter: function (v) { return +v.toFixed(3); } } }),
        axisStyle({ type: 'value', name: 'learning rate', splitLine: { show: false }, axisLabel: { formatter: sci } })
      ],
      series: [
        { name: 'loss (per step)', type: 'line', data: steps.map(function (s) { return [s.step, s.loss]; }), showSymbol: steps.length <= 40, symbolSize: 4, lineStyle: { width: 1, color: C.lossRaw }, itemStyle: { color: C.lossRaw }, z: 1,
          markLine: starts.length ? { silent: true, symbol: 'none', label: { show: false }, lineStyle: { color: '#cbd5e1', type: 'dashed', width: 1 }, data: starts } : undefined },
        { name: 'loss (smoothed)', type: 'line', data: ema, showSymbol: false, smooth: 0.3, lineStyle: { width: 2.5, color: C.loss }, itemStyle: { color: C.loss }, z: 3 },
        { name: 'learning rate', type: 'line', yAxisIndex: 1, data: steps.map(function (s) { return [s.step, s.lr]; }), showSymbol: false, lineStyle: { width: 2, type: [6, 4], color: C.lr }, itemStyle: { color: C.lr }, z: 2 }
      ]
    });
  }

  var epochLabels = epochs.map(function (ep) { return String(ep.epoch + 1); });
  // 2. train and test top-1 per epoch
  if (epochs.length) {
    var hasTest = epochs.some(function (ep) { return ep.testTop1 !== undefined; });
    var series = [{ name: 'train top-1', type: 'line', data: epochs.map(function (ep) { return +(ep.trainTop1 * 100).toFixed(2); }), symbol: 'circle', symbolSize: 7, lineStyle: { width: 2.5, color: C.train }, itemStyle: { color: C.train } }];
    if (hasTest) series.push({ name: 'test top-1', type: 'line', data: epochs.map(function (ep) { return ep.testTop1 === undefined ? null : +(ep.testTop1 * 100).toFixed(2); }), symbol: 'circle', symbolSize: 7, lineStyle: { width: 2.5, color: C.test }, itemStyle: { color: C.test }, connectNulls: true,
      areaStyle: { color: new echarts.graphic.LinearGradient(0, 0, 0, 1, [{ offset: 0, color: 'rgba(22,163,74,0.18)' }, { offset: 1, color: 'rgba(22,163,74,0)' }]) } });
    draw('chart-acc', {
      legend: legend, tooltip: Object.assign({}, tip, { valueFormatter: function (v) { return v === null || v === undefined ? 'n/a' : v.toFixed(1) + '%'; } }),
      grid: { left: 56, right: 24, top: 40, bottom: 44 },
      xAxis: axisStyle({ type: 'category', name: 'epoch', nameLocation: 'middle', namePad: [14, 0, 0, 0], data: epochLabels, boundaryGap: epochs.length < 3, splitLine: { show: false } }),
      yAxis: axisStyle({ type: 'value', name: 'top-1 (%)', min: 0, max: 100 }),
      series: series
    });
  }

  // 3. throughput and peak memory per epoch
  if (epochs.length) {
    var cpu = D.device === 'cpu';
    var ys = [axisStyle({ type: 'value', name: 'images / s', axisLabel: { formatter: function (v) { return +v.toFixed(1); } } })];
    var ss = [{ name: 'images / s', type: 'bar', data: epochs.map(function (ep) { return +ep.imagesPerSecond.toFixed(2); }), barMaxWidth: 36, itemStyle: { color: C.speed, borderRadius: [4, 4, 0, 0] } }];
    if (cpu) {
      ys.push(axisStyle({ type: 'value', name: 'peak RSS (MiB)', splitLine: { show: false }, axisLabel: { formatter: function (v) { return Math.round(v); } } }));
      ss.push({ name: 'peak RSS (MiB)', type: 'line', yAxisIndex: 1, data: epochs.map(function (ep) { return +mib(ep.peakRssBytes).toFixed(1); }), symbol: 'circle', symbolSize: 6, lineStyle: { width: 2, color: C.mem }, itemStyle: { color: C.mem } });
    }
    draw('chart-speed', {
      legend: legend, tooltip: tip,
      grid: { left: 56, right: cpu ? 64 : 24, top: 40, bottom: 44 },
      xAxis: axisStyle({ type: 'category', name: 'epoch', nameLocation: 'middle', namePad: [14, 0, 0, 0], data: epochLabels, splitLine: { show: false } }),
      yAxis: ys, series: ss
    });
  }

  // 4 and 5. per-layer sparsity and allocator score by round
  var rounds = D.allocator, layers = D.layers;
  if (rounds.length && layers.length) {
    var rl = rounds.map(function (r) { return String(r.round + 1); });
    var names = layers.map(function (l) { return short(l.name); });
    var perBlock = 0;
    while (perBlock < layers.length && /^blocks\.0\./.test(layers[perBlock].name)) perBlock++;
    var ranks = rounds.map(function (r) {
      var o = r.scores.map(function (s, i) { return i; }).sort(function (a, b) { return r.scores[b] - r.scores[a]; });
      var rk = []; o.forEach(function (i, p) { rk[i] = p + 1; }); return rk;
    });
    function cell(x, y) {
      var r = rounds[x], l = layers[y], s = r.sparsities[y];
      var kept = l.entries - Math.floor(s * l.entries);
      return '<b>' + l.name + '</b><br>epoch ' + (r.round + 1) + ' (allocator round ' + r.round + ')<br>' +
        'sparsity <b>' + pct(s) + '</b> · kept ' + num(kept) + ' of ' + num(l.entries) + '<br>' +
        'score <b>' + r.scores[y].toFixed(4) + '</b> (rank ' + ranks[x][y] + ' of ' + layers.length + ')';
    }
    // log: colour by log10 over the top three decades (scores are skewed: one layer can hold most of it)
    function heat(id, key, label, colors, fmt, log) {
      var data = [], lo = Infinity, hi = -Infinity;
      rounds.forEach(function (r) { r[key].forEach(function (v) { lo = Math.min(lo, v); hi = Math.max(hi, v); }); });
      var floor = log && hi > 0 ? hi / 1000 : 0;
      var tf = function (v) { return log ? (hi > 0 ? Math.log10(Math.max(v, floor)) : 0) : v; };
      rounds.forEach(function (r, x) { r[key].forEach(function (v, y) { data.push([x, y, tf(v), v]); }); });
      var vlo = log ? tf(floor) : lo, vhi = tf(hi);
      if (!(vhi > vlo)) { vhi = vlo + (vlo === 0 ? 1 : Math.abs(vlo) * 0.01); }
      draw(id, {
        tooltip: { backgroundColor: 'rgba(15,23,42,0.92)', borderWidth: 0, textStyle: { color: '#f8fafc', fontSize: 12 }, formatter: function (p) { return cell(p.data[0], p.data[1]); } },
        grid: { left: 92, right: 16, top: 56, bottom: 44 },
        xAxis: axisStyle({ type: 'category', name: 'epoch (allocator round)', nameLocation: 'middle', namePad: [14, 0, 0, 0], data: rl, splitLine: { show: false }, axisLabel: { interval: rl.length > 24 ? 'auto' : 0 } }),
        yAxis: axisStyle({ type: 'category', data: names, inverse: true, axisLabel: { fontSize: 10, interval: names.length > 96 ? 'auto' : 0 },
          splitLine: { show: perBlock > 1, interval: function (i) { return perBlock > 1 && i % perBlock === perBlock - 1; }, lineStyle: { color: '#ffffff', width: 3 } } }),
        visualMap: { type: 'continuous', dimension: 2, min: vlo, max: vhi, calculable: false, orient: 'horizontal', left: 'center', top: 0, itemWidth: 12, itemHeight: 180,
          text: [fmt(hi), (log && lo < floor ? '≤ ' : '') + fmt(log ? floor : lo) + (log ? '  (log scale)' : '')], textStyle: { color: C.axis }, inRange: { color: colors } },
        series: [{ name: label, type: 'heatmap', data: data, itemStyle: { borderColor: '#ffffff', borderWidth: rl.length > 60 ? 0 : 1 }, emphasis: { itemStyle: { borderColor: '#0f172a', borderWidth: 1.5 } }, progressive: 0 }]
      });
    }
    heat('chart-sparsity', 'sparsities', 'sparsity', ['#f0f9ff', '#bae6fd', '#38bdf8', '#0369a1', '#0c2d48'], function (v) { return pct(v); }, false);
    heat('chart-score', 'scores', 'score', ['#fffbeb', '#fde68a', '#f59e0b', '#c2410c', '#7c2d12'], function (v) { return v >= 0.01 ? v.toFixed(3) : v.toExponential(1); }, true);
  }

  window.addEventListener('resize', function () { charts.forEach(function (c) { c.resize(); }); });
  body.dataset.rendered = String(charts.length);
})();
`;
