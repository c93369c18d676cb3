// The console's front end: every action is a call to the /v1 API with the session cookie and the CSRF header.
"use strict";

const CSRF = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const I18N = () => { const el = $("#i18n"); return el ? JSON.parse(el.innerHTML) : {}; };

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

class ApiError extends Error {}

async function api(path, {method = "GET", json, form} = {}) {
  const headers = {"X-CSRF-Token": CSRF()};
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form !== undefined) body = form;
  const r = await fetch(path, {method, headers, body, credentials: "same-origin"});
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!r.ok) throw new ApiError((data && data.error && data.error.message) || `${r.status} ${r.statusText}`);
  return {data, headers: r.headers};
}

function showError(el, err) {
  el.innerHTML = `<p class="alert error" role="alert">${esc(err.message || err)}</p>`;
}

function formValues(form) {
  const out = {};
  for (const [k, v] of new FormData(form).entries()) if (v !== "") out[k] = v;
  return out;
}

function numbers(obj, keys) {
  for (const k of keys) if (obj[k] !== undefined) obj[k] = Number(obj[k]);
  return obj;
}

// ---------------------------------------------------------------- result card: price, cost, generation, watermark, C2PA

async function showInfo(el, requestId) {
  const L = I18N();
  try {
    const {data} = await api(`/console/api/requests/${encodeURIComponent(requestId)}`);
    const gens = data.generations.map(g => {
      const wm = g.watermark ? (g.watermark.method || g.watermark.scheme || "yes") : "—";
      return `<li><a href="/console/generations/${esc(g.id)}" class="gen-link">${esc(g.id)}</a>
        · ${esc(L.watermark)}: <b>${esc(wm)}</b> · ${esc(L.c2pa)}: <b class="c2pa">${(g.filters || []).includes("c2pa") ? "signed" : "—"}</b>
        · <a href="/console/generations/${esc(g.id)}">${esc(L.explanation)}</a></li>`;
    }).join("");
    el.innerHTML = `<dl class="facts"><dt>${esc(L.price)}</dt><dd class="price">$${data.price.toFixed(6)}</dd>
      <dt>${esc(L.compute_cost)}</dt><dd>$${data.compute_cost.toFixed(6)} (${data.compute_s.toFixed(2)} s)</dd></dl>
      <ul class="gens">${gens}</ul>`;
  } catch (e) { showError(el, e); }
}

// ---------------------------------------------------------------- playground

async function streamText(path, body, onDelta) {
  const r = await fetch(path, {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": CSRF()}, body: JSON.stringify({...body, stream: true})});
  if (!r.ok) {
    let msg = `${r.status}`;
    try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
    throw new ApiError(msg);
  }
  const rid = r.headers.get("x-request-id");
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
      for (const line of chunk.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") continue;
        const ev = JSON.parse(payload);
        if (ev.error) throw new ApiError(ev.error.message);
        onDelta(ev);
      }
    }
  }
  return rid;
}

function sampling(v) {
  const out = {model: v.model, temperature: Number(v.temperature ?? 0.8), top_p: Number(v.top_p ?? 1), max_tokens: Number(v.max_tokens ?? 64)};
  if (v.seed !== undefined) out.seed = Number(v.seed);
  return out;
}

