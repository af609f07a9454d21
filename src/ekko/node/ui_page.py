"""The dashboard page a node serves at ``/ui``: HTML, CSS and JS in one string, drawing SVG
itself (the machines it runs on may have no internet, so nothing is fetched but the node's
own ``/v1/ui/series``)."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Ekko node</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2330; }
header { background: #1d2330; color: #fff; padding: 10px 18px; display: flex; gap: 22px;
         align-items: baseline; flex-wrap: wrap; }
header h1 { font-size: 18px; margin: 0; }
header .k { color: #9aa4b5; margin-right: 4px; }
main { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 14px;
       padding: 14px; }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 10px 12px; }
section h2 { font-size: 14px; margin: 0 0 6px; }
table { border-collapse: collapse; width: 100%; }
td, th { text-align: right; padding: 2px 8px; border-bottom: 1px solid #eef0f3; }
td:first-child, th:first-child { text-align: left; }
svg { width: 100%; height: 190px; }
svg text { font-size: 11px; fill: #5b6577; }
.legend span { display: inline-block; margin-right: 12px; font-size: 12px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
.state-healthy { color: #1a7f37; } .state-uncertain { color: #9a6700; }
.state-corrupted, .state-recovering { color: #cf222e; font-weight: bold; }
#error { color: #cf222e; padding: 0 18px; }
</style></head>
<body data-samples="0">
<header><h1>Ekko</h1>
<div><span class="k">node</span><b id="node">…</b></div>
<div><span class="k">role</span><span id="role">…</span></div>
<div><span class="k">DC</span><span id="dc">…</span></div>
<div><span class="k">upstream</span><span id="upstream">…</span></div>
<div><span class="k">updated</span><span id="updated">…</span></div></header>
<div id="error"></div>
<main>
<section><h2>Update latency per DC (write at the source → applied; last second, ms)</h2>
<svg id="chart-latency"></svg><div class="legend" id="legend-latency"></div></section>
<section><h2>Bytes per link (per second)</h2>
<svg id="chart-bytes"></svg><div class="legend" id="legend-bytes"></div></section>
<section><h2>Lane shares of the rows written (source scheduler)</h2>
<svg id="chart-lanes"></svg><div class="legend" id="legend-lanes"></div></section>
<section><h2>Lag behind the source (versions)</h2>
<svg id="chart-lag"></svg><div class="legend" id="legend-lag"></div></section>
<section><h2>Tables</h2><table id="tables"><thead><tr><th>table</th><th>rows</th>
<th>lag versions</th><th>lag s</th></tr></thead><tbody></tbody></table></section>
<section><h2>Guard</h2><ul id="guard"></ul><h2>Incidents</h2><ul id="incidents"></ul></section>
</main>
<script>
"use strict";
const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bc4c00", "#1b7c83"];
const NS = "http://www.w3.org/2000/svg";
let samples = [];
let intervalS = 1;

function el(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  const a = Math.abs(x);
  if (a >= 1e9) return (x / 1e9).toFixed(1) + "G";
  if (a >= 1e6) return (x / 1e6).toFixed(1) + "M";
  if (a >= 1e3) return (x / 1e3).toFixed(1) + "k";
  return a >= 10 || a === 0 ? x.toFixed(0) : x.toFixed(2);
}
// series: {name: [[t, y], ...]}; draws lines with a y axis from 0 to the max.
function chart(id, series, empty) {
  const svg = document.getElementById(id);
  const legend = document.getElementById("legend-" + id.slice(6));
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  legend.textContent = "";
  const W = svg.clientWidth || 600, H = svg.clientHeight || 190, L = 46, B = 18;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const names = Object.keys(series).filter((n) => series[n].length);
  if (!names.length) {
    svg.appendChild(el("text", {x: L, y: H / 2}, empty || "no data yet"));
    return;
  }
  let t0 = Infinity, t1 = -Infinity, ymax = 0;
  for (const n of names) for (const [t, y] of series[n]) {
    t0 = Math.min(t0, t); t1 = Math.max(t1, t);
    if (y !== null) ymax = Math.max(ymax, y);
  }
  if (ymax <= 0) ymax = 1;
  if (t1 <= t0) t1 = t0 + 1;
  const X = (t) => L + (W - L - 6) * (t - t0) / (t1 - t0);
  const Y = (y) => 6 + (H - B - 6) * (1 - y / ymax);
  for (const f of [0, 0.5, 1]) {
    svg.appendChild(el("line", {x1: L, x2: W - 6, y1: Y(ymax * f), y2: Y(ymax * f),
                                stroke: "#eef0f3"}));
    svg.appendChild(el("text", {x: 2, y: Y(ymax * f) + 4}, fmt(ymax * f)));
  }
  svg.appendChild(el("text", {x: L, y: H - 3}, `${Math.round(t1 - t0)} s`));
  names.forEach((n, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = series[n].filter(([, y]) => y !== null)
      .map(([t, y]) => `${X(t).toFixed(1)},${Y(y).toFixed(1)}`).join(" ");
    svg.appendChild(el("polyline", {points: pts, fill: "none", stroke: color,
                                    "stroke-width": 1.6, "data-series": n}));
    const lastY = series[n].filter(([, y]) => y !== null).slice(-1)[0];
    const s = document.createElement("span");
    s.dataset.series = n;
    const swatch = document.createElement("i");
    swatch.style.background = color;
    const value = document.createElement("b");
    value.textContent = fmt(lastY ? lastY[1] : null);
    s.append(swatch, `${n}: `, value);  // names as text: a DC or link name is never markup
    legend.appendChild(s);
  });
}
function collect(pick) {
  const out = {};
  for (const s of samples) {
    const got = pick(s) || {};
    for (const k in got) (out[k] = out[k] || []).push([s.t, got[k]]);
  }
  return out;
}
function text(id, v) { document.getElementById(id).textContent = v === null ? "—" : v; }
function render(doc) {
  const now = doc.now;
  text("node", now.node); text("role", now.role); text("dc", now.dc);
  text("upstream", now.upstream); text("updated", new Date().toLocaleTimeString());
  document.title = `Ekko · ${now.node}`;
  const body = document.querySelector("#tables tbody");
  body.textContent = "";
  for (const [name, rows] of Object.entries(now.tables)) {
    const lag = (now.lag || {})[name] || {};
    const tr = document.createElement("tr");
    tr.dataset.table = name;
    for (const [cls, v] of [["name", name], ["rows", rows], ["lag-versions", lag.versions],
                            ["lag-seconds", lag.seconds]]) {
      const td = document.createElement("td");
      td.className = cls;
      td.textContent = v === undefined ? "—" : String(v);
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  const guard = document.getElementById("guard"), inc = document.getElementById("incidents");
  guard.textContent = ""; inc.textContent = "";
  for (const [model, g] of Object.entries(now.guard)) {
    const li = document.createElement("li");
    li.dataset.model = model; li.dataset.state = g.state;
    const state = document.createElement("b");
    state.className = `state-${g.state}`;
    state.textContent = g.state;
    li.append(`${model}: `, state);
    guard.appendChild(li);
    for (const i of g.incidents || []) {
      const e = document.createElement("li");
      e.dataset.model = model;
      e.textContent = `${new Date(i.at * 1000).toLocaleTimeString()} ${model}: ` +
        `${i.automatic ? "automatic" : "operator"} rollback (${i.why})`;
      inc.appendChild(e);
    }
  }
  if (!guard.childNodes.length) guard.innerHTML = "<li>guard off</li>";
  if (!inc.childNodes.length) inc.innerHTML = "<li>none</li>";
  const quantiles = (s) => {
    const out = {};
    for (const [dc, v] of Object.entries(s.latency)) {
      out[dc + " p50"] = v.p50_ms;
      out[dc + " p99"] = v.p99_ms;
    }
    return out;
  };
  chart("chart-latency", collect(quantiles));
  chart("chart-bytes", collect((s) => s.bytes_per_s));
  const source = now.role === "source";
  chart("chart-lanes", collect((s) => {
    if (!s.lanes) return {};
    const total = Object.values(s.lanes).reduce((a, b) => a + b, 0);
    return total ? Object.fromEntries(Object.entries(s.lanes).map(([k, v]) => [k, v / total])) : {};
  }), source ? "no rows written yet, or [scheduler] enabled = false"
             : "the scheduler's lanes are on the source's page");
  chart("chart-lag", collect((s) => s.lag ? {versions: s.lag.versions} : {}),
        source ? "the source is the origin of versions: no lag" : "no answer from the source yet");
  document.body.dataset.samples = String(samples.length);
}
async function poll() {
  try {
    const since = samples.length ? samples[samples.length - 1].t : 0;
    const r = await fetch(`/v1/ui/series?since=${since}`, {cache: "no-store"});
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const doc = await r.json();
    intervalS = doc.interval_s || 1;
    samples = samples.concat(doc.samples).slice(-600);
    render(doc);
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = `cannot read the node: ${e}`;
  }
  setTimeout(poll, intervalS * 1000);
}
poll();
</script></body></html>
"""
