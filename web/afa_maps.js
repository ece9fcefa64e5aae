// ComfyUI-AFA: interactive viewer of recorded AFA weight maps inside "AFA Attention Preview".
// Data only: run info and uint8 maps come from GET /afa/maps/{run_id}[?step&point&branch&batch]
// (afa_nodes/nodes_maps.py). The run id is kept in node.properties so a saved and reloaded
// workflow fetches its maps again (while the server still holds them).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "AFAAttentionPreview";
const MAX_CACHE = 256;

const CSS = `
.afa-maps-viewer { display: flex; flex-direction: column; gap: 4px; padding: 4px; box-sizing: border-box;
  font: 12px sans-serif; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
  border-radius: 6px; width: 100%; height: 100%; overflow: hidden; }
.afa-maps-row { display: flex; align-items: center; gap: 6px; }
.afa-maps-row label { min-width: 44px; }
.afa-maps-row input[type=range] { flex: 1; min-width: 60px; }
.afa-maps-row .afa-maps-value { min-width: 90px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.afa-maps-viewer button { background: var(--comfy-menu-bg, #333); color: inherit; border: 1px solid var(--border-color, #555);
  border-radius: 4px; padding: 1px 8px; cursor: pointer; }
.afa-maps-viewer button.active { background: var(--p-primary-color, #2a6fdb); color: #fff; }
.afa-maps-canvas { image-rendering: pixelated; width: 100%; flex: 1 1 auto; min-height: 0; object-fit: contain; cursor: crosshair; }
.afa-maps-legend { display: flex; flex-wrap: wrap; gap: 2px 10px; }
.afa-maps-legend span.sw { display: inline-block; width: 10px; height: 10px; margin-right: 3px; border: 1px solid #0008; }
.afa-maps-status { color: var(--descrip-text, #999); min-height: 14px; }
`;

function addStyle() {
  if (document.getElementById("afa-maps-css")) return;
  const style = document.createElement("style");
  style.id = "afa-maps-css";
  style.textContent = CSS;
  document.head.appendChild(style);
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  children.forEach((c) => e.appendChild(c));
  return e;
}

function label(name) {
  return String(name).split(/[\\/]/).pop().replace(/\.(safetensors|ckpt|sft|pth|pt|bin)$/i, "");
}