function initPlayground() {
  const tabs = $$(".tabs [data-tab]");
  if (!tabs.length) return;
  tabs.forEach(b => b.addEventListener("click", () => {
    tabs.forEach(x => x.classList.toggle("on", x === b));
    $$(".tab-panel").forEach(p => { p.hidden = p.dataset.panel !== b.dataset.tab; });
  }));
  const L = I18N();
  const history = [];
  $("#chat-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const v = formValues(ev.target);
    const log = $("#chat-log"), info = $("#chat-info");
    const messages = [];
    if (v.system) messages.push({role: "system", content: v.system});
    history.push({role: "user", content: v.prompt});
    log.insertAdjacentHTML("beforeend", `<div class="msg user"><b>user</b><p>${esc(v.prompt)}</p></div>`);
    const bubble = document.createElement("div");
    bubble.className = "msg assistant streaming";
    bubble.innerHTML = `<b>assistant</b><p class="answer"></p>`;
    log.appendChild(bubble);
    info.textContent = L.working;
    ev.target.prompt.value = "";
    let text = "";
    try {
      const rid = await streamText("/v1/chat/completions", {...sampling(v), messages: [...messages, ...history]}, e => {
        const d = e.choices && e.choices[0] && e.choices[0].delta;
        if (d && d.content) { text += d.content; $(".answer", bubble).textContent = text; }
      });
      history.push({role: "assistant", content: text});
      bubble.classList.remove("streaming");
      await showInfo(info, rid);
    } catch (e) { bubble.remove(); history.pop(); showError(info, e); }
  });

  // completion, with the prompt templates' fields as a form
  const tpls = JSON.parse($("#templates").textContent);
  const sel = $("#template-select"), fields = $("#template-fields");
  tpls.forEach(t => sel.insertAdjacentHTML("beforeend", `<option value="${esc(t.name)}">${esc(t.name)} — ${esc(t.description)}</option>`));
  sel.addEventListener("change", () => {
    const t = tpls.find(x => x.name === sel.value);
    fields.innerHTML = t ? t.variables.map(v => v.choices
      ? `<label>${esc(v.name)}<select data-var="${esc(v.name)}">${v.choices.map(c => `<option ${c === v.default ? "selected" : ""}>${esc(c)}</option>`).join("")}</select></label>`
      : `<label>${esc(v.name)}${v.required ? " *" : ""}<input data-var="${esc(v.name)}" value="${esc(v.default ?? "")}" placeholder="${esc(v.description || "")}"></label>`).join("") : "";
    fields.oninput = fillTemplate;
    fillTemplate();
  });
  async function fillTemplate() {
    if (!sel.value) return;
    const q = new URLSearchParams();
    $$("[data-var]", fields).forEach(i => q.set(i.dataset.var, i.value));
    const r = await fetch(`/console/api/templates/${encodeURIComponent(sel.value)}/render?${q}`, {credentials: "same-origin"});
    const d = await r.json();
    const form = $("#completion-form");
    if (r.ok) {
      form.prompt.value = d.prompt;
      if (d.sampling.max_new_tokens) form.max_tokens.value = d.sampling.max_new_tokens;
      if (d.sampling.temperature !== undefined) form.temperature.value = d.sampling.temperature;
      form.dataset.stop = JSON.stringify(d.sampling.stop || []);
    } else { form.prompt.value = ""; form.prompt.placeholder = d.error; }
  }
  $("#completion-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const v = formValues(ev.target), out = $("#completion-out"), info = $("#completion-info");
    out.textContent = ""; info.textContent = L.working;
    const body = {...sampling(v), prompt: v.prompt};
    const stop = JSON.parse(ev.target.dataset.stop || "[]");
    if (stop.length) body.stop = stop;
    try {
      const rid = await streamText("/v1/completions", body, e => { if (e.choices && e.choices[0]) out.textContent += e.choices[0].text || ""; });
      await showInfo(info, rid);
    } catch (e) { showError(info, e); }
  });

  $("#image-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const v = numbers(formValues(ev.target), ["n", "seed", "steps", "guidance"]);
    const out = $("#image-out"), info = $("#image-info");
    out.innerHTML = ""; info.textContent = L.working;
    try {
      const {data, headers} = await api("/v1/images/generations", {method: "POST", json: v});
      out.innerHTML = data.data.map(d => `<figure><img src="${esc(d.url)}" alt="${esc(d.revised_prompt || v.prompt)}"><figcaption>${esc(d.revised_prompt || "")}</figcaption></figure>`).join("");
      await showInfo(info, headers.get("x-request-id"));
    } catch (e) { showError(info, e); }
  });

  for (const kind of ["music", "video"]) {
    $(`#${kind}-form`).addEventListener("submit", async ev => {
      ev.preventDefault();
      const v = numbers(formValues(ev.target), ["bars", "tempo", "seed", "seconds", "fps", "scenes"]);
      const status = $(`#${kind}-status`), out = $(`#${kind}-out`), info = $(`#${kind}-info`);
      out.innerHTML = ""; info.innerHTML = "";
      try {
        let {data: job} = await api(ev.target.dataset.endpoint, {method: "POST", json: v});
        const t0 = Date.now();
        while (!["succeeded", "failed", "cancelled"].includes(job.status)) {
          status.innerHTML = `<div class="bar"><span style="width:${Math.min(95, (Date.now() - t0) / 600)}%"></span></div><small>${esc(L.progress)}: ${esc(job.status)} · ${((Date.now() - t0) / 1000).toFixed(0)} s</small>`;
          await new Promise(r => setTimeout(r, 1000));
          job = (await api(`/v1/jobs/${job.id}`)).data;
        }
        status.innerHTML = `<small>${esc(job.status)}</small>`;
        if (job.status !== "succeeded") throw new ApiError(job.error ? job.error.message : job.status);
        const files = job.result.files;
        const media = files.find(f => f.mime.startsWith(kind === "music" ? "audio/" : "video/"));
        out.innerHTML = kind === "music" ? `<audio controls src="${esc(media.url)}"></audio>` : `<video controls src="${esc(media.url)}"></video>`;
        out.insertAdjacentHTML("beforeend", `<ul class="files">${files.map(f => `<li><a href="${esc(f.url)}">${esc(f.name)}</a> (${f.bytes} B)</li>`).join("")}</ul>`);
        await showInfo(info, job.id);
      } catch (e) { showError(info, e); }
    });
  }
}

