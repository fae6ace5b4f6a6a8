// supir-mlx Studio page. Every URL is relative, so each request carries the /<token>/ prefix of the page's address.
"use strict";
const $ = (id) => document.getElementById(id);
let S = null;              // the server's last snapshot (photos, jobs, model)
let presets = {}, knobs = [];
let selected = null;       // photo id
const local = {};          // per photo: {caption, captionEdited, preset, edited: {knob: value}, result, before}
let planTimer = null;

function fmtTime(s) {
  if (s == null || !isFinite(s)) return "–";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.floor(s / 60) % 60} min` : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}
function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; }
async function api(path, options = {}) {
  const r = await fetch(path, options);
  const data = await r.json().catch(() => ({ error: `the server answered ${r.status}` }));
  if (!r.ok) throw new Error(data.error || `the server answered ${r.status}`);
  return data;
}
const post = (path, body) => api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
const photo = (id) => S && S.photos.find((p) => p.id === id);
const job = (id) => S && S.jobs.find((j) => j.id === id);
const mine = (id) => local[id] || (local[id] = { caption: "", captionEdited: false, preset: "default", edited: {}, result: null, before: "original" });

// ------------------------------------------------------------------------------------------- photos
async function upload(files) {
  for (const f of files) {
    try {
      const p = await api(`api/photos?name=${encodeURIComponent(f.name)}`, { method: "POST", body: f });
      showError("");
      if (!selected) select(p.id);
    } catch (e) { showError(e.message); }
  }
}
$("picker").addEventListener("change", (e) => { upload([...e.target.files]); e.target.value = ""; });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload([...e.dataTransfer.files]); });

function renderPhotos() {
  const ul = $("photos");
  ul.replaceChildren(...S.photos.map((p) => {
    const li = document.createElement("li");
    li.className = p.id === selected ? "selected" : "";
    li.dataset.id = p.id;
    const img = new Image(); img.src = `api/photos/${p.id}/image`; img.alt = "";
    const running = S.jobs.find((j) => j.photo === p.id && j.kind === "restore" && (j.state === "running" || j.state === "queued"));
    const name = document.createElement("div");
    name.innerHTML = `<div class="name"></div><div class="muted">${p.width}×${p.height}${running ? " · " + running.state : p.results.length ? ` · ${p.results.length} result${p.results.length > 1 ? "s" : ""}` : ""}</div>`;
    name.firstChild.textContent = p.name;
    li.append(img, name);
    li.onclick = () => select(p.id);
    return li;
  }));
}

function select(id) {
  selected = id;
  render();
  schedulePlan();
}

// ------------------------------------------------------------------------------------------ settings
function knobValue(k, preset) {
  const p = presets[preset] || {};
  return k.name in p ? p[k.name] : k.default;
}
function renderKnobs() {
  const st = mine(selected);
  $("preset").value = st.preset;
  const box = $("knobs");
  box.replaceChildren(...knobs.map((k) => {
    const label = document.createElement("label");
    label.className = (k.name.endsWith("prompt") ? "wide " : "") + (k.name in st.edited ? "edited" : "");
    label.textContent = k.name.replace(/_/g, " ");
    const v = k.name in st.edited ? st.edited[k.name] : knobValue(k, st.preset);
    let input;
    if (k.type === "bool") {
      input = document.createElement("input"); input.type = "checkbox"; input.checked = !!v;
    } else if (k.type === "choice") {
      input = document.createElement("select");
      for (const c of k.choices) input.add(new Option(c, c));
      input.value = v;
    } else if (k.type === "str") {
      input = document.createElement("textarea"); input.rows = 2; input.value = v ?? "";
    } else {
      input = document.createElement("input"); input.type = "number"; input.step = k.type === "int" ? "1" : "any";
      input.value = v ?? ""; if (k.optional) input.placeholder = "auto";
    }
    input.name = k.name;
    input.addEventListener("change", () => {
      let val = k.type === "bool" ? input.checked : input.value;
      if ((k.type === "int" || k.type === "float") && val !== "") val = Number(val);
      if (val === "" && k.optional) val = null;
      st.edited[k.name] = val;
      label.classList.add("edited");
      schedulePlan();
    });
    label.append(input);
    return label;
  }));
}
$("preset").addEventListener("change", (e) => { mine(selected).preset = e.target.value; renderKnobs(); schedulePlan(); });
$("reset-knobs").addEventListener("click", () => { mine(selected).edited = {}; renderKnobs(); schedulePlan(); });
$("caption").addEventListener("input", (e) => { const st = mine(selected); st.caption = e.target.value; st.captionEdited = true; });
$("caption").addEventListener("change", schedulePlan);
$("draft").addEventListener("change", schedulePlan);

function captionToSend(p) {
  const st = mine(p.id);
  // untouched and LLaVA still working: let the restore caption it itself; otherwise what the box shows is used
  return !st.captionEdited && p.caption_state === "pending" ? null : $("caption").value;
}
function request(p) {
  const st = mine(p.id);
  return { photo: p.id, preset: st.preset, settings: st.edited, caption: captionToSend(p), draft: $("draft").checked };
}

function schedulePlan() {
  clearTimeout(planTimer);
  planTimer = setTimeout(async () => {
    const p = photo(selected);
    if (!p) return;
    try {
      const r = await post("api/plan", request(p));
      const est = $("estimate");
      est.className = r.fits === false ? "bad" : "";
      est.textContent = r.message || (r.estimate != null ? `Estimated time: about ${fmtTime(r.estimate)} on this machine` : "Estimated time: known after the model has run once");
      $("plan").textContent = r.plan || r.message || "";
    } catch (e) { $("estimate").className = "bad"; $("estimate").textContent = e.message; }
  }, 250);
}

// ----------------------------------------------------------------------------------------- run
$("start").addEventListener("click", async () => {
  const p = photo(selected);
  if (!p) return;
  try { await post("api/jobs", request(p)); showError(""); } catch (e) { showError(e.message); }
});
$("cancel").addEventListener("click", () => {
  const j = activeJob(selected);
  if (j) cancel(j.id);
});
async function cancel(id) { try { await post(`api/jobs/${id}/cancel`, {}); } catch (e) { showError(e.message); } }
function activeJob(pid) {
  return S.jobs.filter((j) => j.photo === pid && j.kind === "restore" && (j.state === "running" || j.state === "queued")).pop();
}

function renderQueue() {
  $("queue").replaceChildren(...S.jobs.filter((j) => j.kind === "restore" || j.state === "running").map((j) => {
    const li = document.createElement("li");
    li.className = j.state;
    const p = photo(j.photo);
    const span = document.createElement("span");
    span.textContent = `${j.kind === "caption" ? "caption " : ""}${p ? p.name : "?"} · ${j.state}${j.state === "done" ? ` (${fmtTime(j.elapsed)})` : ""}`;
    if (j.message) span.title = j.message;
    li.append(span);
    if (j.state === "running" || j.state === "queued") {
      const b = document.createElement("button"); b.textContent = "×"; b.title = "cancel"; b.onclick = () => cancel(j.id);
      li.append(b);
    }
    return li;
  }));
}

function renderProgress() {
  const p = photo(selected);
  const j = p && (activeJob(p.id) || S.jobs.filter((x) => x.photo === p.id && x.kind === "restore").pop());
  $("cancel").disabled = !(p && activeJob(p.id));
  const box = $("progress");
  if (!j) { box.hidden = true; return; }
  box.hidden = false;
  let text;
  if (j.state === "running") {
    let where = `${j.stage}`;
    if (j.stage === "sample" && j.total) {
      const steps = j.settings.steps * j.settings.num_samples, tiles = Math.max(1, Math.round(j.total / steps));
      where = `sampling step ${Math.ceil(j.done / tiles)}/${steps}` + (tiles > 1 ? `, tile ${((j.done - 1) % tiles) + 1}/${tiles}` : "");
    } else if (j.total) where += ` ${j.done}/${j.total}`;
    text = `${where} · ${fmtTime(j.elapsed)} elapsed` + (j.eta != null ? ` · about ${fmtTime(j.eta)} left` : "");
    $("bar").style.width = `${j.stage === "sample" && j.total ? (100 * j.done) / j.total : 0}%`;
  } else {
    text = j.state === "done" ? `done in ${fmtTime(j.elapsed)} (peak ${j.peak_gb} GB)` : j.state === "queued" ? "waiting in the queue" : `${j.state}: ${j.message || ""}`;
    $("bar").style.width = j.state === "done" ? "100%" : "0";
  }
  $("progress-text").textContent = text;
  const live = $("live");
  live.hidden = !(j.state === "running" || j.previews > 0 || j.state === "done");
  $("preview").parentElement.hidden = !j.previews;
  // preview events move the frame along; this catches up after a missed event (a reconnect, a late tab)
  const base = `api/jobs/${j.id}/image/preview`, shown = $("preview").getAttribute("src") || "";
  if (j.previews && (j.state !== "running" || !shown.startsWith(base)) && shown !== `${base}?n=${j.previews}`) $("preview").src = `${base}?n=${j.previews}`;
  const stage1 = `api/jobs/${j.id}/image/stage1`;
  if (j.has_stage1 && $("stage1").getAttribute("src") !== stage1) $("stage1").src = stage1;
  else if (!j.has_stage1) $("stage1").removeAttribute("src");
}

// --------------------------------------------------------------------------------------- result
function renderResult() {
  const p = photo(selected);
  const box = $("result");
  if (!p || !p.results.length) { box.hidden = true; return; }
  box.hidden = false;
  const st = mine(p.id);
  if (!st.result || !p.results.includes(st.result)) st.result = p.results[p.results.length - 1];
  const label = (id, i) => { const j = job(id); return `${i + 1}: ${j.draft ? "draft, " : ""}${j.preset}, seed ${j.settings.seed}, ${j.settings.steps} steps`; };
  $("result-pick").replaceChildren(...p.results.map((id, i) => new Option(label(id, i), id)));
  $("result-pick").value = st.result;
  const same = (id) => job(id).draft === job(st.result).draft;  // a draft compares with drafts only (same crop)
  $("before-pick").replaceChildren(new Option("the original", "original"), ...p.results.filter((id) => id !== st.result && same(id)).map((id) => new Option(`result ${label(id, p.results.indexOf(id))}`, id)));
  if (st.before !== "original" && !(p.results.includes(st.before) && same(st.before))) st.before = "original";
  $("before-pick").value = st.before;
  const after = `api/jobs/${st.result}/image/result`;
  const before = st.before === "original" ? `api/jobs/${st.result}/image/input` : `api/jobs/${st.before}/image/result`;
  if ($("after").getAttribute("src") !== after) $("after").src = after;
  if ($("before").getAttribute("src") !== before) $("before").src = before;
  const j = job(st.result);
  $("provenance").textContent = JSON.stringify(j.provenance, null, 2);
  // the same words as the save button's own answer: this render (on the state update that the save causes) and
  // that answer arrive in either order
  $("save-status").textContent = j.saved.length ? `saved as ${j.saved.join(", ")} in ${S.out_dir}` : "";
}
$("result-pick").addEventListener("change", (e) => { mine(selected).result = e.target.value; renderResult(); });
$("before-pick").addEventListener("change", (e) => { mine(selected).before = e.target.value; renderResult(); });
$("slider").addEventListener("input", (e) => {
  const v = Number(e.target.value);
  $("before").style.clipPath = `inset(0 ${100 - v}% 0 0)`;
  $("divider").style.left = `${v}%`;
});
$("zoom").addEventListener("click", () => {
  const on = $("compare-box").classList.toggle("actual");
  $("zoom").setAttribute("aria-pressed", String(on));
  $("zoom").textContent = on ? "Fit" : "100%";
});
$("save").addEventListener("click", async () => {
  const id = mine(selected).result;
  try {
    const r = await post(`api/jobs/${id}/save`, { format: $("save-format").value, bits: $("save-bits").value,
      jpeg_quality: Number($("save-quality").value), overwrite: $("save-overwrite").checked,
      fidelity_map: $("save-fidelity").checked });
    $("save-status").textContent = `saved as ${r.saved} in ${r.folder}`;
    showError("");
  } catch (e) { showError(e.message); }
});

// ----------------------------------------------------------------------------------------- all
function render() {
  const m = S.model;
  const ms = $("model-status");
  ms.className = `status ${m.state}`;
  ms.textContent = m.state === "ready" ? `model ready${m.captioner ? " (with captioner)" : " (no captioner: write captions by hand)"}` : m.state === "failed" ? m.error : "loading the model…";
  $("out-dir").textContent = S.out_dir;
  if (!selected && S.photos.length) selected = S.photos[0].id;
  renderPhotos();
  renderQueue();
  const p = photo(selected);
  $("empty").hidden = !!p;
  $("work").hidden = !p;
  if (!p) return;
  const st = mine(p.id);
  if ($("photo-name").dataset.id !== p.id) {  // switching photos: load its own caption and knobs
    $("photo-name").dataset.id = p.id;
    $("photo-name").textContent = p.name;
    $("photo-size").textContent = `${p.width} × ${p.height} px`;
    $("caption").value = st.caption;
    renderKnobs();
  }
  if (!st.captionEdited && p.suggestion != null && st.caption !== p.suggestion) { st.caption = p.suggestion; $("caption").value = p.suggestion; }
  $("caption-state").textContent = { pending: "(LLaVA is describing the photo…)", done: "(suggested by LLaVA; edit freely)", failed: `(captioning failed: ${p.caption_error})`, unavailable: "(no captioner loaded: write one, or leave it empty)", none: "" }[p.caption_state];
  renderProgress();
  renderResult();
}

function onEvent(ev) {
  if (ev.type === "state") {
    const first = !S;
    S = ev.state;
    if (S.folder_errors && S.folder_errors.length && first) showError(S.folder_errors.join("\n"));
    render();
    if (first || S.photos.some((p) => p.id === selected)) schedulePlan();
  } else if (ev.type === "progress" && S) {
    const i = S.jobs.findIndex((j) => j.id === ev.job.id);
    if (i >= 0) S.jobs[i] = ev.job;
    renderQueue();
    renderProgress();
  } else if (ev.type === "stage1" && S) {
    const j = job(ev.job);
    if (j) j.has_stage1 = true;
    renderProgress();
  } else if (ev.type === "preview" && S) {
    const j = job(ev.job);
    if (j && j.photo === selected) {
      $("live").hidden = false;
      $("preview").parentElement.hidden = false;
      $("preview").src = `api/jobs/${ev.job}/image/preview?n=${ev.n}`;
    }
  }
}

(async () => {
  try {
    const st = await api("api/state");
    presets = st.presets; knobs = st.knobs;
    $("preset").replaceChildren(...Object.keys(presets).map((n) => new Option(n, n)));
    onEvent({ type: "state", state: st });
  } catch (e) { showError(e.message); }
  const es = new EventSource("api/events");
  es.onmessage = (m) => onEvent(JSON.parse(m.data));
  es.onerror = () => { $("model-status").textContent = "reconnecting to the studio server…"; };
})();