function decode(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

function lut256(stops) {
  // stops: 17 RGB triples (every 16th entry of the server's colormap) -> 256 entries
  const lut = [];
  for (let i = 0; i < 256; i++) {
    const f = (i / 255) * (stops.length - 1), a = Math.floor(f), b = Math.min(a + 1, stops.length - 1), t = f - a;
    lut.push([0, 1, 2].map((c) => Math.round(stops[a][c] * (1 - t) + stops[b][c] * t)));
  }
  return lut;
}

class MapsViewer {
  constructor(node) {
    this.node = node;
    this.info = null;
    this.cache = new Map();
    this.current = null;  // the payload on screen
    this.request = 0;
    addStyle();
    this.root = el("div", { class: "afa-maps-viewer", "data-status": "empty" });
    this.status = el("div", { class: "afa-maps-status", text: "Queue the workflow to record maps." });
    this.pointSlider = el("input", { type: "range", class: "afa-maps-point", min: "0", max: "0", value: "0" });
    this.pointValue = el("span", { class: "afa-maps-value" });
    this.stepSlider = el("input", { type: "range", class: "afa-maps-step", min: "0", max: "0", value: "0" });
    this.stepValue = el("span", { class: "afa-maps-value" });
    this.branchButtons = ["cond", "uncond"].map((b) =>
      el("button", { class: "afa-maps-branch", "data-branch": b, text: b }));
    this.batchInput = el("input", { type: "number", class: "afa-maps-batch", min: "0", value: "0", style: "width:48px" });
    this.modeSelect = el("select", { class: "afa-maps-mode" });
    this.canvas = el("canvas", { class: "afa-maps-canvas", width: "256", height: "256" });
    this.legend = el("div", { class: "afa-maps-legend" });
    this.readout = el("div", { class: "afa-maps-readout" });
    this.root.append(
      el("div", { class: "afa-maps-row" }, el("label", { text: "point" }), this.pointSlider, this.pointValue),
      el("div", { class: "afa-maps-row" }, el("label", { text: "step" }), this.stepSlider, this.stepValue),
      el("div", { class: "afa-maps-row" }, ...this.branchButtons, el("label", { text: "image" }), this.batchInput,
        el("label", { text: "show" }), this.modeSelect),
      this.canvas, this.legend, this.readout, this.status);
    this.pointSlider.addEventListener("input", () => this.changed());
    this.stepSlider.addEventListener("input", () => this.changed());
    this.batchInput.addEventListener("change", () => this.changed());
    this.modeSelect.addEventListener("change", () => { this.view.mode = this.modeSelect.value; this.save(); this.draw(); });
    this.branchButtons.forEach((b) => b.addEventListener("click", () => { this.view.branch = b.dataset.branch; this.changed(); }));
    this.canvas.addEventListener("mousemove", (e) => this.hover(e));
    this.canvas.addEventListener("mouseleave", () => this.hover(null));
    // keep the graph from panning/zooming while using the controls
    for (const ev of ["pointerdown", "wheel"]) this.root.addEventListener(ev, (e) => e.stopPropagation());
  }

  get view() {
    const p = this.node.properties || (this.node.properties = {});
    return (p.afa_view = p.afa_view || { point: null, step: null, branch: "cond", batch_index: 0, mode: "dominant" });
  }

  save() {
    this.root.dataset.point = this.view.point ?? "";
    this.root.dataset.step = this.view.step ?? "";
    this.root.dataset.branch = this.view.branch;
    this.root.dataset.mode = this.view.mode;
    // node.properties changed: let the frontend's change tracker see it, so the view is
    // saved with the workflow (and in the tab restored after a reload)
    clearTimeout(this.persistTimer);
    this.persistTimer = setTimeout(() => {
      try { app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.(); } catch (e) { /* older frontend */ }
    }, 300);
  }

  setStatus(state, text) {
    this.root.dataset.status = state;
    this.status.textContent = text || "";
  }

  // A new run from the node's UI output ({ui: {afa_maps: [info]}}).
  showRun(info) {
    this.node.properties.afa_run_id = info.run_id;  // saved with the workflow
    if (info.view) Object.assign(this.view, { point: info.view.point, step: info.view.step,
                                              branch: info.view.branch, batch_index: info.view.batch_index });
    this.cache.clear();
    this.setInfo(info);
  }

  // After loading a saved workflow: fetch the run again by its id.
  async restore() {
    const id = this.node.properties?.afa_run_id;
    if (!id) return;
    this.setStatus("loading", "Loading maps...");
    try {
      const res = await api.fetchApi(`/afa/maps/${encodeURIComponent(id)}`);
      const body = await res.json();
      if (!res.ok) return this.setStatus("gone", body.error || `HTTP ${res.status}`);
      this.setInfo(body);
    } catch (e) {
      this.setStatus("error", `Cannot reach the AFA maps endpoint: ${e}`);
    }
  }

  setInfo(info) {
    this.info = info;
    this.root.dataset.runId = info.run_id;
    this.lut = lut256(info.colormap);
    const v = this.view;
    const pi = Math.max(0, info.points.indexOf(v.point));
    const si = v.step == null || info.steps.indexOf(v.step) < 0 ? info.steps.length - 1 : info.steps.indexOf(v.step);
    this.pointSlider.max = String(info.points.length - 1);
    this.pointSlider.value = String(pi);
    this.stepSlider.max = String(info.steps.length - 1);
    this.stepSlider.value = String(Math.max(0, si));
    this.batchInput.max = String(info.batch - 1);
    this.batchInput.value = String(Math.min(v.batch_index || 0, info.batch - 1));
    this.batchInput.disabled = info.batch <= 1;
    if (!info.branches.includes(v.branch)) v.branch = info.branches[0] || "cond";
    this.branchButtons.forEach((b) => { b.disabled = !info.branches.includes(b.dataset.branch); });
    this.modeSelect.replaceChildren(el("option", { value: "dominant", text: "dominant model" }),
      ...info.models.map((m, i) => el("option", { value: String(i), text: `weight of ${label(m)}` })));
    if (v.mode !== "dominant" && !(Number(v.mode) < info.models.length)) v.mode = "dominant";
    this.modeSelect.value = String(v.mode);
    this.changed();
  }

  changed() {
    const info = this.info;
    if (!info) return;
    const v = this.view;
    v.point = info.points[Number(this.pointSlider.value)];
    v.step = info.steps[Number(this.stepSlider.value)];
    v.batch_index = Math.max(0, Math.min(Number(this.batchInput.value) || 0, info.batch - 1));
    this.pointValue.textContent = v.point;
    const sigma = info.sigmas ? info.sigmas[Number(this.stepSlider.value)] : null;
    this.stepValue.textContent = `${v.step}` + (sigma != null ? ` (sigma ${sigma.toPrecision(3)})` : "");
    this.branchButtons.forEach((b) => b.classList.toggle("active", b.dataset.branch === v.branch));
    this.save();
    this.load();
  }

  async load() {
    const v = this.view, id = this.info.run_id;
    const q = `step=${v.step}&point=${encodeURIComponent(v.point)}&branch=${v.branch}&batch=${v.batch_index}`;
    const ticket = ++this.request;
    let payload = this.cache.get(q);
    if (!payload) {
      this.setStatus("loading", "Loading map...");
      try {
        const res = await api.fetchApi(`/afa/maps/${encodeURIComponent(id)}?${q}`);
        const body = await res.json();
        if (!res.ok) return ticket === this.request && this.setStatus(res.status === 404 ? "gone" : "error", body.error);
        payload = { ...body, bytes: decode(body.data), key: q };
        if (this.cache.size >= MAX_CACHE) this.cache.delete(this.cache.keys().next().value);
        this.cache.set(q, payload);
      } catch (e) {
        return ticket === this.request && this.setStatus("error", `Cannot load the map: ${e}`);
      }
    }
    if (ticket !== this.request) return;  // a newer request is on its way
    this.current = payload;
    this.draw();
    const notes = this.info.notes?.length ? ` Note: ${this.info.notes.join(" ")}` : "";
    this.setStatus("ready", `run ${id}, ${this.info.models.length} models, ${payload.shape[1]}x${payload.shape[2]} map.${notes}`);
  }

  draw() {
    const p = this.current, info = this.info;
    if (!p) return;
    const [n, h, w] = p.shape, d = p.bytes, mode = this.view.mode;
    const img = new ImageData(w, h);
    let checksum = 0;
    for (let i = 0; i < h * w; i++) {
      let rgb;
      if (mode === "dominant") {
        let best = 0;
        for (let k = 1; k < n; k++) if (d[k * h * w + i] > d[best * h * w + i]) best = k;
        rgb = info.palette[best];
      } else {
        rgb = this.lut[d[Number(mode) * h * w + i]];
      }
      img.data.set([rgb[0], rgb[1], rgb[2], 255], i * 4);
      checksum = (checksum * 31 + rgb[0] * 7 + rgb[1] * 3 + rgb[2]) % 1000000007;
    }
    const off = new OffscreenCanvas(w, h);
    off.getContext("2d").putImageData(img, 0, 0);
    const scale = Math.max(1, Math.floor(512 / Math.max(w, h)));
    this.canvas.width = w * scale;
    this.canvas.height = h * scale;
    const ctx = this.canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, w * scale, h * scale);
    this.canvas.dataset.mapKey = `${p.key}&mode=${mode}`;
    this.canvas.dataset.checksum = String(checksum);
    this.legend.replaceChildren(...info.models.map((m, k) => {
      const sw = el("span", { class: "sw", style: `background: rgb(${info.palette[k].join(",")})` });
      return el("span", { "data-model": String(k), text: "" }, sw,
        document.createTextNode(`${label(m)}: mean ${p.mean[k].toFixed(2)}`));
    }));
    this.hover(null);
  }

  // Each model's weight at the pixel under the mouse.
  hover(e) {
    const p = this.current;
    if (!p || !e) { this.readout.textContent = p ? "Hover the map to read each model's weight." : ""; return; }
    const [n, h, w] = p.shape, r = this.canvas.getBoundingClientRect();
    // the canvas keeps its aspect ratio inside its box (object-fit: contain)
    const s = Math.min(r.width / w, r.height / h), ox = (r.width - w * s) / 2, oy = (r.height - h * s) / 2;
    const x = Math.floor((e.clientX - r.left - ox) / s), y = Math.floor((e.clientY - r.top - oy) / s);
    if (x < 0 || y < 0 || x >= w || y >= h) return this.hover(null);
    const parts = this.info.models.map((m, k) => `${label(m)} ${(p.bytes[k * h * w + y * w + x] / 255).toFixed(2)}`);
    this.readout.textContent = `(${x}, ${y}): ${parts.join(" | ")}`;
    this.readout.dataset.x = String(x);
    this.readout.dataset.y = String(y);
  }
}

app.registerExtension({
  name: "ComfyUI-AFA.maps",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      this.properties = this.properties || {};
      this.afaViewer = new MapsViewer(this);
      const widget = this.addDOMWidget("afa_maps_viewer", "afa_maps_viewer", this.afaViewer.root, {
        serialize: false, hideOnZoom: false, getMinHeight: () => 360,
      });
      widget.serialize = false;  // keep it out of saved widgets_values too, not only the API prompt
      this.setSize([Math.max(this.size[0], 380), Math.max(this.size[1], 560)]);
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const info = message?.afa_maps?.[0];
      if (info && this.afaViewer) this.afaViewer.showRun(info);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      if (this.afaViewer) setTimeout(() => this.afaViewer.restore(), 0);
      return r;
    };
  },
});
