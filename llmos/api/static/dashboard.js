// The llmos dashboard: plain JavaScript over llmos's own HTTP API, no build step.
// Reads /v1/trainer, /v1/metrics/history (or /v1/checkpoints), /v1/checkpoints and /v1/models;
// writes through POST /v1/admin/rollback, POST /v1/completions (streamed) and POST /v1/feedback.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "llmos.apiKey";
const ADMIN_STORE = "llmos.adminToken";
const live = [];          // [unix seconds, training loss] seen while this page is open
let lastLiveStep = null;
let chart = null;
let activeVersion = null;

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
  }
}

// fetch with the API key (if one was given) and llmos's error shape turned into an exception.
async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const key = sessionStorage.getItem(KEY_STORE);
  if (key && !headers.Authorization) headers.Authorization = "Bearer " + key;
  if (options.body && !headers["Content-Type"]) headers["Content-Type"] = "application/json";
  const res = await fetch(path, Object.assign({}, options, { headers }));
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail ?? detail; } catch (_) { /* not JSON */ }
    if (res.status === 401 && !path.startsWith("v1/admin/")) $("key-form").hidden = false;
    throw new ApiError(res.status, detail);
  }
  return options.raw ? res : res.json();
}

const fmt = (x, digits = 4) => (typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–");
const pad = (n) => String(n).padStart(2, "0");
const when = (iso) => {
  if (!iso) return "–";
  const d = new Date(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
};
const seconds = (iso) => (iso ? new Date(iso).getTime() / 1000 : null);

function text(el, value) { el.textContent = value; }

// ---- trainer and queue ----------------------------------------------------------------------
async function refreshTrainer() {
  const t = await api("v1/trainer");
  activeVersion = t.active_version;
  text($("active-version"), "v" + t.active_version);
  text($("trainer-state"), t.state);
  text($("trainer-step"), t.step);
  text($("queue-depth"), t.queue_depth);
  text($("train-loss"), fmt(t.last_loss));
  text($("prequential-loss"), fmt(t.prequential_loss));
  text($("device"), t.device);
  $("trainer-error").hidden = !t.last_error;
  text($("trainer-error"), t.last_error ? "trainer error: " + t.last_error : "");
  // Live points only for steps taken while the page is open (the first poll sets the baseline).
  if (typeof t.last_loss === "number" && lastLiveStep !== null && t.step !== lastLiveStep) {
    live.push([Date.now() / 1000, t.last_loss]);
    if (live.length > 2000) live.shift();
  }
  lastLiveStep = t.step;
}

// ---- loss curves --------------------------------------------------------------------------------
const SERIES = [
  { key: "train_loss", label: "train", stroke: "#2f6fde" },
  { key: "prequential_loss", label: "prequential", stroke: "#8a4fd8" },
  { key: "heldout_loss", label: "held-out", stroke: "#d9822b" },
  { key: "anchor_loss", label: "anchor", stroke: "#2a9d5c" },
];

async function history() {
  try {
    return (await api("v1/metrics/history?last=1000")).points;
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 404) throw e;
    // An llmos without the history endpoint: the live checkpoints carry the same metrics.
    const cps = (await api("v1/checkpoints")).checkpoints.slice().reverse();
    return cps.map((c) => Object.assign({ version: c.version, created_at: c.created_at }, c.metrics));
  }
}

// The y axis is logarithmic (a loss of 0 has no place on it): prequential loss on new text sits far
// above held-out and anchor loss, which a linear axis squashes into a line near zero.
const positive = (v) => typeof v === "number" && v > 0;

function chartData(points) {
  const rows = new Map(); // x -> [checkpoint values..., live]
  const n = SERIES.length + 1;
  const row = (x) => { if (!rows.has(x)) rows.set(x, new Array(n).fill(null)); return rows.get(x); };
  for (const p of points) {
    const x = seconds(p.created_at);
    if (x === null || p.version === 0) continue;
    SERIES.forEach((s, i) => { if (positive(p[s.key])) row(x)[i] = p[s.key]; });
  }
  for (const [x, loss] of live) if (positive(loss)) row(x)[SERIES.length] = loss;
  const xs = [...rows.keys()].sort((a, b) => a - b);
  const data = [xs];
  for (let i = 0; i < n; i++) data.push(xs.map((x) => rows.get(x)[i]));
  return data;
}

async function refreshChart() {
  const data = chartData(await history());
  if (!chart) {
    const el = $("chart");
    chart = new uPlot({
      width: Math.max(300, el.clientWidth),
      height: 300,
      scales: { x: { time: true }, y: { distr: 3, log: 10 } },
      series: [
        {},
        ...SERIES.map((s) => ({ label: s.label, stroke: s.stroke, width: 2, spanGaps: true, points: { show: true, size: 6 } })),
        { label: "train (live)", stroke: "#9db7e8", width: 1, spanGaps: true, points: { show: true, size: 3 } },
      ],
      axes: [{}, { label: "loss (log scale)" }],
    }, data, el);
    window.llmosChart = chart; // for tests and for poking at it from the console
    window.addEventListener("resize", () => chart.setSize({ width: Math.max(300, el.clientWidth), height: 300 }));
  } else {
    chart.setData(data);
  }
}

// ---- checkpoints and rollback ------------------------------------------------------------------
async function refreshCheckpoints() {
  const r = await api("v1/checkpoints");
  activeVersion = r.active_version;
  const body = $("checkpoints").querySelector("tbody");
  body.replaceChildren();
  // Every checkpoint still stored is listed: a parent that is not was pruned (its files are gone).
  const stored = new Set(r.checkpoints.map((c) => c.version));
  for (const c of r.checkpoints) {
    const tr = document.createElement("tr");
    tr.id = "checkpoint-v" + c.version;
    tr.dataset.version = c.version;
    if (c.version === r.active_version) tr.className = "active";
    const m = c.metrics || {};
    const cells = [
      "v" + c.version + (c.version === r.active_version ? " (active)" : ""),
      c.status + (c.corrupt ? " (corrupt)" : ""),
      null, // the parent, filled in below
      when(c.created_at), c.step, c.samples_seen,
      c.texts_batch + (c.texts_replay ? " + " + c.texts_replay + " replayed" : ""),
      fmt(m.heldout_loss), fmt(m.anchor_loss), fmt(m.train_loss), m.gate || "",
    ];
    cells.forEach((v, i) => {
      const td = document.createElement("td");
      td.textContent = v;
      if (i === 1) td.className = "status-" + c.status;
      if (i === 6) { td.className = "texts"; td.title = "GET /v1/admin/lineage/versions/" + c.version + " lists them"; }
      if (i === 10) { td.className = "gate"; td.title = v; }
      if (i === 2) parentCell(td, c.parent_version, stored);
      tr.appendChild(td);
    });
    const td = document.createElement("td");
    if (c.version !== r.active_version && c.status !== "rejected" && !c.corrupt) {
      const b = document.createElement("button");
      b.textContent = "Roll back";
      b.className = "rollback";
      b.addEventListener("click", () => askRollback(c.version));
      td.appendChild(b);
    }
    tr.appendChild(td);
    body.appendChild(tr);
  }
}

// A stored parent links to its row (where it can be rolled back to); a pruned one is only named.
function parentCell(td, parent, stored) {
  td.className = "parent";
  if (parent === null) {
    td.textContent = "–";
  } else if (stored.has(parent)) {
    const a = document.createElement("a");
    a.href = "#checkpoint-v" + parent;
    a.textContent = "v" + parent;
    td.appendChild(a);
  } else {
    td.textContent = "v" + parent + " (pruned)";
    td.classList.add("pruned");
    td.title = "pruned: its files are deleted, it cannot be rolled back to";
  }
}

function askRollback(version) {
  text($("rollback-version"), version);
  $("rollback-dialog").dataset.version = version;
  $("admin-token").value = sessionStorage.getItem(ADMIN_STORE) || "";
  $("rollback-requeue").checked = false;
  $("rollback-error").hidden = true;
  $("rollback-dialog").showModal();
  $("admin-token").focus();
}

async function doRollback(event) {
  event.preventDefault();
  const version = Number($("rollback-dialog").dataset.version);
  const token = $("admin-token").value.trim();
  if (!token) return;
  $("rollback-confirm").disabled = true;
  try {
    await api("v1/admin/rollback", {
      method: "POST",
      headers: { Authorization: "Bearer " + token },
      body: JSON.stringify({ version, requeue: $("rollback-requeue").checked }),
    });
    sessionStorage.setItem(ADMIN_STORE, token);
    $("rollback-dialog").close();
    await refreshAll();
  } catch (e) {
    $("rollback-error").hidden = false;
    text($("rollback-error"), "Rollback failed: " + e.message);
  } finally {
    $("rollback-confirm").disabled = false;
  }
}

// ---- try a prompt --------------------------------------------------------------------------------
async function refreshModels() {
  const models = (await api("v1/models")).data;
  const sel = $("try-model");
  const chosen = sel.value;
  sel.replaceChildren();
  for (const m of models) {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = m.id.includes("@") ? m.id : m.id + " (active version)";
    sel.appendChild(o);
  }
  if ([...sel.options].some((o) => o.value === chosen)) sel.value = chosen;
}

let lastGeneration = null;

async function tryPrompt(event) {
  event.preventDefault();
  const prompt = $("try-prompt").value;
  $("try-error").hidden = true;
  $("try-submit").disabled = true;
  text($("rate-result"), "");
  text($("try-echo"), prompt);
  text($("try-output"), "");
  text($("try-meta"), "");
  $("try-result").hidden = false;
  try {
    const res = await api("v1/completions", {
      method: "POST",
      raw: true,
      body: JSON.stringify({
        model: $("try-model").value,
        prompt,
        max_tokens: Number($("try-max-tokens").value) || 48,
        temperature: Number($("try-temperature").value) || 0,
        stream: true,
        stream_options: { include_usage: true },
      }),
    });
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "", out = "", id = null, model = null, finish = null, usage = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        id = chunk.id; model = chunk.model;
        if (chunk.usage) usage = chunk.usage;
        for (const c of chunk.choices || []) {
          out += c.text || "";
          if (c.finish_reason) finish = c.finish_reason;
        }
        text($("try-output"), out);
      }
    }
    lastGeneration = id;
    const u = usage ? `, ${usage.prompt_tokens} prompt + ${usage.completion_tokens} generated tokens` : "";
    text($("try-meta"), `${model}, finish: ${finish}${u}; generation id ${id}`);
  } catch (e) {
    $("try-error").hidden = false;
    text($("try-error"), "Generation failed: " + e.message);
  } finally {
    $("try-submit").disabled = false;
  }
}

