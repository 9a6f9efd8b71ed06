// sage-llm's Local Engine panel: a plain client of the gateway's HTTP API (docs/gateway.md). No framework, no build.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid);
  return e;
};
const GiB = 1024 ** 3;
const fmtBytes = (b) => b == null ? "–" : b >= GiB ? `${(b / GiB).toFixed(2)} GB` :
  b >= 1024 ** 2 ? `${(b / 1024 ** 2).toFixed(1)} MB` : b >= 1024 ? `${(b / 1024).toFixed(1)} KB` : `${b} B`;
const fmtUptime = (s) => {
  if (s == null) return "–";
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h ${String(m).padStart(2, "0")}m` : m ? `${m}m ${String(r).padStart(2, "0")}s` : `${r}s`;
};

// A gateway started with --api-key-env wants `Authorization: Bearer KEY` on every call: the user types the key once;
// it stays in this tab's sessionStorage (never in a URL, never in a cookie).
const KEY_ITEM = "sage-llm-gateway-key";
const authHeaders = () => {
  const k = sessionStorage.getItem(KEY_ITEM);
  return k ? {"Authorization": `Bearer ${k}`} : {};
};
function needKey(message) {
  $("#key-box").classList.remove("hidden");
  $("#key-error").textContent = message || "";
}
$("#key-box").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("#key-input").value.trim());
  location.reload();
});

// Every call goes to the gateway itself; state changes are JSON (the gateway refuses anything else).
async function api(path, body) {
  const opts = body === undefined ? {headers: authHeaders()} : {method: "POST",
    headers: {"Content-Type": "application/json", ...authHeaders()}, body: JSON.stringify(body)};
  const r = await fetch(path, opts);
  if (r.status === 401) needKey(sessionStorage.getItem(KEY_ITEM) ? "wrong key" : "this gateway wants its API key");
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const msg = data && data.error ? data.error.message : `${r.status} ${r.statusText}`;
    const err = new Error(msg);
    err.status = r.status;
    throw err;
  }
  return data;
}

const state = {
  stages: [], labels: {}, status: null, cards: [], localReady: false, starting: null,
  series: {}, monitorAt: 0, logSource: null, logEngine: null, models: null, role: null,
};

// ------------------------------------------------------------------------------------------------ tabs
for (const b of document.querySelectorAll(".tab")) {
  b.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === b);
    for (const p of document.querySelectorAll(".panel")) p.classList.toggle("hidden", p.id !== `tab-${b.dataset.tab}`);
    if (b.dataset.tab === "monitor") { refreshMonitor(); drawCharts(); }
    if (b.dataset.tab === "models") refreshModels();
  });
}

// ------------------------------------------------------------------------------------------------ engines
function splitHint(message) {
  const m = /^(.*?)\s*\(hint: (.*)\)\s*$/s.exec(message || "");
  return m ? [m[1], m[2]] : [message || "", ""];
}

async function refreshStatus() {
  try {
    state.status = await api("/api/engines");
    renderEngines();
  } catch (e) {
    $("#status-text").textContent = `gateway not answering: ${e.message}`;
    $("#status").dataset.state = "failed";
  }
}

const pct = (p) => p != null ? ` ${Math.round(p * 100)}%` : "";

function renderEngines() {
  const doc = state.status;
  const engines = doc.engines.filter((v) => v.state !== "stopped");
  const box = $("#engine-cards");
  box.replaceChildren();
  for (const v of engines) {
    const gb = v.gpu_memory_usage != null ? `${v.gpu_memory_usage.toFixed(2)} GB` : "–";
    const loading = v.state !== "ready" && v.stage;
    const card = el("div", {class: "card engine-card", "data-engine": v.name, "data-state": v.state},
      el("h3", {}, el("span", {text: v.name}), el("span", {class: `badge ${v.state}`, text: v.state}),
        v.external ? el("span", {class: "badge", text: "external"}) : null),
      el("dl", {},
        el("dt", {text: "Model"}), el("dd", {text: v.served_model_name || v.model || "–"}),
        el("dt", {text: "Port"}), el("dd", {text: v.port ?? "–"}),
        el("dt", {text: "Node"}), el("dd", {class: "node", text: v.node || "this machine"}),
        el("dt", {text: "GPU memory"}), el("dd", {text: gb}),
        el("dt", {text: "Context"}), el("dd", {class: "context", text: v.max_model_len != null ?
          `${v.max_model_len.toLocaleString("en-US")} tokens` : "–"}),
        el("dt", {text: "Uptime"}), el("dd", {class: "uptime", text: fmtUptime(v.uptime_s)}),
        loading ? el("dt", {text: "Stage"}) : null,
        loading ? el("dd", {text: label(v.stage) + pct(v.progress)}) : null,
        v.error ? el("dt", {text: "Error"}) : null, v.error ? el("dd", {text: v.error}) : null),
      v.external ? el("p", {class: "muted small", text: "started outside sage-llm: not stopped from here"})
        : !["ready", "unhealthy", "sleeping"].includes(v.state) ?
          el("p", {class: "muted small", text: v.state === "failed" ? "not running" : "stop is offered once loaded"})
        : el("button", {class: "danger stop-btn", type: "button", text: "Stop",
          onclick: (ev) => stopEngine(v, ev.target)}));
    box.append(card);
  }
  for (const c of doc.loading) {
    if (engines.some((v) => v.model === c.model)) continue;
    box.append(el("div", {class: "card engine-card", "data-state": "loading", "data-model": c.model},
      el("h3", {}, el("span", {text: c.model}), el("span", {class: "badge loading", text: "loading"})),
      el("p", {class: "small", text: label(c.stage || "launching") + pct(c.progress)})));
  }
  if (!box.children.length) box.append(el("p", {class: "muted", text: "no engine running"}));
  const local = doc.local_engine || {};
  const ready = engines.filter((v) => v.state === "ready");
  state.localReady = ready.length > 0;
  const st = $("#status");
  if (state.localReady) {
    st.dataset.state = "ready";
    const pick = ready.find((v) => v.port === local.port) || ready[0];
    $("#status-text").textContent = `local engine running: ${pick.served_model_name || pick.model} (port ${pick.port})`;
  } else if (doc.loading.length || engines.some((v) => v.state === "starting")) {
    st.dataset.state = "loading";
    $("#status-text").textContent = "local engine starting…";
  } else {
    st.dataset.state = "idle";
    $("#status-text").textContent = "local engine not started";
  }
  renderSource();
  renderLogEngines(engines);
}

async function stopEngine(v, button) {
  button.disabled = true;
  button.classList.add("loading");
  try {
    await api("/api/local-engine/stop", {name: v.name});
  } catch (e) {
    alert(`stop failed: ${e.message}`);
  } finally {
    refreshStatus();
  }
}

// The start form: recommended models (with the fit `models recommend` computes) and the cached ones.
async function refreshStartModels() {
  const doc = await api("/api/models");
  state.models = doc;
  const sel = $("#start-model");
  const keep = sel.value;
  sel.replaceChildren();
  const rec = doc.recommended || [];
  const seed = [["Qwen/Qwen2.5-7B-Instruct", "recommended"], ["Qwen/Qwen2.5-1.5B-Instruct", "low VRAM"]];
  const g1 = el("optgroup", {label: "Recommended"});
  for (const [id, tag] of seed) {
    const r = rec.find((x) => x.repo_id === id) || {};
    const cached = doc.models.find((m) => m.repo_id === id);
    g1.append(el("option", {value: id, "data-quant": r.quantization || "", "data-fit": r.fit || "",
      text: `${id} (${tag})${cached ? "" : " · download"}${r.fit ? ` · ${r.fit}` : ""}`}));
  }
  sel.append(g1);
  const g2 = el("optgroup", {label: "Downloaded"});
  for (const m of doc.models.filter((m) => m.complete)) {
    g2.append(el("option", {value: m.repo_id, "data-quant": m.quantization || "",
      text: `${m.repo_id} · ${fmtBytes(m.size_on_disk)}${m.quantization ? ` · ${m.quantization}` : ""}`}));
  }
  if (g2.children.length) sel.append(g2);
  if (keep && [...sel.options].some((o) => o.value === keep)) sel.value = keep;
  else if (g2.children.length) sel.value = g2.children[0].value;
  modelChanged();
}

function modelChanged() {
  const o = $("#start-model").selectedOptions[0];
  $("#start-quant").textContent = o && o.dataset.quant ? `${o.dataset.quant} (from the model's config)` : "none";
  const rec = state.models && (state.models.recommended || []).find((r) => o && r.repo_id === o.value);
  $("#model-note").textContent = rec ? `${rec.note || ""} needs ~${rec.min_gpu_memory_gib} GiB GPU memory: ${rec.fit}` : "";
}
$("#start-model").addEventListener("change", modelChanged);
function utilChanged() {
  const u = Number($("#gpu-util").value);
  $("#gpu-util-out").textContent = u.toFixed(2);
  const g = state.frame && state.frame.gpus[0];  // vLLM's share of each GPU it uses: what that is in GB here
  $("#gpu-util-gb").textContent = g && g.memory_total_bytes ?
    `(${(u * g.memory_total_bytes / GiB).toFixed(1)} of ${(g.memory_total_bytes / GiB).toFixed(0)} GB on GPU ${g.index})` : "";
}
$("#gpu-util").addEventListener("input", utilChanged);

$("#start-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const model = $("#start-model").value;
  const body = {model, gpu_memory_utilization: Number($("#gpu-util").value)};
  const port = $("#start-port").value.trim();
  if (port) body.port = Number(port);
  const quant = $("#start-model").selectedOptions[0]?.dataset.quant;
  if (quant) body.quantization = quant;
  const btn = $("#start-btn");
  btn.disabled = true;
  btn.classList.add("loading");
  btn.textContent = "Starting";
  $("#start-error").classList.add("hidden");
  showProgress(model, {stage: "launching", progress: null});
  state.starting = {model, t0: Date.now(), seen: ["launching"]};
  try {
    const r = await api("/api/local-engine/start", body);
    if (r.state === "ready") startDone(model);
  } catch (e) {
    startFailed(model, e.message);
  }
  refreshStatus();
});

