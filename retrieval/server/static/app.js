// The search page: one query at a time (text, an uploaded image, or "more like this"), re-run whenever a
// control changes. Everything the server sends is put in the page as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  form: $("search-form"), q: $("q"), imageInput: $("image-input"), imageLabel: $("image-label"),
  target: $("target"), k: $("k"), theta: $("theta"), weight: $("weight"), weightControl: $("weight-control"),
  fusion: $("fusion"), weightHelp: $("weight-help"),
  kOut: $("k-out"), thetaOut: $("theta-out"), weightOut: $("weight-out"),
  queryBar: $("query-bar"), queryImage: $("query-image"), queryLabel: $("query-label"), clear: $("clear-query"),
  status: $("status"), error: $("error"), results: $("results"),
  dialog: $("item-view"), itemImage: $("item-image"), itemTitle: $("item-title"), itemScores: $("item-scores"),
  itemCaptions: $("item-captions"), itemExtra: $("item-extra"), itemLike: $("item-like"), drop: $("drop-overlay"),
};
const THETA_OFF = -1; // the slider's far left: no threshold, top k only
const FUSION_HELP = {
  weighted: "score = w·image + (1−w)·caption",
  mean: "score = (image + caption) / 2",
  max: "score = the better of image and caption",
  min: "score = the worse of image and caption: both must match",
};
let info = null;
let query = null; // {kind: "text", q} | {kind: "like", id} | {kind: "image", file, url}
let inFlight = null; // AbortController of the running request
let openHit = null; // the result shown in the item view

function setStatus(text) { els.status.textContent = text; }

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = !message;
}

function thetaValue() {
  const t = Number(els.theta.value);
  return t <= THETA_OFF ? null : t;
}

function updateOutputs() {
  els.kOut.textContent = els.k.value;
  const t = thetaValue();
  els.thetaOut.textContent = t === null ? "off" : t.toFixed(2);
  els.weightOut.textContent = Number(els.weight.value).toFixed(2);
  els.fusion.disabled = els.target.value !== "item";
  els.weight.disabled = els.target.value !== "item" || els.fusion.value !== "weighted"; // only weighted takes w
  els.weightHelp.textContent = FUSION_HELP[els.fusion.value];
}

function searchParams() {
  const p = new URLSearchParams({ k: els.k.value, target: els.target.value });
  const t = thetaValue();
  if (t !== null) p.set("theta", String(t));
  if (els.target.value === "item") {
    p.set("fusion", els.fusion.value);
    if (els.fusion.value === "weighted") p.set("weight", els.weight.value);
  }
  return p;
}

async function runSearch() {
  if (!query) return;
  inFlight?.abort();
  const mine = new AbortController(); // a newer search aborts this one, and this one then changes nothing
  inFlight = mine;
  const p = searchParams();
  let request;
  if (query.kind === "image") {
    const body = new FormData();
    body.append("file", query.file);
    request = fetch(`/api/search/image?${p}`, { method: "POST", body, signal: mine.signal });
  } else {
    p.set(query.kind === "text" ? "q" : "like", query.kind === "text" ? query.q : query.id);
    history.replaceState(null, "", `?${p}`);
    request = fetch(`/api/search?${p}`, { signal: mine.signal });
  }
  setStatus("Searching…");
  els.results.setAttribute("aria-busy", "true");
  try {
    const resp = await request;
    const body = await resp.json().catch(() => ({ error: `the server answered ${resp.status} ${resp.statusText}` }));
    if (mine.signal.aborted) return;
    if (!resp.ok) {
      showError(body.error || `the server answered ${resp.status}`);
      setStatus("");
      els.results.replaceChildren();
      return;
    }
    showError("");
    render(body);
  } catch (e) {
    if (e.name === "AbortError" || mine.signal.aborted) return; // a newer search has the page
    showError(`Cannot reach the search server (${e.message}). Is it still running?`);
    setStatus("");
  } finally {
    if (inFlight === mine) els.results.removeAttribute("aria-busy");
  }
}