// ---------------------------------------------------------------- charts (uPlot)

function chart(el, x, series, {xIsTime = false, height = 260} = {}) {
  if (!el || !window.uPlot) return null;
  const colors = ["#2563eb", "#f97316", "#16a34a", "#dc2626", "#7c3aed"];
  const opts = {
    width: Math.max(320, el.clientWidth - 8), height,
    scales: {x: {time: xIsTime}},
    series: [{label: el.dataset.xlabel || ""}, ...series.map((s, i) => ({label: s.label, stroke: colors[i % colors.length], width: 2,
      spanGaps: true, points: {show: x.length < 60}}))],
    axes: [{}, {size: 60}],
  };
  el.innerHTML = "";
  return new uPlot(opts, [x, ...series.map(s => s.data)], el);
}

function initCharts() {
  $$("[data-chart]").forEach(el => {
    const d = JSON.parse(el.dataset.chart);
    const keys = el.dataset.series.split(",");
    const labels = (el.dataset.labels || el.dataset.series).split(",");
    const xKey = el.dataset.x;
    const x = xKey === "day" ? d.day.map(s => Date.parse(s + "T00:00:00Z") / 1000) : d[xKey];
    el._plot = chart(el, x, keys.map((k, i) => ({label: labels[i], data: d[k]})), {xIsTime: xKey === "day"});
  });
}

// ---------------------------------------------------------------- training

function prepReport(f) {
  const p = f.preparation || {}, rec = p.records || {};
  const drops = Object.entries(p.dropped || {}).filter(([, n]) => n).map(([k, n]) => `<li>${esc(k)}: ${n}</li>`).join("");
  const ex = Object.entries(p.examples || {}).map(([k, xs]) => `<li><b>${esc(k)}</b>: <code>${esc(JSON.stringify(xs).slice(0, 300))}</code></li>`).join("");
  return `<div class="alert ok" role="status"><b>${esc(f.filename)}</b> → <code>${esc(f.id)}</code> (${esc(f.kind)}):
    ${rec.read ?? "?"} read, ${rec.kept ?? "?"} kept (${rec.train ?? "?"} train / ${rec.val ?? "?"} val)
    ${drops ? `<ul>${drops}</ul>` : ""}${ex ? `<ul class="small">${ex}</ul>` : ""}</div>`;
}