function label(stage) { return state.labels[stage] || stage; }

function showProgress(model, ev) {
  $("#start-progress").classList.remove("hidden");
  $("#progress-model").textContent = model;
  $("#progress-verb").textContent = ev.stage === "ready" ? "Started" : "Starting";
  const stage = ev.stage || "launching";
  $("#start-progress").dataset.stage = stage;
  $("#progress-stage").textContent = label(stage);
  $("#progress-pct").textContent = ev.progress != null && stage !== "ready" ? `${Math.round(ev.progress * 100)}%` : "";
  $("#progress-bar").style.width = `${Math.round((ev.progress ?? (stage === "ready" ? 1 : 0)) * 100)}%`;
  $("#progress-detail").textContent = ev.detail || "";
  if (ev.elapsed_s != null) $("#progress-time").textContent = `${ev.elapsed_s.toFixed(1)} s`;
  const seen = state.starting ? state.starting.seen : [];
  if (!seen.includes(stage)) seen.push(stage);
  const ol = $("#progress-stages");
  ol.replaceChildren();
  const idx = state.stages.indexOf(stage);
  state.stages.forEach((s, i) => {
    if (s === "downloading" && !seen.includes(s)) return;
    // green: stages this load went through (as the events reported them); grey: not (yet) seen
    const cls = s === stage ? (stage === "ready" ? "done" : "current") : seen.includes(s) && i < idx ? "done" : "";
    ol.append(el("li", {class: cls, "data-stage": s, text: label(s)}));
  });
}