function render(body) {
  els.results.replaceChildren(...body.results.map(card));
  const t = body.query.theta;
  if (body.count === 0) {
    setStatus(t === null || t === undefined
      ? "No results. Try other words, or another Match mode."
      : `No results above θ = ${t.toFixed(2)}. Move the θ slider left, or try other words.`);
    return;
  }
  const above = t === null || t === undefined ? "" : ` above θ = ${t.toFixed(2)}`;
  setStatus(`${body.count} result${body.count === 1 ? "" : "s"}${above} (${body.took_ms.toFixed(0)} ms)`);
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

function scoreText(hit) {
  const parts = [];
  if (hit.image_score !== null) parts.push(`image ${hit.image_score.toFixed(3)}`);
  if (hit.text_score !== null) parts.push(`caption ${hit.text_score.toFixed(3)}`);
  return parts.join(", ");
}

function card(hit) {
  const picture = hit.thumb
    ? el("img", { src: hit.thumb, alt: hit.caption || hit.id, loading: "lazy", decoding: "async" })
    : el("span", { className: "text-only" }, hit.caption || "(no caption)");
  const score = el("span", { className: "score", title: scoreText(hit) }, hit.score.toFixed(3));
  const meta = el("span", { className: "meta" }, score, el("span", { className: "caption" }, hit.caption || hit.id));
  const open = el("button", { type: "button", className: "open" }, picture, meta);
  open.setAttribute("aria-label", `${hit.rank}. ${hit.caption || hit.id}, score ${hit.score.toFixed(3)}. Open`);
  open.addEventListener("click", () => openItem(hit));
  const like = el("button", { type: "button", className: "like" }, "More like this");
  like.setAttribute("aria-label", `More like ${hit.caption || hit.id}`);
  like.addEventListener("click", () => moreLike(hit));
  return el("li", { className: "result" }, open, like);
}

async function openItem(hit) {
  openHit = hit;
  let item;
  try {
    const resp = await fetch(`/api/items/${encodeURIComponent(hit.id)}`);
    item = await resp.json();
    if (!resp.ok) throw new Error(item.error || `the server answered ${resp.status}`);
  } catch (e) {
    showError(`Cannot open ${hit.id}: ${e.message}`);
    return;
  }
  els.itemTitle.textContent = item.id;
  els.itemImage.hidden = !item.thumb;
  if (item.thumb) { els.itemImage.src = item.thumb; els.itemImage.alt = item.captions[0] || item.id; }
  els.itemScores.textContent = `score ${hit.score.toFixed(3)}` + (scoreText(hit) ? ` (${scoreText(hit)})` : "");
  els.itemCaptions.replaceChildren(...(item.captions.length ? item.captions : ["(none)"]).map((c) => el("li", {}, c)));
  const extra = { ...item.extra, ...(item.path ? { path: item.path } : {}) };
  els.itemExtra.replaceChildren(...Object.entries(extra).flatMap(([key, value]) =>
    [el("dt", {}, key), el("dd", {}, typeof value === "string" ? value : JSON.stringify(value))]));
  els.dialog.showModal();
}

function setQuery(next, label) {
  if (query?.url) URL.revokeObjectURL(query.url);
  query = next;
  els.queryBar.hidden = next.kind === "text";
  els.queryImage.hidden = next.kind !== "image";
  if (next.kind === "image") els.queryImage.src = next.url;
  els.queryLabel.textContent = label;
  runSearch();
}

function moreLike(hit) {
  els.q.value = "";
  setQuery({ kind: "like", id: hit.id }, `More like ${hit.caption || hit.id}`);
  window.scrollTo({ top: 0 });
}

function searchImage(file) {
  if (!file) return;
  if (info && file.size > info.max_upload_bytes) {
    showError(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB; the limit is ${(info.max_upload_bytes / 2 ** 20).toFixed(0)} MB.`);
    return;
  }
  els.q.value = "";
  setQuery({ kind: "image", file, url: URL.createObjectURL(file) }, `Searching by image ${file.name}`);
}

let debounce = null;
function onControlChange() {
  updateOutputs();
  clearTimeout(debounce);
  debounce = setTimeout(runSearch, 150);
}

function bind() {
  els.form.addEventListener("submit", (e) => {
    e.preventDefault();
    const q = els.q.value.trim();
    if (!q) { showError("Type some words to search, or choose an image."); els.q.focus(); return; }
    setQuery({ kind: "text", q }, "");
  });
  for (const input of [els.k, els.theta, els.weight, els.target, els.fusion]) input.addEventListener("input", onControlChange);
  els.imageInput.addEventListener("change", () => { searchImage(els.imageInput.files[0]); els.imageInput.value = ""; });
  els.imageLabel.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); els.imageInput.click(); }
  });
  els.clear.addEventListener("click", () => {
    query = null;
    els.queryBar.hidden = true;
    els.results.replaceChildren();
    history.replaceState(null, "", "/");
    setStatus(readyText());
    els.q.focus();
  });
  els.itemLike.addEventListener("click", () => { els.dialog.close(); moreLike(openHit); });
  document.addEventListener("keydown", (e) => {
    if (e.key === "/" && document.activeElement !== els.q && !els.dialog.open) { e.preventDefault(); els.q.focus(); }
  });
  let depth = 0; // dragenter/dragleave fire for every child crossed
  const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragenter", (e) => { if (hasFiles(e)) { depth++; els.drop.hidden = false; } });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; els.drop.hidden = true; } });
  document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    els.drop.hidden = true;
    searchImage(e.dataTransfer.files[0]);
  });
}

function readyText() {
  const n = info.counts.items;
  return n === 0
    ? "This index is empty: add items with `retrieval index`, then reload."
    : `Search ${n.toLocaleString()} items: type a description, choose an image, or drop one on the page. Press / to type.`;
}

function applyDefaults(defaults, url) {
  els.k.max = String(Math.min(info.max_k, 100));
  els.k.value = url.get("k") ?? defaults.k;
  els.theta.value = url.get("theta") ?? defaults.theta ?? THETA_OFF;
  els.weight.value = url.get("weight") ?? defaults.weight;
  const fusion = url.get("fusion") ?? "weighted";
  if ([...els.fusion.options].some((o) => o.value === fusion)) els.fusion.value = fusion;
  const target = url.get("target") ?? defaults.target;
  if ([...els.target.options].some((o) => o.value === target)) els.target.value = target;
  const { with_image, with_text } = info.counts;
  els.weightControl.hidden = !(with_image > 0 && with_text > 0); // w only matters when items have both parts
  updateOutputs();
}

async function init() {
  bind();
  try {
    const resp = await fetch("/api/info");
    info = await resp.json();
    if (!resp.ok) throw new Error(info.error || `the server answered ${resp.status}`);
  } catch (e) {
    setStatus("");
    showError(`Cannot load the index information (${e.message}). Is the server running?`);
    return;
  }
  const url = new URLSearchParams(location.search);
  applyDefaults(info.defaults, url);
  setStatus(readyText());
  if (url.get("q")) { els.q.value = url.get("q"); setQuery({ kind: "text", q: url.get("q") }, ""); }
  else if (url.get("like")) setQuery({ kind: "like", id: url.get("like") }, `More like ${url.get("like")}`);
}

init();
