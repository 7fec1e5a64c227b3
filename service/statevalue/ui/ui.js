// The debug page: sends groups to the public HTTP API (explain: true) and colours each
// response token by its value or advantage. No framework, no build step, nothing remote.
"use strict";

const METHODS = ["numca", "hista", "group_mean"];
const $ = (id) => document.getElementById(id);
// What is on screen: the request as sent (rewards live there) and the server's answer.
let shown = null;

// -- talking to the API (relative URLs: the page is served at <server>/ui/) -------------

function headers() {
  const out = { "content-type": "application/json" };
  const token = $("api-token").value.trim();
  if (token) out.authorization = `Bearer ${token}`;
  return out;
}

function errorText(status, body) {
  const detail = body && body.detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
  }
  if (detail && typeof detail === "object") {
    return (detail.field ? `${detail.field}: ` : "") + detail.message;
  }
  return `HTTP ${status}`;
}

async function api(path, options = {}) {
  const response = await fetch(`../${path}`, { ...options, headers: headers() });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(`${response.status}: ${errorText(response.status, body)}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadModel() {
  try {
    const model = await api("v1/model");
    $("model").textContent =
      `model: ${model.name} · version ${model.version} · revision ${model.revision}`;
  } catch (error) {
    $("model").textContent = `model: ${error.message}`;
  }
}

// -- input: JSON, JSON lines of groups, or prompt and responses as text ----------------

function parseRequest(text) {
  const trimmed = text.trim();
  if (!trimmed) throw new Error("paste a request first");
  let parsed;
  try {
    parsed = JSON.parse(trimmed);
  } catch (error) {
    // JSON lines, one group per line (the CLI's input format).
    parsed = { groups: trimmed.split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l)) };
  }
  if (parsed && Array.isArray(parsed.rollouts)) parsed = { groups: [parsed] };
  if (!parsed || !Array.isArray(parsed.groups)) throw new Error("no \"groups\" in the request");
  return parsed;
}

async function run() {
  let request;
  try {
    request = parseRequest($("request").value);
  } catch (error) {
    setStatus(error.message, true);
    return;
  }
  setStatus("estimating…");
  const started = performance.now();
  try {
    const body = JSON.stringify({ ...request, explain: true });
    const response = await api("v1/estimate", { method: "POST", body });
    show(request, response);
    setStatus(`done in ${((performance.now() - started) / 1000).toFixed(2)} s`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

function addResponseRow(text = "", reward = "") {
  const row = document.createElement("div");
  row.className = "response-row";
  const area = document.createElement("textarea");
  area.rows = 2;
  area.placeholder = "response text";
  area.value = text;
  const score = document.createElement("input");
  score.type = "text";
  score.placeholder = "reward";
  score.title = "reward (leave empty for a query rollout)";
  score.value = reward;
  row.append(area, score);
  $("responses").append(row);
}

function requestFromText() {
  const prompt = $("prompt-text").value;
  const rollouts = [...document.querySelectorAll(".response-row")]
    .map((row) => {
      const [area, score] = row.children;
      const rollout = { response_text: area.value };
      if (score.value.trim() !== "") rollout.reward = Number(score.value);
      return rollout;
    })
    .filter((r) => r.response_text !== "");
  const group = { group_id: "text", rollouts };
  if ($("use-chat").checked) group.messages = [{ role: "user", content: prompt }];
  else group.prompt_text = prompt;
  const request = { methods: METHODS, groups: [group] };
  const params = $("text-params").value.trim();
  if (params) request.params = JSON.parse(params);
  return request;
}

// -- history kept by the server (--debug-history N) ------------------------------------

async function refreshHistory() {
  try {
    const items = await api("v1/debug/history");
    const select = $("history");
    select.replaceChildren(
      ...items.map((item) => {
        const option = document.createElement("option");
        option.value = item.id;
        const when = new Date(item.time * 1000).toLocaleTimeString();
        option.textContent = `#${item.id} · ${when} · ${item.groups} group(s), ` +
          `${item.rollouts} rollout(s) · ${item.methods.join(", ")}`;
        return option;
      }),
    );
    setStatus(`${items.length} kept request(s)`);
  } catch (error) {
    setStatus(error.status === 404 ? "the server keeps no history (--debug-history N)" :
      error.message, true);
  }
}

