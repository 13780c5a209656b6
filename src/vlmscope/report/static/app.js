// vlmscope web app: plain JS over the JSON endpoints of vlmscope/report/app.py.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  image: null,      // id of the current image ("scene-3", "upload-…")
  truth: {},        // question text -> ground-truth answer (generated scenes only)
  asked: null,      // the last /api/ask response
  ticket: 0,        // drops answers to questions that are no longer current
  sae: null,        // the SAE's site, or null
  features: false,  // whether the feature list has been asked for
  generic: [],      // example questions for uploaded images
};

// --- talking to the server -------------------------------------------------------------------
async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) throw new Error(explain(body, response));
  return body;
}

function explain(body, response) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  return `${response.status} ${response.statusText}`;
}

const post = (path, payload) => api(path, {
  method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(payload),
});

function notice(message, kind = "error") {
  const box = $("notice");
  box.textContent = message;
  box.className = kind;
  box.hidden = !message;
}

async function busy(button, work) {
  const label = button.textContent;
  button.disabled = true;
  button.textContent = label + " …";
  try { await work(); } catch (err) { notice(err.message); } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

// --- small drawing helpers -------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const pct = (p) => `${(100 * p).toFixed(1)}%`;
const num = (v) => (v === null || v === undefined ? "n/a" : v.toFixed(3));

function bar(label, value, scale, text) {  // value in [-scale, scale] drawn from the middle or the left
  const width = Math.min(100, (100 * Math.abs(value)) / (scale || 1));
  const fill = el("span", {class: value < 0 ? "fill neg" : "fill", style: `width:${width}%`});
  return el("div", {class: "bar"}, el("span", {class: "label"}, label), el("span", {class: "track"}, fill),
    el("span", {class: "value"}, text));
}

function colour(v) {  // effect -> background: blue for positive, red for negative
  if (v === null) return "#eee";
  const a = Math.min(1, Math.abs(v));
  return v >= 0 ? `rgba(33, 102, 172, ${a})` : `rgba(178, 24, 43, ${a})`;
}

function wordsTable(table, layers, rows) {  // rows: (layer, k) of {w, p}
  table.replaceChildren(el("tr", {}, el("th", {}, "layer"), el("th", {colspan: rows[0].length}, "top words")));
  rows.forEach((words, i) => {
    const tr = el("tr", {}, el("td", {}, `L${layers[i]}`));
    for (const {w, p} of words) {
      tr.append(el("td", {style: `background:rgba(33,102,172,${Math.min(1, p * 2).toFixed(2)})`,
        title: pct(p)}, el("span", {class: "word"}, w), " ", el("span", {class: "prob"}, pct(p))));
    }
    table.append(tr);
  });
}

// --- image -----------------------------------------------------------------------------------
function clearResults() {
  state.asked = null;
  state.ticket += 1;
  $("answer-panel").hidden = true;
  $("patch-panel").hidden = true;
  $("patches").replaceChildren();
  $("trace-grid").replaceChildren();
  $("cell-detail").textContent = "";
  $("knockout-result").replaceChildren();
  $("patch-hint").hidden = false;
}

function showImage(image, caption, questions) {
  state.image = image;
  state.truth = Object.fromEntries(questions.filter((q) => q.answer).map((q) => [q.text, q.answer]));
  clearResults();
  notice("");
  $("image").src = `/api/image/${encodeURIComponent(image)}`;
  $("image-caption").textContent = caption;
  $("examples").replaceChildren(...questions.map((q) => {
    const chip = el("button", {class: "chip", type: "button"}, q.text);
    chip.addEventListener("click", () => { $("question").value = q.text; ask(); });
    return chip;
  }));
  $("trace").disabled = $("knockout").disabled = false;
}

async function loadScene(seed) {
  const scene = await api(`/api/scene/${seed}`);
  $("seed").value = scene.seed;
  showImage(scene.image, scene.caption, scene.questions);
}

async function upload(file) {
  const form = new FormData();
  form.append("file", file);
  try {
    const got = await api("/api/upload", {method: "POST", body: form});
    showImage(got.image, `${got.name} (${got.width} × ${got.height}), shown as the model sees it`,
      state.generic.map((text) => ({text})));
  } catch (err) {
    notice(`Upload refused: ${err.message}`);
  } finally {
    $("upload").value = "";
  }
}

// --- question, answer and the patch grid ------------------------------------------------------
function currentQuestion() {
  const question = $("question").value.trim();
  if (!state.image) throw new Error("pick, generate or upload an image first");
  if (!question) throw new Error("type a question first");
  return question;
}

async function ask() {
  await busy($("ask"), async () => {
    const question = currentQuestion();
    const ticket = ++state.ticket;
    const got = await post("/api/ask", {image: state.image, question});
    if (ticket !== state.ticket) return;
    state.asked = got;
    notice(got.unknown_words.length ? `The model's vocabulary lacks: ${got.unknown_words.join(", ")}` : "",
      "info");
    showAnswer(got);
    drawPatches(got);
  });
}

function showAnswer(got) {
  $("answer").textContent = got.answer;
  const truth = state.truth[got.question];
  $("truth").textContent = truth === undefined ? "" :
    `ground truth: ${truth} ${truth === got.answer ? "✓" : "✗"}`;
  const scale = got.top[0].prob;
  $("top").replaceChildren(...got.top.map((t) => bar(t.token, t.prob, scale, pct(t.prob))));
  wordsTable($("last-lens"), got.lens.layers, got.lens.last);
  $("answer-panel").hidden = false;
}

function drawPatches(got) {
  const [rows, cols] = got.grid;
  const box = $("patches");
  box.style.gridTemplateRows = `repeat(${rows}, 1fr)`;
  box.style.gridTemplateColumns = `repeat(${cols}, 1fr)`;
  box.replaceChildren(...got.lens.patches.map((patch) => {
    const cell = el("div", {class: "patch", tabindex: "0", "data-row": patch.row, "data-col": patch.col,
      style: `grid-row:${patch.row + 1};grid-column:${patch.col + 1}`, title: `patch r${patch.row} c${patch.col}`});
    const show = () => showPatch(patch, cell);
    cell.addEventListener("mouseenter", show);
    cell.addEventListener("focus", show);
    return cell;
  }));
  $("patch-hint").hidden = got.lens.patches.length > 0;
}

function showPatch(patch, cell) {
  for (const c of document.querySelectorAll(".patch.active")) c.classList.remove("active");
  cell.classList.add("active");
  const got = state.asked;
  $("patch-title").textContent = `Patch row ${patch.row}, column ${patch.col} (position ${patch.pos}): logit lens`;
  wordsTable($("lens-table"), got.lens.layers, patch.top);
  const features = $("sae-features");
  if (!got.sae) {
    features.replaceChildren(el("p", {class: "muted"}, "No SAE loaded: start the app with --sae DIR to see features."));
  } else {
    const here = got.sae.patches.find((p) => p.row === patch.row && p.col === patch.col);
    const list = here ? here.features : [];
    const scale = list.length ? list[0].act : 1;
    const link = (f) => {  // a bar that opens the feature's page below
      const row = bar(`#${f.id}`, f.act, scale, f.act.toFixed(2));
      row.classList.add("link");
      row.title = `feature ${f.id}: click to see its top scenes`;
      row.addEventListener("click", () => openFeature(f.id));
      return row;
    };
    features.replaceChildren(el("p", {class: "muted"}, `at ${got.sae.site}`), ...(list.length ?
      list.map(link) : [el("p", {}, "no feature active")]));
  }
  $("patch-panel").hidden = false;
}

// --- causal tracing and knockout ---------------------------------------------------------------
function tokenLabel(t) {
  return t.role === "image" ? `img r${t.row}c${t.col}` : t.text;
}

async function runTrace() {
  await busy($("trace"), async () => {
    const question = currentQuestion();
    drawTrace(await post("/api/trace", {image: state.image, question, direction: $("direction").value}));
  });
}

function drawTrace(got) {
  const tokens = got.tokens;
  const table = el("table", {class: "trace"});
  table.append(el("tr", {}, el("th", {}, ""), ...got.positions.map((p) =>
    el("th", {class: "tok"}, el("span", {}, tokenLabel(tokens[p]))))));
  got.layers.forEach((layer, li) => {
    const tr = el("tr", {}, el("th", {}, `L${layer}`));
    got.positions.forEach((p, pi) => {
      const v = got.effect[li][pi];
      const td = el("td", {class: "cell", style: `background:${colour(v)}`, "data-layer": layer, "data-pos": p,
        title: `L${layer} · ${tokenLabel(tokens[p])}: ${num(v)}`});
      td.addEventListener("click", () => {
        for (const c of table.querySelectorAll("td.selected")) c.classList.remove("selected");
        td.classList.add("selected");
        $("cell-detail").textContent = `Layer ${layer}, position ${p} (${tokenLabel(tokens[p])}): effect ` +
          `${num(v)} — ${got.metric} = ${num(got.value[li][pi])} with this patch ` +
          `(clean ${num(got.clean)}, noised ${num(got.corrupt)}; ${got.direction}).`;
      });
      tr.append(td);
    });
    table.append(tr);
  });
  $("trace-grid").replaceChildren(table);
  $("cell-detail").textContent = Math.abs(got.clean - got.corrupt) < 1e-6 ?
    "The noise does not change the answer's probability here, so effects are not meaningful." :
    "Click a cell to read its effect.";
}

async function runKnockout() {
  await busy($("knockout"), async () => {
    const got = await post("/api/knockout",
      {image: state.image, question: currentQuestion(), window: Number($("window").value)});
    const scale = Math.max(...got.relative.map((v) => Math.abs(v || 0)), 1e-9);
    $("knockout-result").replaceChildren(
      el("p", {class: "muted"}, `${got.metric} without knockout: ${num(got.baseline)}; change when blocked in:`),
      ...got.starts.map((s, i) => bar(got.window > 1 ? `L${s}–${s + got.window - 1}` : `L${s}`,
        got.relative[i] || 0, scale,
        `${got.relative[i] >= 0 ? "+" : ""}${pct(got.relative[i] || 0)}`)));
  });
}

// --- SAE features: the most frequent ones over fixed scenes, and one feature's top scenes -----
async function listFeatures() {
  if (!$("features-panel").open || state.features) return;
  state.features = true;
  const list = $("feature-list");
  if (!state.sae) {
    list.replaceChildren(el("p", {class: "muted"}, "No SAE loaded: start the app with --sae DIR to browse features."));
    return;
  }
  list.replaceChildren(el("p", {class: "muted"}, "ranking features …"));
  try {
    const got = await api("/api/features");
    $("features-about").textContent = `The ${got.features.length} most frequent of the SAE's ${got.d_sae} ` +
      `features at ${got.site}, over ${got.scenes} generated scenes (share of image patches where each fires; ` +
      "its dissection label where one fits). Click one to see the scenes where it fires most.";
    list.replaceChildren(...got.features.map((f) => {
      const button = el("button", {class: "feature", type: "button", "data-feature": f.id},
        el("b", {}, `#${f.id}`), ` ${pct(f.frequency)}`, el("span", {class: "concept"}, f.label));
      button.addEventListener("click", () => showFeature(f.id));
      return button;
    }));
  } catch (err) {
    state.features = false;
    list.replaceChildren();
    notice(err.message);
  }
}

async function showFeature(id) {
  try {
    const got = await api(`/api/features/${id}`);
    for (const b of document.querySelectorAll(".feature.active")) b.classList.remove("active");
    const button = document.querySelector(`.feature[data-feature="${id}"]`);
    if (button) button.classList.add("active");
    $("feature-title").textContent = `Feature ${got.id} at ${got.site}`;
    $("feature-summary").textContent = `Fires at ${pct(got.frequency)} of the image patches of ${got.scenes} ` +
      `scenes; largest activation ${num(got.max)}; ` + (got.label ?
      `dissection label ${got.label} (IoU ${num(got.iou)}).` : "no dissection label (best IoU below 0.04).") +
      (got.top.length ? " Its top scenes, orange where it fires; click one to open it above." : "");
    $("feature-scenes").replaceChildren(...(got.top.length ? got.top.map((s) => sceneCard(s, got.grid, got.max)) :
      [el("p", {}, "This feature fires on none of these scenes.")]));
    $("feature-detail").hidden = false;
  } catch (err) {
    notice(err.message);
  }
}

function sceneCard(scene, [rows, cols], scale) {  // the scene with the feature's activation per patch
  const heat = el("div", {class: "heat",
    style: `grid-template-rows:repeat(${rows},1fr);grid-template-columns:repeat(${cols},1fr)`});
  scene.map.forEach((row, r) => row.forEach((v, c) => heat.append(el("div", {title: `r${r} c${c}: ${num(v)}`,
    style: `background:rgba(255,120,0,${(0.85 * Math.max(0, v || 0) / (scale || 1)).toFixed(2)})`}))));
  const card = el("figure", {class: "feature-scene", tabindex: "0", "data-seed": scene.seed},
    el("div", {class: "frame"}, el("img", {src: `/api/image/${scene.image}`, alt: `scene ${scene.seed}`}), heat),
    el("figcaption", {}, `scene ${scene.seed}: max ${num(scene.act)}`));
  card.addEventListener("click", () => loadScene(scene.seed).catch((err) => notice(err.message)));
  return card;
}

function openFeature(id) {  // from the patch panel: open the browser at one feature
  const panel = $("features-panel");
  panel.open = true;
  showFeature(id).then(() => $("feature-detail").scrollIntoView({behavior: "smooth"}));
}

// --- start -----------------------------------------------------------------------------------
async function start() {
  const info = await api("/api/info");
  state.generic = info.questions;
  state.sae = info.sae;
  $("model").textContent = info.model;
  $("window").max = info.layers;
  $("gallery").replaceChildren(...info.gallery.map((seed) => {
    const thumb = el("img", {src: `/api/image/scene-${seed}`, alt: `scene ${seed}`, class: "thumb",
      tabindex: "0"});
    thumb.addEventListener("click", () => loadScene(seed).catch((err) => notice(err.message)));
    return thumb;
  }));
  $("generate").addEventListener("click", () => busy($("generate"), () => loadScene(Number($("seed").value))));
  $("random").addEventListener("click", () =>
    busy($("random"), () => loadScene(Math.floor(Math.random() * 1000000))));
  $("upload").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files[0]); });
  $("ask").addEventListener("click", ask);
  $("question").addEventListener("keydown", (e) => { if (e.key === "Enter") ask(); });
  $("trace").addEventListener("click", runTrace);
  $("knockout").addEventListener("click", runKnockout);
  $("features-panel").addEventListener("toggle", listFeatures);
  await loadScene(info.gallery[0]);
}

start().catch((err) => notice(`The app could not start: ${err.message}`));