function resetStartButton() {
  const btn = $("#start-btn");
  btn.disabled = false;
  btn.classList.remove("loading");
  btn.textContent = "Start";
}

function startDone(model) {
  showProgress(model, {stage: "ready", progress: 1});
  $("#progress-time").textContent = state.starting ? `${((Date.now() - state.starting.t0) / 1000).toFixed(1)} s` : "";
  state.starting = null;
  resetStartButton();
}

function startFailed(model, message) {
  const [msg, hint] = splitHint(message);
  $("#start-error").classList.remove("hidden");
  $("#start-error-text").textContent = msg;
  $("#start-error-hint").textContent = hint ? `Next step: ${hint}` : "";
  $("#start-progress").classList.add("hidden");
  state.starting = null;
  resetStartButton();
}

// ------------------------------------------------------------------------------------------------ events
// Server-Sent Events read with fetch (EventSource cannot send an Authorization header). handlers: {kind: fn(data)};
// onEnd(error) once the stream ends. Returns {close()}.
function sse(url, handlers, onEnd) {
  const ctrl = new AbortController();
  (async () => {
    let error = null;
    try {
      const r = await fetch(url, {headers: authHeaders(), signal: ctrl.signal});
      if (r.status === 401) needKey("this gateway wants its API key");
      if (!r.ok) throw new Error(`${r.status}`);
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "", kind = "message", data = [];
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += dec.decode(value, {stream: true});
        let i;
        while ((i = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, i).replace(/\r$/, "");
          buf = buf.slice(i + 1);
          if (line === "") {
            if (data.length && handlers[kind]) handlers[kind](JSON.parse(data.join("\n")));
            kind = "message"; data = [];
          } else if (line.startsWith("event:")) kind = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        }
      }
    } catch (e) {
      error = e;
    }
    if (!ctrl.signal.aborted && onEnd) onEnd(error);
  })();
  return {close: () => ctrl.abort()};
}

