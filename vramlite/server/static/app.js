// vramlite playground: POST /generate and /fill_blank with server-sent events read through fetch (EventSource
// cannot POST), and an engine panel fed by GET /info and GET /stats. No dependencies, no build step.
"use strict";

const STATS_EVERY_MS = 2000;
const CHART_POINTS = 60;
const MAX_RETRY_S = 60;
const KEY_STORAGE = "vramlite.apiKey";
const SPAN = "<span>";
const SAMPLING_NUMBERS = ["temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "frequency_penalty",
                          "presence_penalty", "repetition_penalty", "seed"];

const $ = (id) => document.getElementById(id);

// --- talking to the server --------------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** The contract's error body `{"error": {"type", "message"}}` as an HttpError, or what the reply holds. */
async function errorOf(response) {
  const text = await response.text();
  try {
    const { error } = JSON.parse(text);
    if (error && error.type) return new HttpError(response.status, error.type, error.message);
  } catch (_) { /* not our error body: show the text */ }
  return new HttpError(response.status, "http_error", text.slice(0, 300) || response.statusText);
}

async function getJson(path) {
  const response = await fetch(path, { headers: headers(false), cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/** Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), within 1..MAX_RETRY_S. */
function retryAfterSeconds(response) {
  const value = response.headers.get("Retry-After") || "1";
  let s = /^\d+$/.test(value) ? Number(value) : (Date.parse(value) - Date.now()) / 1000;
  if (!Number.isFinite(s)) s = 1;
  return Math.min(MAX_RETRY_S, Math.max(1, Math.ceil(s)));
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("stopped", "AbortError"));
    }, { once: true });
  });
}

/**
 * POST `body` to `path` and return the 200 reply. A full queue (429) or a loading model (503 with Retry-After)
 * is retried after the server's Retry-After, saying so; any other error is thrown as an HttpError.
 */
async function post(path, body, signal) {
  for (;;) {
    const response = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
    if (response.ok) return response;
    const retry = response.status === 429 || (response.status === 503 && response.headers.has("Retry-After"));
    if (!retry) throw await errorOf(response);
    const err = await errorOf(response);
    const why = response.status === 429 ? "Server busy" : "Model loading";
    for (let s = retryAfterSeconds(response); s > 0; s--) {
      setStatus(`${why}, retrying in ${s} s (${err.type})`, "busy");
      await sleep(1000, signal);
    }
    setStatus("Sending…", "busy");
  }
}

/** One server-sent event block (`event:`/`data:` lines) as {event, data}; null for a comment-only block. */
function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: data.join("\n") } : null;
}