function initTraining() {
  const up = $("#upload-form");
  if (up) up.addEventListener("submit", async ev => {
    ev.preventDefault();
    const out = $("#upload-result");
    const fd = new FormData(up);
    fd.set("purpose", "fine-tune");
    out.textContent = I18N().working || "…";
    try {
      const {data} = await api("/v1/files", {method: "POST", form: fd});
      out.innerHTML = prepReport(data);
      setTimeout(() => location.reload(), 1500);
    } catch (e) { showError(out, e); }
  });
  const jf = $("#job-form");
  if (jf) jf.addEventListener("submit", async ev => {
    ev.preventDefault();
    const v = formValues(jf), out = $("#job-result");
    const hp = {};
    for (const k of ["n_epochs", "batch_size", "learning_rate_multiplier"]) if (v[k] !== undefined) hp[k] = Number(v[k]);
    const body = {model: v.model, training_file: v.training_file, hyperparameters: hp, method: {type: v.method},
      finetuning_type: v.finetuning_type};
    if (v.validation_file) body.validation_file = v.validation_file;
    if (v.suffix) body.suffix = v.suffix;
    if (v.seed !== undefined) body.seed = Number(v.seed);
    try {
      const {data} = await api("/v1/fine_tuning/jobs", {method: "POST", json: body});
      location.href = `/console/training/${data.id}`;
    } catch (e) { showError(out, e); }
  });
  $$("[data-delete-file]").forEach(b => b.addEventListener("click", async () => {
    try { await api(`/v1/files/${b.dataset.deleteFile}`, {method: "DELETE"}); location.reload(); }
    catch (e) { showError($("#upload-result"), e); }
  }));
  const job = $("#job");
  if (!job) return;
  const id = job.dataset.id;
  const el = $("#loss-chart");
  const curve = {step: [], loss: [], val_loss: []};
  const L = JSON.parse(el.dataset.labels);
  const redraw = () => { el._plot = chart(el, curve.step, [{label: L[0], data: curve.loss}, {label: L[1], data: curve.val_loss}]); };
  const cancel = $("#cancel-job");
  if (cancel) cancel.addEventListener("click", async () => {
    try { await api(`/v1/fine_tuning/jobs/${id}/cancel`, {method: "POST"}); } catch (e) { showError($("#job-error"), e); }
  });
  const es = new EventSource(`/console/training/${id}/stream`);
  const list = $("#events");
  let pending = false;
  es.addEventListener("job", m => {
    const e = JSON.parse(m.data);
    list.insertAdjacentHTML("afterbegin", `<li class="${esc(e.level)}"><time>${esc(e.created_at.slice(11, 19))}</time> ${esc(e.message)}</li>`);
    if (e.type === "metrics" && e.data.step !== undefined) {
      curve.step.push(e.data.step); curve.loss.push(e.data.train_loss ?? null); curve.val_loss.push(e.data.valid_loss ?? null);
      $("#last-step").textContent = e.data.total_steps ? `${e.data.step} / ${e.data.total_steps}` : e.data.step;
      if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; redraw(); }); }
    }
  });
  es.addEventListener("end", m => {
    es.close();
    const s = JSON.parse(m.data).status;
    $("#job-status").textContent = s;
    $("#job-status").className = `pill ${s}`;
    if (job.dataset.finished !== "1") setTimeout(() => location.reload(), 800);  // to show the result's links
  });
}

// ---------------------------------------------------------------- keys and users; review decisions

function initKeys() {
  const kf = $("#key-form");
  if (kf) kf.addEventListener("submit", async ev => {
    ev.preventDefault();
    const v = formValues(kf), out = $("#key-result");
    const models = $$("option:checked", kf.allowed_models).map(o => o.value);
    const body = {user: v.user, name: v.name || ""};
    if (models.length) body.allowed_models = models;
    if (v.expires_in_days) body.expires_in_days = Number(v.expires_in_days);
    try {
      const {data} = await api("/v1/organization/keys", {method: "POST", json: body});
      out.innerHTML = `<div class="alert ok" role="status"><p>${esc(out.dataset.once)}</p><code class="secret" id="new-secret">${esc(data.api_key)}</code></div>`;
    } catch (e) { showError(out, e); }
  });
  $$("[data-revoke]").forEach(b => b.addEventListener("click", async () => {
    try { await api(`/v1/organization/keys/${b.dataset.revoke}`, {method: "DELETE"}); location.reload(); }
    catch (e) { showError($("#key-result"), e); }
  }));
  const uf = $("#user-form");
  if (uf) uf.addEventListener("submit", async ev => {
    ev.preventDefault();
    try { await api("/v1/organization/users", {method: "POST", json: formValues(uf)}); location.reload(); }
    catch (e) { showError($("#user-result"), e); }
  });
  // a flagged generation goes into the queue as a complaint (the same API as anyone's), then is decided there
  $$("[data-review-generation]").forEach(b => b.addEventListener("click", async () => {
    const id = b.dataset.reviewGeneration;
    try {
      await api("/v1/complaints", {method: "POST", json: {generation_id: id, reason: `flagged by moderation: ${b.dataset.reason}`}});
      location.href = "/console/review?status=open";
    } catch (e) { showError($(`#flag-${CSS.escape(id)}`), e); }
  }));
  $$("[data-decide]").forEach(b => b.addEventListener("click", async () => {
    const id = b.dataset.decide, note = ($(`#note-${id}`) || {}).value || "";
    try {
      await api(`/v1/complaints/${id}/decision`, {method: "POST", json: {action: b.dataset.action, note}});
      location.reload();
    } catch (e) { showError($(`#decision-${id}`), e); }
  }));
}

document.addEventListener("DOMContentLoaded", () => { initPlayground(); initCharts(); initTraining(); initKeys(); });