function connectEvents() {
  const handlers = {};
  const handle = (kind) => (ev) => {
    const mine = state.starting && ev.model === state.starting.model;
    if (kind === "loading" && mine) showProgress(ev.model, ev);
    if (kind === "loading") scheduleRefresh(false);  // the loading card follows the stages too
    else if (kind === "ready" && mine) startDone(ev.model);
    else if (kind === "failed" && mine) startFailed(ev.model, ev.error);
    if (kind === "pull") renderPull(ev);
    if (["ready", "failed", "stopped", "adopted", "removed", "state"].includes(kind) ||
        (kind === "pull" && ev.state !== "downloading")) {
      scheduleRefresh(kind === "pull" || kind === "removed");
    }
  };
  for (const k of ["state", "loading", "ready", "failed", "stopping", "stopped", "sleeping", "waking", "adopted",
    "pull", "removed"]) handlers[k] = handle(k);
  sse("/api/events", handlers, () => {  // the gateway restarted or went away: try again shortly
    $("#status-text").textContent = "reconnecting to the gateway…";
    setTimeout(() => { connectEvents(); refreshStatus(); }, 2000);
  });
}
let refreshTimer = null;
function scheduleRefresh(models) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => { refreshStatus(); if (models) { refreshModels(); refreshStartModels(); } }, 150);
}

// ------------------------------------------------------------------------------------------------ chat
function renderSource() {
  const local = $("#source-local");
  local.disabled = !state.localReady;
  if (local.disabled && local.checked) document.querySelector('input[name=source][value=auto]').checked = true;
  $("#local-tag").classList.toggle("hidden", !state.localReady);
  $("#local-hint").classList.toggle("hidden", state.localReady);
}

const history = [];
$("#chat-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("#chat-input").value.trim();
  if (!text) return;
  $("#chat-input").value = "";
  const source = document.querySelector("input[name=source]:checked").value;
  history.push({role: "user", content: text});
  $("#messages").append(el("div", {class: "msg user", text}));
  const out = el("div", {class: "msg assistant"});
  const body = el("span", {class: "content"});
  const meta = el("span", {class: "meta", text: "…"});
  out.append(body, meta);
  $("#messages").append(out);
  $("#chat-send").disabled = true;
  const t0 = performance.now();
  let first = null, pieces = 0, usage = null, answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST",
      headers: {"Content-Type": "application/json", ...authHeaders()},
      body: JSON.stringify({model: source, stream: true, stream_options: {include_usage: true}, messages: history})});
    const src = r.headers.get("x-sage-llm-source"), eng = r.headers.get("x-sage-llm-engine");
    out.dataset.source = src || "";
    out.dataset.engine = eng || "";
    if (!r.ok) {
      let msg = `${r.status}`;
      try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now();
          pieces += 1;
          answer += delta.content;
          body.textContent = answer;
          $("#messages").scrollTop = $("#messages").scrollHeight;
        }
      }
    }
    const end = performance.now();
    const tokens = usage && usage.completion_tokens ? usage.completion_tokens : pieces;
    const ttft = first === null ? null : (first - t0) / 1000;
    const tps = first !== null && end > first && tokens > 1 ? (tokens - 1) / ((end - first) / 1000) : null;
    const line = `${src || "?"} · ${eng || "?"} · TTFT ${ttft == null ? "–" : ttft.toFixed(2) + " s"} · ` +
      `${tps == null ? "–" : tps.toFixed(1)} tokens/s · ${tokens} tokens`;
    meta.textContent = line;
    out.dataset.done = "1";
    $("#chat-meta").textContent = `last answer: ${line}`;
    history.push({role: "assistant", content: answer});
  } catch (e) {
    out.classList.add("error");
    meta.textContent = e.message;
    out.dataset.done = "error";
    history.pop();
  } finally {
    $("#chat-send").disabled = false;
  }
});
$("#chat-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("#chat-form").requestSubmit(); }
});