/** The JSON payloads of an SSE reply until `data: [DONE]`; an `event: error` is thrown as an HttpError. */
async function* sseJson(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new HttpError(0, "stream_ended", "the stream ended before [DONE]");
      buffer = (buffer + value).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const ev = parseEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (!ev) continue;
        if (ev.data === "[DONE]") return;
        const payload = JSON.parse(ev.data);
        // The reply began as a 200: an error after that has no status of its own.
        if (ev.event === "error") throw new HttpError(0, payload.error.type, payload.error.message);
        yield payload;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// --- the request form -------------------------------------------------------------------------------------

let mode = "generate";
let running = null; // the AbortController of the request in flight

function setStatus(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.dataset.kind = kind;
}

function showError(err) {
  const box = $("error");
  box.replaceChildren();
  const head = document.createElement("strong");
  head.textContent = err instanceof HttpError
    ? `${err.status ? `Error ${err.status}` : "Error"} · ${err.type}`
    : `Error · ${err.name || "network"}`;
  const message = document.createElement("span");
  message.textContent = err.message || String(err);
  box.append(head, message);
  box.hidden = false;
}

/** `\n`, `\t` and `\\` in a stop-string line, as in JSON. */
function unescape(line) {
  return line.replace(/\\([nt\\])/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
}

/** The sampling fields that are set (an empty one takes the model's default). */
function samplingFields() {
  const fields = {};
  for (const name of SAMPLING_NUMBERS) {
    const value = $(name).value.trim();
    if (value !== "") fields[name] = Number(value);
  }
  const stop = $("stop").value.split("\n").filter((line) => line !== "").map(unescape);
  if (stop.length) fields.stop = stop;
  return fields;
}

/** Structured output's fields of a generate request: the JSON schema (parsed here) and the regex, if given. */
function outputFields() {
  const fields = {};
  const schema = $("json_schema").value.trim();
  if (schema !== "") {
    try {
      fields.json_schema = JSON.parse(schema);
    } catch (err) {
      throw new SyntaxError(`the JSON schema is not JSON: ${err.message}`);
    }
  }
  const regex = $("regex").value;
  if (regex !== "") fields.regex = regex;
  return fields;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop-button").disabled = !busy;
  $("request").setAttribute("aria-busy", String(busy));
}

function selectTab(which, focus) {
  mode = which;
  for (const [name, tab] of [["generate", $("tab-generate")], ["fill", $("tab-fill")]]) {
    const selected = name === which;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !selected;
    if (selected && focus) tab.focus();
  }
  $("send").textContent = which === "generate" ? "Generate" : "Fill blanks";
}

function countBlanks() {
  const n = $("fill-prompt").value.split(SPAN).length - 1;
  $("blank-count").textContent = `${n} blank${n === 1 ? "" : "s"}`;
}

function insertBlank() {
  const area = $("fill-prompt");
  const { selectionStart: start, selectionEnd: end, value } = area;
  area.value = value.slice(0, start) + SPAN + value.slice(end);
  area.focus();
  area.setSelectionRange(start + SPAN.length, start + SPAN.length);
  countBlanks();
}

function rate(tokens, startedAt) {
  const s = (performance.now() - startedAt) / 1000;
  return s > 0 ? (tokens / s).toFixed(1) : "–";
}

async function runGenerate(signal) {
  const prompt = $("prompt").value;
  const out = $("output");
  const promptEl = document.createElement("span");
  promptEl.className = "prompt-echo";
  promptEl.textContent = prompt;
  const generated = document.createElement("span");
  generated.className = "generated";
  generated.id = "generated";
  out.replaceChildren(promptEl, generated);
  const probs = $("show-probs").checked;
  const body = { prompt, ...samplingFields(), ...outputFields(), stream: true,
    ...(probs ? { logprobs: TOP_TOKENS } : {}) };
  const response = await post("/generate", body, signal);
  const started = performance.now();
  setStatus("Generating…", "busy");
  let tokens = 0;
  for await (const chunk of sseJson(response)) {
    if (chunk.token) {
      generated.append(chunk.logprobs ? tokenSpan(chunk.logprobs) : chunk.token.text);
      tokens += 1;
      $("meter").textContent = `${tokens} tokens · ${rate(tokens, started)} tokens/s`;
    } else if (chunk.finish_reason) {
      // the final text (a stop string cut off): kept as token spans where they spell it
      if (!probs || generated.textContent !== chunk.text) generated.textContent = chunk.text;
      const u = chunk.usage;
      $("meter").textContent = `${u.prompt_tokens} prompt + ${u.completion_tokens} generated tokens · `
        + `${rate(u.completion_tokens, started)} tokens/s`;
      setStatus(`Done: ${chunk.finish_reason}.`, "done");
    }
  }
}

const TOP_TOKENS = 5;

/** A generated token as a span shaded by its probability, its alternatives in its title. */
function tokenSpan(lp) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = lp.text;
  const p = Math.exp(lp.logprob);
  span.style.setProperty("--p", p.toFixed(3));
  const top = lp.top.map((t) => `${JSON.stringify(t.text)} ${(100 * Math.exp(t.logprob)).toFixed(1)}%`);
  span.title = `${(100 * p).toFixed(1)}%\n${top.join("\n")}`;
  span.tabIndex = 0;
  return span;
}

/** The text with each blank as a numbered placeholder, filled in place as the blanks arrive. */
function renderBlanks(text) {
  const marks = [];
  const parts = text.split(SPAN);
  const nodes = [];
  parts.forEach((part, i) => {
    nodes.push(document.createTextNode(part));
    if (i < parts.length - 1) {
      const mark = document.createElement("mark");
      mark.className = "blank pending";
      mark.dataset.index = String(i);
      mark.title = `blank ${i + 1}`;
      mark.textContent = `[${i + 1}]`;
      marks.push(mark);
      nodes.push(mark);
    }
  });
  $("output").replaceChildren(...nodes);
  return marks;
}

function fillMark(mark, text) {
  mark.textContent = text;
  mark.className = "blank filled";
}

async function runFill(signal) {
  const prompt = $("fill-prompt").value;
  $("output").replaceChildren();
  const response = await post("/fill_blank", { prompt, ...samplingFields(), stream: true }, signal);
  const marks = renderBlanks(prompt);
  setStatus("Filling…", "busy");
  let filled = 0;
  for await (const chunk of sseJson(response)) {
    if (Array.isArray(chunk.blanks)) {
      chunk.blanks.forEach((blank) => marks[blank.index] && fillMark(marks[blank.index], blank.text));
      filled = chunk.blanks.length;
      setStatus(`Done: ${filled} blank${filled === 1 ? "" : "s"} filled.`, "done");
    } else if (marks[chunk.index]) {
      fillMark(marks[chunk.index], chunk.text);
      filled += 1;
      $("meter").textContent = `${filled} of ${marks.length} blanks`;
    }
  }
}

async function send() {
  if (running) return;
  running = new AbortController();
  setBusy(true);
  $("error").hidden = true;
  $("meter").textContent = "";
  setStatus("Sending…", "busy");
  try {
    await (mode === "generate" ? runGenerate : runFill)(running.signal);
  } catch (err) {
    if (err.name === "AbortError") {
      setStatus("Stopped.", "done");
    } else {
      setStatus("Failed.", "failed");
      showError(err);
    }
  } finally {
    running = null;
    setBusy(false);
  }
}

function stop() {
  if (running) running.abort();
}

// --- the engine panel -------------------------------------------------------------------------------------

function formatBytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log2(Math.abs(n)) / 10));
  return `${(n / 2 ** (10 * i)).toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fillList(dl, entries) {
  dl.replaceChildren();
  for (const [term, value] of entries) {
    if (value === undefined || value === null) continue;
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    dl.append(dt, dd);
  }
}

function renderPlan(offload) {
  const bar = $("plan-bar");
  const resident = new Set(offload ? offload.resident_layers : []);
  const streamed = new Set(offload ? offload.streamed_layers : []);
  const layers = [...resident, ...streamed].sort((a, b) => a - b);
  bar.replaceChildren(...layers.map((layer) => {
    const cell = document.createElement("span");
    cell.className = `layer ${resident.has(layer) ? "resident" : "streamed"}`;
    cell.title = `layer ${layer}: ${resident.has(layer) ? "resident" : "streamed"}`;
    return cell;
  }));
  const summary = `${layers.length} layers: ${resident.size} resident in VRAM, ${streamed.size} streamed`;
  bar.setAttribute("aria-label", offload ? summary : "no memory plan yet");
  $("plan-summary").textContent = offload ? summary + "." : "";
  const bytes = offload && offload.planned_bytes !== undefined ? [
    ["planned", `${formatBytes(offload.planned_bytes)} of ${formatBytes(offload.memory_limit_bytes)}`],
    ["resident layers", formatBytes(offload.resident_bytes)],
    ["KV cache", formatBytes(offload.kv_cache_bytes)],
    ["swap slots", `${offload.num_slots} × ${formatBytes(offload.slot_bytes)}`],
    ["workspace", formatBytes(offload.workspace_bytes)],
    ["streamed per step", formatBytes(offload.streamed_bytes_per_step)],
    ["host arena", `${formatBytes(offload.host_bytes)} (${formatBytes(offload.host_pinned_bytes)} pinned)`],
    ["host embedding", offload.host_embedding_bytes ? formatBytes(offload.host_embedding_bytes) : null],
  ] : [];
  fillList($("plan-bytes"), bytes);
}

function renderInfo(info) {
  const m = info.model;
  const device = info.device || "";
  const limit = info.memory_limit;
  const fill = info.fill_model;
  fillList($("facts"), [
    ["model", m.name],
    ["type", m.type && `${m.type}, ${m.layers} layers, vocabulary ${m.vocab_size}`],
    ["context", m.context && `${m.context} tokens`],
    ["fill model", fill && `${fill.name} (${fill.type || "loading"}, ${fill.state}, ${formatBytes(fill.memory_bytes)})`],
    ["device", info.device],
    ["dtype", info.dtype],
    ["quantization", info.quantization.active || "none"],
    ["memory limit", limit.requested ? `${limit.requested}${limit.active ? "" : " (inactive)"}` : "none"],
    ["batch / queue", `${info.limits.max_batch_size} / ${info.limits.max_queue}`],
    ["version", info.version],
  ]);
  renderPlan(info.offload);
  $("live-note").textContent = device.startsWith("cuda") ? "" : "(VRAM reads 0 off a GPU)";
}

/** A hand-drawn SVG line chart of the last CHART_POINTS samples of one or more series. */
class Chart {
  constructor(figure, series, format) {
    this.figure = figure;
    this.series = series; // [{name, className}]
    this.format = format;
    this.points = series.map(() => []);
    this.samples = 0;
    const ns = "http://www.w3.org/2000/svg";
    this.svg = document.createElementNS(ns, "svg");
    this.svg.setAttribute("viewBox", `0 0 ${CHART_POINTS - 1} 100`);
    this.svg.setAttribute("preserveAspectRatio", "none");
    this.svg.setAttribute("role", "img");
    this.lines = series.map((s) => {
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("class", s.className);
      line.setAttribute("vector-effect", "non-scaling-stroke");
      this.svg.append(line);
      return line;
    });
    this.scale = document.createElement("span");
    this.scale.className = "scale";
    figure.append(this.svg, this.scale);
  }

  add(values) {
    values.forEach((v, i) => {
      this.points[i].push(Number.isFinite(v) ? v : 0);
      if (this.points[i].length > CHART_POINTS) this.points[i].shift();
    });
    const peak = Math.max(...this.points.flat());
    const top = peak || 1;
    this.lines.forEach((line, i) => {
      const pts = this.points[i];
      const x0 = CHART_POINTS - pts.length;
      line.setAttribute("points", pts.map((v, j) => `${x0 + j},${(100 - (v / top) * 96).toFixed(2)}`).join(" "));
    });
    const text = values.map((v, i) => `${this.series[i].name} ${this.format(v)}`).join(", ");
    this.figure.querySelector(".value").textContent = text;
    this.scale.textContent = `max ${this.format(peak)}`;
    this.svg.setAttribute("aria-label", `${text}; the last ${this.points[0].length} samples`);
    this.samples += 1;
    this.figure.dataset.samples = String(this.samples);
  }
}

const charts = {};
let lastStats = null;
let infoState = null;
let statsTimer = null;

function perSecond(now, before, name) {
  if (!before) return 0;
  const dt = now.time - before.time;
  return dt > 0 ? Math.max(0, (now.metrics[name] - before.metrics[name]) / dt) : 0;
}

function showServerState(text, kind) {
  const pill = $("server-state");
  pill.textContent = text;
  pill.dataset.kind = kind;
}

async function refreshInfo() {
  try {
    const info = await getJson("/info");
    infoState = info.state;
    renderInfo(info);
    $("engine-error").hidden = true;
    return true;
  } catch (err) {
    const box = $("engine-error");
    box.textContent = err.status === 401
      ? "This server has an API key: enter it above to see the engine."
      : `Cannot read /info: ${err.message}`;
    box.hidden = false;
    showServerState(err.status === 401 ? "API key needed" : "unreachable", "failed");
    return err.status !== 401;
  }
}

async function refreshStats() {
  let stats;
  try {
    stats = await getJson("/stats");
  } catch (err) {
    if (err.status === 401) {
      await refreshInfo(); // says why; polling resumes when the key changes
      return false;
    }
    showServerState("unreachable", "failed");
    return true;
  }
  const m = stats.metrics;
  showServerState(stats.state, stats.state === "ready" ? "ok" : "busy");
  if (stats.state !== infoState) await refreshInfo();
  const vramTop = m.vram_limit_bytes || m.vram_total_bytes;
  charts.pcie.add([perSecond(stats, lastStats, "pcie_h2d_bytes_total") / 1e9]);
  charts.vram.add([m.vram_used_bytes, vramTop]);
  charts.tokens.add([perSecond(stats, lastStats, "generation_tokens_total")]);
  charts.queue.add([m.requests_running, m.requests_waiting]);
  lastStats = stats;
  return true;
}

let pollId = 0; // a newer poll (the key changed) ends the older one

async function pollStats() {
  const id = ++pollId;
  clearTimeout(statsTimer);
  const again = document.hidden || await refreshStats();
  if (again && id === pollId) statsTimer = setTimeout(pollStats, STATS_EVERY_MS);
}

function setupEngine() {
  const gbps = (v) => `${v.toFixed(2)} GB/s`;
  charts.pcie = new Chart($("chart-pcie"), [{ name: "", className: "s1" }], gbps);
  charts.vram = new Chart($("chart-vram"), [{ name: "used", className: "s1" }, { name: "limit", className: "s2" }],
                          formatBytes);
  charts.tokens = new Chart($("chart-tokens"), [{ name: "", className: "s1" }], (v) => v.toFixed(1));
  charts.queue = new Chart($("chart-queue"),
                           [{ name: "running", className: "s1" }, { name: "waiting", className: "s2" }],
                           (v) => String(Math.round(v)));
  refreshInfo().then((ok) => ok && pollStats());
}

// --- wiring -----------------------------------------------------------------------------------------------

function setup() {
  const key = $("api-key");
  key.value = apiKey();
  key.addEventListener("change", () => {
    if (key.value) sessionStorage.setItem(KEY_STORAGE, key.value);
    else sessionStorage.removeItem(KEY_STORAGE);
    lastStats = null;
    refreshInfo().then((ok) => ok && pollStats());
  });

  const form = $("request");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      if (!running) form.requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && running) stop();
  });
  $("stop-button").addEventListener("click", stop);
  $("insert-blank").addEventListener("click", insertBlank);
  $("fill-prompt").addEventListener("input", countBlanks);

  const tabs = [$("tab-generate"), $("tab-fill")];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(i === 0 ? "generate" : "fill", false));
    tab.addEventListener("keydown", (event) => {
      if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
      event.preventDefault();
      selectTab(i === 0 ? "fill" : "generate", true);
    });
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) pollStats();
  });
  countBlanks();
  setupEngine();
}

setup();