async function loadHistoryEntry() {
  const id = $("history").value;
  if (!id) return;
  try {
    const entry = await api(`v1/debug/history/${encodeURIComponent(id)}`);
    $("request").value = JSON.stringify(entry.request, null, 2);
    show(entry.request, entry.response);
    setStatus(`request #${entry.id}`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

// -- colours ---------------------------------------------------------------------------

// Sequential (values): yellow-green-blue. Diverging (advantages): red, white, blue.
const SEQUENTIAL = [[255, 247, 214], [161, 218, 180], [65, 182, 196], [44, 127, 184], [37, 52, 148]];
const DIVERGING = [[178, 24, 43], [239, 138, 98], [247, 247, 247], [103, 169, 207], [33, 102, 172]];

function interpolate(stops, x) {
  const at = Math.min(Math.max(x, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(at), stops.length - 2);
  const f = at - i;
  return stops[i].map((c, k) => Math.round(c + f * (stops[i + 1][k] - c)));
}

function colourScale(colourBy, arrays) {
  const all = arrays.flat();
  if (colourBy === "advantage") {
    const span = Math.max(1e-9, ...all.map(Math.abs));
    return { stops: DIVERGING, lo: -span, hi: span, at: (v) => interpolate(DIVERGING, (v / span + 1) / 2) };
  }
  let lo = Math.min(...all);
  let hi = Math.max(...all);
  if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
  return { stops: SEQUENTIAL, lo, hi, at: (v) => interpolate(SEQUENTIAL, (v - lo) / (hi - lo)) };
}

function paint(element, rgb) {
  element.style.backgroundColor = `rgb(${rgb.join(",")})`;
  const luminance = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255;
  element.style.color = luminance < 0.5 ? "white" : "";
}

function renderLegend(scale, colourBy, method) {
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.style.background = `linear-gradient(to right, ${scale.stops.map((c) => `rgb(${c})`).join(",")})`;
  const lo = document.createElement("span");
  lo.textContent = scale.lo.toFixed(3);
  const hi = document.createElement("span");
  hi.textContent = scale.hi.toFixed(3);
  const what = document.createElement("span");
  what.textContent = `${method} ${colourBy}`;
  $("legend").replaceChildren(what, lo, bar, hi);
}

// -- rendering -------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

// V(t) as a step line; segment boundaries dashed; the reward as a dot after the end.
function plot(values, boundaries, reward, lo, hi) {
  const width = 720, height = 70, left = 38, right = 14, top = 6, bottom = 6;
  const n = Math.max(values.length, 1);
  const x = (t) => left + (t / n) * (width - left - right);
  const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (height - top - bottom);
  const chart = svg("svg", { class: "plot", viewBox: `0 0 ${width} ${height}`, role: "img" });
  chart.append(svg("title", {}, "V(t)"));
  if (lo < 0 && hi > 0) chart.append(svg("line", { class: "zero", x1: left, x2: width - right, y1: y(0), y2: y(0) }));
  for (const b of boundaries) {
    if (b > 0) chart.append(svg("line", { class: "boundary", x1: x(b), x2: x(b), y1: top, y2: height - bottom }));
  }
  const points = values.flatMap((v, t) => [`${x(t)},${y(v)}`, `${x(t + 1)},${y(v)}`]);
  chart.append(svg("polyline", { class: "curve", points: points.join(" ") }));
  if (reward !== undefined && reward !== null) {
    chart.append(svg("circle", { cx: width - right / 2, cy: y(reward), r: 3, fill: "#b3261e" }, undefined));
  }
  chart.append(svg("text", { x: 2, y: top + 8 }, hi.toFixed(2)));
  chart.append(svg("text", { x: 2, y: height - bottom }, lo.toFixed(2)));
  return chart;
}

function currentChoice(name) {
  return document.querySelector(`input[name=${name}]:checked`).value;
}

function show(request, response) {
  shown = { request, response };
  const present = new Set(Object.keys(response.groups[0]?.rollouts[0]?.values || {}));
  for (const input of document.querySelectorAll("input[name=method]")) {
    input.disabled = !present.has(input.value);
  }
  const checked = document.querySelector("input[name=method]:checked");
  if (checked.disabled) {
    const first = [...document.querySelectorAll("input[name=method]")].find((i) => !i.disabled);
    if (first) first.checked = true;
  }
  render();
}

function render() {
  if (!shown) return;
  const { request, response } = shown;
  const method = currentChoice("method");
  const colourBy = currentChoice("colour");
  const field = colourBy === "value" ? "values" : "advantages";
  const rollouts = response.groups.flatMap((g) => g.rollouts);
  const scale = colourScale(colourBy, rollouts.map((r) => r[field][method] || []));
  renderLegend(scale, colourBy, method);
  const rewards = request.groups.map((g) => g.rollouts.map((r) => r.reward));
  const valueRange = colourScale("value", [
    ...rollouts.map((r) => r.values[method] || []), rewards.flat().filter((r) => r !== undefined && r !== null),
  ]);

  const answered = document.createElement("div");
  answered.className = "answered";
  const m = response.model;
  answered.textContent = `answered by ${m.name} · version ${m.version} · revision ${m.revision}`;
  const out = [answered];
  response.groups.forEach((group, g) => {
    const box = document.createElement("div");
    box.className = "group";
    const title = document.createElement("h2");
    title.textContent = `group ${group.group_id}`;
    box.append(title);
    const chosen = group.self_calibration?.[method];
    if (chosen) {
      // What self-calibration chose for the shown method (docs/design.md, "Self-calibration").
      const note = document.createElement("div");
      note.className = "answered";
      const settings = Object.values(chosen.params)
        .map((fields) => Object.entries(fields).map(([k, v]) => `${k}=${v}`).join(", "))
        .join("; ");
      const blend = Object.entries(chosen.weights)
        .map(([name, w]) => `${w.toFixed(2)}·${name}`).join(" + ");
      note.textContent = `self-calibrated per ${chosen.scope}: ${settings || "group mean"}; ` +
        `blend ${blend}; own reward weight ${chosen.own_weight.toFixed(2)}; leave-one-out ` +
        `error ${chosen.criterion.toFixed(4)} (group mean ${chosen.group_mean_criterion.toFixed(4)}, ` +
        `${chosen.candidates} candidates)`;
      box.append(note);
    }
    group.rollouts.forEach((rollout, r) => {
      const reward = rewards[g]?.[r];
      const item = document.createElement("div");
      item.className = "rollout";
      const heading = document.createElement("h3");
      heading.textContent = `rollout ${r} · ` +
        (reward === undefined || reward === null ? "query (no reward)" : `reward ${reward}`);
      const values = rollout.values[method];
      const boundaries = new Set(rollout.boundaries[method]);
      const tokens = document.createElement("div");
      tokens.className = "tokens";
      const texts = rollout.explanation?.tokens;
      values.forEach((value, t) => {
        const span = document.createElement("span");
        span.className = "token";
        span.id = `tok-${g}-${r}-${t}`;
        span.dataset.g = g;
        span.dataset.r = r;
        span.dataset.t = t;
        span.dataset.value = value;
        span.dataset.advantage = rollout.advantages[method][t];
        const text = texts ? texts[t] : `[${t}]`;
        if (text === "") span.classList.add("empty");
        else span.textContent = text;
        if (boundaries.has(t)) span.classList.add("boundary");
        paint(span, scale.at(rollout[field][method][t]));
        tokens.append(span);
      });
      item.append(heading, plot(values, rollout.boundaries[method], reward, valueRange.lo, valueRange.hi), tokens);
      box.append(item);
    });
    out.push(box);
  });
  $("results").replaceChildren(...out);
}

// -- hover: what the token's value comes from ------------------------------------------

function segmentIndex(boundaries, t) {
  let k = 0;
  while (k + 1 < boundaries.length && boundaries[k + 1] <= t) k += 1;
  return k;
}

function line(label, text) {
  const div = document.createElement("div");
  const strong = document.createElement("strong");
  strong.textContent = `${label} `;
  div.append(strong, text);
  return div;
}

function numberSet(numbers) {
  return numbers.length ? `{${numbers.join(", ")}}` : "∅ (no number yet)";
}

function tokenText(g, r, t) {
  const texts = shown.response.groups[g].rollouts[r].explanation?.tokens;
  if (!texts) return "";
  return t < texts.length ? JSON.stringify(texts[t]) : "(after the last token)";
}

function explain(g, r, t, method) {
  const rollout = shown.response.groups[g].rollouts[r];
  const ex = rollout.explanation || {};
  const boundaries = rollout.boundaries[method];
  const k = segmentIndex(boundaries, t);
  const parts = [line("segment", `${k} (from token ${boundaries[k]})`)];
  if (method === "numca" && ex.numca_states) {
    parts.push(line("state", numberSet(ex.numca_states[k])));
    if (ex.numca_final_state && k === boundaries.length - 1) {
      parts.push(line("after the last token", numberSet(ex.numca_final_state)));
    }
  } else if (method === "hista" && ex.hista_nodes) {
    const node = ex.hista_nodes.find((n) => n.token === boundaries[k]);
    if (node) parts.push(neighbourTable(g, node));
    else if (k === 0) parts.push(line("before the first node:", "the group's mean reward"));
    else parts.push(line("end node:", "the rollout's own reward"));
  } else if (method === "group_mean") {
    parts.push(line("every token:", "the group's mean reward"));
  }
  return parts;
}

const SHOWN_NEIGHBOURS = 10;

function neighbourTable(g, node) {
  const box = document.createElement("div");
  const rewards = shown.request.groups[g].rollouts.map((r) => r.reward);
  box.append(line(`node at token ${node.token}:`,
    `value = Σ weight × reward over ${node.neighbours.length} neighbour(s)`));
  const table = document.createElement("table");
  const head = table.insertRow();
  for (const name of ["rollout", "token", "text", "weight", "distance", "reward"]) {
    const th = document.createElement("th");
    th.textContent = name;
    head.append(th);
  }
  for (const n of node.neighbours.slice(0, SHOWN_NEIGHBOURS)) {
    const row = table.insertRow();
    for (const cell of [n.rollout, n.token, tokenText(g, n.rollout, n.token),
      n.weight.toFixed(3), n.distance.toFixed(3), rewards[n.rollout]]) {
      row.insertCell().textContent = String(cell);
    }
  }
  box.append(table);
  if (node.neighbours.length > SHOWN_NEIGHBOURS) {
    box.append(`… and ${node.neighbours.length - SHOWN_NEIGHBOURS} more`);
  }
  return box;
}

function hover(span) {
  const g = Number(span.dataset.g), r = Number(span.dataset.r), t = Number(span.dataset.t);
  const method = currentChoice("method");
  const tip = $("tooltip");
  tip.replaceChildren(
    line(`token ${t}`, ""),
    Object.assign(document.createElement("span"), { className: "text", textContent: tokenText(g, r, t) }),
    line("value", Number(span.dataset.value).toFixed(4)),
    line("advantage", Number(span.dataset.advantage).toFixed(4)),
    ...explain(g, r, t, method),
  );
  tip.hidden = false;
  const box = span.getBoundingClientRect();
  tip.style.left = `${Math.max(4, Math.min(window.scrollX + box.left, window.scrollX + innerWidth - tip.offsetWidth - 8))}px`;
  tip.style.top = `${window.scrollY + box.bottom + 6}px`;
  if (method === "hista") {
    const rollout = shown.response.groups[g].rollouts[r];
    const boundaries = rollout.boundaries.hista;
    const start = boundaries[segmentIndex(boundaries, t)];
    const node = rollout.explanation?.hista_nodes?.find((n) => n.token === start);
    for (const n of node ? node.neighbours : []) {
      // An end node after the response has no token of its own: mark the last one.
      const last = shown.response.groups[g].rollouts[n.rollout].values.hista.length - 1;
      $(`tok-${g}-${n.rollout}-${Math.min(n.token, last)}`)?.classList.add("neighbour");
    }
  }
}

function unhover() {
  $("tooltip").hidden = true;
  for (const span of document.querySelectorAll(".token.neighbour")) span.classList.remove("neighbour");
}

// -- wiring ----------------------------------------------------------------------------

$("run").addEventListener("click", run);
$("request").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) run();
});
$("upload").addEventListener("change", async () => {
  const file = $("upload").files[0];
  if (!file) return;
  try {
    $("request").value = JSON.stringify(parseRequest(await file.text()), null, 2);
    setStatus(`loaded ${file.name}`);
  } catch (error) {
    setStatus(`${file.name}: ${error.message}`, true);
  }
});
$("add-response").addEventListener("click", () => addResponseRow());
$("use-text").addEventListener("click", () => {
  try {
    $("request").value = JSON.stringify(requestFromText(), null, 2);
  } catch (error) {
    setStatus(`params: ${error.message}`, true);
    return;
  }
  run();
});
$("history-refresh").addEventListener("click", refreshHistory);
$("history-load").addEventListener("click", loadHistoryEntry);
for (const input of document.querySelectorAll("input[name=method], input[name=colour]")) {
  input.addEventListener("change", () => { unhover(); render(); });
}
$("results").addEventListener("mouseover", (event) => {
  const span = event.target.closest(".token");
  if (span) { unhover(); hover(span); }
});
$("results").addEventListener("mouseleave", unhover);
$("results").addEventListener("mouseout", (event) => {
  if (event.target.closest(".token") && !event.relatedTarget?.closest?.(".token")) unhover();
});
addResponseRow();
addResponseRow();
loadModel();