// ------------------------------------------------------------------------------------------------ monitor
const WINDOW_S = 300;
function push(key, t, v) {
  if (v == null || Number.isNaN(v)) return;
  const s = state.series[key] || (state.series[key] = []);
  s.push([t, v]);
  while (s.length && s[0][0] < t - WINDOW_S) s.shift();
}

async function refreshMonitor() {
  let f;
  try { f = await api("/api/monitor"); } catch (e) { $("#gpu-error").textContent = `monitor: ${e.message}`; return; }
  const t = f.at;
  if (!state.monitorAt) {  // first frame: seed the charts with the history the gateway kept
    for (const g of f.gpus) for (const [dt, v] of g.memory_history) push(`gpu${g.index}.mem`, t + dt, v / GiB);
    for (const e of f.engines) for (const [dt, v] of e.generation_history) push(`${e.key}.gen`, t + dt, v);
  } else {
    for (const g of f.gpus) if (g.memory_used_bytes != null) push(`gpu${g.index}.mem`, t, g.memory_used_bytes / GiB);
    for (const e of f.engines) push(`${e.key}.gen`, t, e.generation_tps);
  }
  for (const g of f.gpus) push(`gpu${g.index}.util`, t, g.utilization_percent);
  for (const e of f.engines) {
    push(`${e.key}.running`, t, e.running);
    push(`${e.key}.waiting`, t, e.waiting);
    push(`${e.key}.kv`, t, e.kv_cache_usage != null ? e.kv_cache_usage * 100 : null);
  }
  state.monitorAt = t;
  state.frame = f;
  utilChanged();
  $("#gpu-error").textContent = f.gpu_error ? `GPU: ${f.gpu_error}` : "";
  if (!$("#tab-monitor").classList.contains("hidden")) drawCharts();
}

function chartBox(container, id, title) {
  let box = container.querySelector(`[data-chart="${id}"]`);
  if (!box) {
    box = el("div", {class: "chart", "data-chart": id}, el("h4", {text: title}), el("span", {class: "now"}),
      el("canvas", {width: 340, height: 110}));
    container.append(box);
  }
  return box;
}