async function rate(rating) {
  if (!lastGeneration) return;
  try {
    await api("v1/feedback", { method: "POST", body: JSON.stringify({ generation_id: lastGeneration, rating }) });
    text($("rate-result"), rating > 0 ? "thanks: it will be learned" : "noted");
  } catch (e) {
    text($("rate-result"), "feedback failed: " + e.message);
  }
}

// ---- wiring --------------------------------------------------------------------------------------
let busy = false;
async function refreshAll() {
  if (busy) return;
  busy = true;
  try {
    await refreshTrainer();
    await refreshCheckpoints();
    await refreshChart();
    await refreshModels();
    document.body.dataset.loaded = "true";
  } catch (e) {
    $("trainer-error").hidden = false;
    text($("trainer-error"), "Cannot read the server: " + e.message);
  } finally {
    busy = false;
  }
}

$("rollback-form").addEventListener("submit", doRollback);
$("rollback-cancel").addEventListener("click", () => $("rollback-dialog").close());
$("try-form").addEventListener("submit", tryPrompt);
$("rate-up").addEventListener("click", () => rate(1));
$("rate-down").addEventListener("click", () => rate(-1));
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
  $("key-form").hidden = true;
  refreshAll();
});

refreshAll();
setInterval(refreshAll, 3000);