// A line chart of one or more series over the last WINDOW_S seconds (oldest left), on a plain <canvas>.
function drawChart(box, lines, now, unit, top) {
  const c = box.querySelector("canvas");
  const ctx = c.getContext("2d");
  const W = c.width, H = c.height, pad = 18;
  ctx.clearRect(0, 0, W, H);
  ctx.strokeStyle = "#d9dde3";
  ctx.strokeRect(0.5, 0.5, W - 1, H - 1);
  let peak = 0, oldest = now;
  for (const l of lines) for (const [t, v] of l.points) { peak = Math.max(peak, v); oldest = Math.min(oldest, t); }
  let max = Math.max(top || 0, peak);
  const span = Math.min(WINDOW_S, Math.max(60, now - oldest));  // the last minutes, or since the page opened
  if (max <= 0) max = 1;
  ctx.fillStyle = "#6b7480";
  ctx.font = "10px system-ui";
  ctx.fillText(`${+max.toFixed(2)} ${unit}`, 4, 11);
  ctx.fillText(span >= 120 ? `-${Math.round(span / 60)} min` : `-${Math.round(span)} s`, 4, H - 4);
  let count = 0;
  for (const l of lines) {
    ctx.strokeStyle = l.color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    l.points.forEach(([t, v], i) => {
      const x = W - ((now - t) / span) * W;
      const y = H - 4 - (v / max) * (H - pad);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
    count += l.points.length;
  }
  box.dataset.points = String(count);
  box.dataset.peak = String(peak);
  box.querySelector(".now").textContent = lines.map((l) => {
    const last = l.points[l.points.length - 1];
    return `${l.name}: ${last ? +last[1].toFixed(2) : "–"}${unit && last ? ` ${unit}` : ""}`;
  }).join(" · ");
}

function drawCharts() {
  const f = state.frame;
  if (!f) return;
  const now = state.monitorAt;
  const gbox = $("#gpu-charts");
  for (const g of f.gpus) {
    const total = g.memory_total_bytes ? g.memory_total_bytes / GiB : null;
    drawChart(chartBox(gbox, `gpu${g.index}-mem`, `GPU ${g.index} ${g.name || ""}: memory (GB)`),
      [{name: "used", color: "#2463eb", points: state.series[`gpu${g.index}.mem`] || []}], now, "GB", total);
    drawChart(chartBox(gbox, `gpu${g.index}-util`, `GPU ${g.index}: utilisation (%)`),
      [{name: "util", color: "#17923d", points: state.series[`gpu${g.index}.util`] || []}], now, "%", 100);
  }
  const ebox = $("#engine-charts");
  const serving = f.engines.filter((e) => e.port);
  for (const ch of [...ebox.children]) {
    if (!ch.dataset.chart || !serving.some((e) => ch.dataset.chart.startsWith(`${e.key}-`))) ch.remove();
  }
  if (!serving.length && !ebox.children.length) ebox.append(el("p", {class: "muted", text: "no engine serving"}));
  for (const e of serving) {
    const name = `${e.name} (${e.model || "?"})`;
    drawChart(chartBox(ebox, `${e.key}-gen`, `${name}: generation tokens/s`),
      [{name: "tok/s", color: "#2463eb", points: state.series[`${e.key}.gen`] || []}], now, "tok/s");
    drawChart(chartBox(ebox, `${e.key}-req`, `${name}: requests`),
      [{name: "running", color: "#17923d", points: state.series[`${e.key}.running`] || []},
        {name: "waiting", color: "#c98a00", points: state.series[`${e.key}.waiting`] || []}], now, "");
    drawChart(chartBox(ebox, `${e.key}-kv`, `${name}: KV cache used (%)`),
      [{name: "KV", color: "#8e44ad", points: state.series[`${e.key}.kv`] || []}], now, "%", 100);
  }
}

// ------------------------------------------------------------------------------------------------ logs
function renderLogEngines(engines) {
  const sel = $("#log-engine");
  const names = engines.filter((v) => v.managed && v.name).map((v) => v.name);
  const cur = sel.value;
  if ([...sel.options].map((o) => o.value).join() !== names.join()) {
    sel.replaceChildren(...names.map((n) => el("option", {value: n, text: n})));
    if (names.includes(cur)) sel.value = cur;
  }
  if (sel.value !== state.logEngine) openLog();
}

function openLog() {
  const name = $("#log-engine").value;
  if (state.logSource) { state.logSource.close(); state.logSource = null; }
  state.logEngine = name || null;
  const pre = $("#log");
  pre.textContent = "";
  if (!name || state.role === "user") return;  // engine logs are for admin keys
  const add = (text) => {
    pre.append(text + "\n");
    while (pre.childNodes.length > 2000) pre.firstChild.remove();
    pre.scrollTop = pre.scrollHeight;
  };
  if ($("#log-follow").checked) {
    state.logSource = sse(`/api/engines/${encodeURIComponent(name)}/logs?follow=1&n=200`, {
      line: (d) => add(d.text), notice: (d) => add(`-- ${d.text}`), end: (d) => add(`-- ${d.text}`),
    }, (err) => { if (err) add(`-- log stream: ${err.message}`); });
  } else {
    api(`/api/engines/${encodeURIComponent(name)}/logs?n=200`).then((d) => d.lines.forEach(add), (e) => add(e.message));
  }
}
$("#log-engine").addEventListener("change", openLog);
$("#log-follow").addEventListener("change", openLog);

// ------------------------------------------------------------------------------------------------ models
async function refreshModels() {
  let doc;
  try { doc = await api("/api/models"); } catch (e) { $("#models-error").textContent = e.message; return; }
  const tb = $("#models-table tbody");
  tb.replaceChildren();
  for (const m of doc.models) {
    const served = m.engines || [];
    tb.append(el("tr", {"data-model": m.repo_id},
      el("td", {text: m.repo_id + (m.complete ? "" : " (incomplete)")}),
      el("td", {text: fmtBytes(m.size_on_disk)}),
      el("td", {text: m.quantization || "–"}),
      el("td", {text: served.join(", ") || "–"}),
      el("td", {}, el("button", {type: "button", class: "danger rm-btn", text: "Remove",
        onclick: (ev) => removeModel(m.repo_id, ev.target)}))));
  }
  if (!doc.models.length) tb.append(el("tr", {}, el("td", {colspan: 5, class: "muted", text: "no models downloaded"})));
  const rb = $("#recommended-table tbody");
  rb.replaceChildren();
  const have = new Set(doc.models.map((m) => m.repo_id));
  for (const r of doc.recommended || []) {
    rb.append(el("tr", {"data-model": r.repo_id},
      el("td", {text: r.repo_id}), el("td", {text: r.tag || ""}),
      el("td", {text: `${r.weights_gib} GiB`}), el("td", {text: `${r.min_gpu_memory_gib} GiB`}),
      el("td", {class: "fit", text: r.fit || ""}),
      el("td", {}, have.has(r.repo_id) ? el("span", {class: "muted small", text: "downloaded"}) :
        el("button", {type: "button", class: "pull-btn", text: "Pull", onclick: () => pullModel(r.repo_id)}))));
  }
  $("#gpu-fit-note").textContent = doc.gpu_error ? `fit: ${doc.gpu_error}` : "";
  for (const p of doc.pulls || []) renderPull(p);
}

async function removeModel(id, button) {
  $("#models-error").textContent = "";
  if (!confirm(`Remove ${id} from the cache?`)) return;
  button.disabled = true;
  try {
    await api("/api/models/remove", {model: id});
  } catch (e) {
    $("#models-error").textContent = e.message;
  }
  button.disabled = false;
  refreshModels();
  refreshStartModels();
}

function renderPull(p) {
  let row = document.querySelector(`.pull[data-model="${CSS.escape(p.model)}"]`);
  if (!row) {
    row = el("div", {class: "pull", "data-model": p.model}, el("span", {class: "what"}),
      el("div", {class: "bar"}, el("div")));
    $("#pulls").append(row);
  }
  row.dataset.state = p.state;
  const pct = p.total ? Math.min(100, (p.bytes / p.total) * 100) : null;
  row.querySelector(".bar > div").style.width = `${p.state === "done" ? 100 : pct ?? 0}%`;
  row.querySelector(".what").textContent = p.state === "failed" ? `${p.model}: failed: ${p.error}` :
    `${p.model}: ${p.state} ${fmtBytes(p.bytes)}${p.total ? ` of ${fmtBytes(p.total)}` : ""}` +
    (pct != null && p.state === "downloading" ? ` (${pct.toFixed(0)}%)` : "");
}

$("#pull-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  pullModel($("#pull-model").value.trim());
});

async function pullModel(model) {
  try {
    renderPull(await api("/api/models/pull", {model}));
  } catch (e) {
    renderPull({model, state: "failed", error: e.message, bytes: 0});
  }
}

// ------------------------------------------------------------------------------------------------ boot
// A shared gateway (keys per person) says which key this page uses: a `user` key sees no start, stop, pull,
// remove or logs (the gateway refuses them anyway: 403).
async function learnRole() {
  try {
    const you = ((await api("/api/gateway")).access || {}).you;
    state.role = you ? you.role : null;
    document.body.classList.toggle("role-user", state.role === "user");
    if (you) $("#status").title = `key ${you.name} (${you.role})`;
  } catch (e) { /* an older gateway, or no key yet: everything shown, the gateway decides */ }
}

(async function boot() {
  await learnRole();
  try {
    const s = await api("/api/stages");
    state.stages = s.stages.map((x) => x.name);
    for (const x of s.stages) state.labels[x.name] = x.label;
  } catch (e) { /* labels fall back to stage names */ }
  connectEvents();
  await refreshStatus();
  refreshStartModels().catch((e) => { $("#model-note").textContent = e.message; });
  refreshMonitor();
  setInterval(refreshStatus, 3000);
  setInterval(refreshMonitor, 2000);
})();
