// segany annotation page: plain JavaScript, no build step, talks to the /v1 API of this server.
// Masks travel as COCO compressed RLE and are painted straight from their runs.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const els = {
    file: $("file-input"), stage: $("stage"), hint: $("drop-hint"), wrap: $("canvas-wrap"),
    image: $("image-canvas"), mask: $("mask-canvas"), ui: $("ui-canvas"),
    objects: $("objects"), candidates: $("candidates"), status: $("status"), timing: $("timing"),
    undo: $("undo"), redo: $("redo"), everything: $("everything"), pps: $("pps"),
    showEverything: $("show-everything"), adopt: $("adopt"), newObject: $("new-object"),
    exportCoco: $("export-coco"), exportPolygons: $("export-polygons"),
    exportLabels: $("export-labels"), exportMask: $("export-mask"), zoomIn: $("zoom-in"),
  };

  // ------------------------------------------------------------------ state
  const S = {
    image: null, // {id, width, height, fileName, file, bitmap}
    objects: [], // {id, name, category, color, points: [[x, y, label]], box, masks, selected}
    active: -1,
    nextId: 1,
    everything: [],
    showEverything: true,
    hideMasks: false,
    busy: 0,
    lastRoundTripMs: null,
    lastDecodeMs: null,
  };
  const undoStack = [];
  const redoStack = [];
  let saved = null; // snapshot of the current (recorded) state
  let requestSeq = 0;
  let scale = 1;

  function snapshot() {
    // Zoom-in's low-res logits stay out of the undo history (hundreds of KB per step).
    const drop = (key, value) => (key === "logits" ? undefined : value);
    return JSON.stringify({ objects: S.objects, active: S.active, nextId: S.nextId }, drop);
  }

  /** Records the current state as one undoable step (if anything changed). */
  function record() {
    const now = snapshot();
    if (now === saved) return;
    if (saved !== null) {
      undoStack.push(saved);
      if (undoStack.length > 200) undoStack.shift();
    }
    saved = now;
    redoStack.length = 0;
    updateButtons();
  }

  function restore(text) {
    const data = JSON.parse(text);
    S.objects = data.objects;
    S.active = data.active;
    S.nextId = data.nextId;
    requestSeq++; // answers to earlier requests no longer apply
    renderAll();
  }

  function undo() {
    if (!undoStack.length) return;
    redoStack.push(saved);
    saved = undoStack.pop();
    restore(saved);
  }

  function redo() {
    if (!redoStack.length) return;
    undoStack.push(saved);
    saved = redoStack.pop();
    restore(saved);
  }

  function resetHistory() {
    undoStack.length = 0;
    redoStack.length = 0;
    saved = snapshot();
    updateButtons();
  }

  // ------------------------------------------------------------------ colours
  function paletteColor(k) {
    const h = (0.13 + k * 0.618033988749895) % 1.0;
    const s = k % 2 === 0 ? 0.85 : 0.65;
    const v = Math.floor(k / 2) % 2 === 0 ? 0.95 : 0.8;
    const i = Math.floor(h * 6), f = h * 6 - i;
    const p = v * (1 - s), q = v * (1 - f * s), t = v * (1 - (1 - f) * s);
    const [r, g, b] = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
    return "#" + [r, g, b].map((c) => Math.round(c * 255).toString(16).padStart(2, "0")).join("");
  }

  function hexToRgb(hex) {
    const n = parseInt(hex.slice(1), 16);
    return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  }

  // ------------------------------------------------------------------ RLE
  /** COCO compressed RLE counts string -> run lengths (zeros first, column-major). */
  function rleCounts(s) {
    const counts = [];
    let p = 0;
    while (p < s.length) {
      let x = 0, k = 0, more = 1;
      while (more) {
        const c = s.charCodeAt(p) - 48;
        x |= (c & 0x1f) << (5 * k);
        more = c & 0x20;
        p++;
        k++;
        if (!more && (c & 0x10)) x |= -1 << (5 * k);
      }
      if (counts.length > 2) x += counts[counts.length - 2];
      counts.push(x);
    }
    return counts;
  }

  const countsCache = new Map();
  function runsOf(rle) {
    let runs = countsCache.get(rle.counts);
    if (!runs) {
      runs = rleCounts(rle.counts);
      if (countsCache.size > 500) countsCache.clear();
      countsCache.set(rle.counts, runs);
    }
    return runs;
  }

  /** Paints the set pixels of an RLE into an RGBA buffer of the image's size. */
  function paintRle(buf, w, h, rle, rgb, alpha) {
    const runs = runsOf(rle);
    let idx = 0;
    for (let i = 0; i < runs.length; i++) {
      const n = runs[i];
      if (i & 1) {
        for (let j = idx, end = idx + n; j < end; j++) {
          const x = (j / h) | 0;
          const o = ((j - x * h) * w + x) * 4;
          buf[o] = rgb[0];
          buf[o + 1] = rgb[1];
          buf[o + 2] = rgb[2];
          buf[o + 3] = alpha;
        }
      }
      idx += n;
    }
  }

  // ------------------------------------------------------------------ API
  async function api(path, opts = {}, retried = false) {
    const headers = Object.assign({}, opts.headers || {});
    const key = sessionStorage.getItem("segany-api-key");
    if (key) headers["X-API-Key"] = key;
    const res = await fetch(path, Object.assign({}, opts, { headers }));
    if (res.status === 401 && !retried) {
      const given = window.prompt("This server needs an API key:");
      if (given) {
        sessionStorage.setItem("segany-api-key", given);
        return api(path, opts, true);
      }
    }
    return res;
  }

  async function errorText(res) {
    try {
      const body = await res.json();
      if (typeof body.detail === "string") return body.detail;
      if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
      return JSON.stringify(body);
    } catch (_) {
      return `${res.status} ${res.statusText}`;
    }
  }

  async function postJson(path, body) {
    return api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  function setStatus(text, isError = false) {
    els.status.textContent = text;
    els.status.classList.toggle("error", isError);
  }

  function busy(delta) {
    S.busy += delta;
    document.body.dataset.busy = S.busy > 0 ? "1" : "0";
  }

  // ------------------------------------------------------------------ image
  async function openFile(file) {
    if (!file) return;
    if (!file.type.startsWith("image/")) {
      setStatus(`${file.name} is not an image`, true);
      return;
    }
    setStatus(`Loading ${file.name}…`);
    let bitmap;
    try {
      bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    } catch (err) {
      setStatus(`cannot display ${file.name}: ${err.message || err}`, true);
      return;
    }
    S.image = { id: null, width: bitmap.width, height: bitmap.height, fileName: file.name, file, bitmap };
    S.objects = [];
    S.active = -1;
    S.nextId = 1;
    S.everything = [];
    requestSeq++;
    document.body.dataset.ready = "0";
    setupCanvases();
    renderAll();
    resetHistory();
    setStatus(`Encoding ${file.name}…`);
    busy(1);
    try {
      const started = performance.now();
      await uploadImage();
      const ms = performance.now() - started;
      setStatus(`Ready (${S.image.width} × ${S.image.height}): click to segment.`);
      els.timing.textContent = `upload + encode ${ms.toFixed(0)} ms`;
      document.body.dataset.ready = "1";
    } catch (err) {
      setStatus(err.message, true);
    } finally {
      busy(-1);
      updateButtons();
    }
  }

  async function uploadImage() {
    const form = new FormData();
    form.append("file", S.image.file, S.image.fileName);
    const res = await api("/v1/images", { method: "POST", body: form });
    if (!res.ok) throw new Error(`upload failed: ${await errorText(res)}`);
    const info = await res.json();
    S.image.id = info.id;
    if (info.width !== S.image.width || info.height !== S.image.height) {
      // The server's upright size is the coordinate frame of every prompt and mask.
      S.image.width = info.width;
      S.image.height = info.height;
      setupCanvases();
    }
  }

  function setupCanvases() {
    const { width: w, height: h } = S.image;
    for (const c of [els.image, els.mask, els.ui]) {
      c.width = w;
      c.height = h;
    }
    els.image.getContext("2d").drawImage(S.image.bitmap, 0, 0, w, h);
    els.hint.hidden = true;
    els.wrap.hidden = false;
    fitCanvases();
  }

  function fitCanvases() {
    if (!S.image) return;
    const box = els.stage.getBoundingClientRect();
    // Fit the stage; small images are enlarged (at most 4x) so that they can be clicked.
    scale = Math.min(4, (box.width - 20) / S.image.width, (box.height - 20) / S.image.height);
    scale = Math.max(scale, 0.05);
    const w = `${Math.round(S.image.width * scale)}px`, h = `${Math.round(S.image.height * scale)}px`;
    for (const c of [els.image, els.mask, els.ui]) {
      c.style.width = w;
      c.style.height = h;
    }
    drawUi();
  }

  // ------------------------------------------------------------------ objects
  function activeObject() {
    return S.active >= 0 ? S.objects[S.active] : null;
  }

  function newObject(select = true) {
    const k = S.nextId++;
    const obj = {
      id: k, name: `object ${k}`, category: "object", color: paletteColor(k - 1),
      points: [], box: null, masks: [], selected: 0,
    };
    S.objects.push(obj);
    if (select) S.active = S.objects.length - 1;
    return obj;
  }

  function deleteActive() {
    if (S.active < 0) return;
    S.objects.splice(S.active, 1);
    S.active = Math.min(S.active, S.objects.length - 1);
    record();
    renderAll();
  }

  function clearActive() {
    const obj = activeObject();
    if (!obj) return;
    obj.points = [];
    obj.box = null;
    obj.masks = [];
    obj.logits = null;
    obj.selected = 0;
    requestSeq++;
    record();
    renderAll();
  }

  function selectObject(i) {
    if (i < 0 || i >= S.objects.length || i === S.active) return;
    S.active = i;
    record();
    renderAll();
  }

  function selectCandidate(k) {
    const obj = activeObject();
    if (!obj || k < 0 || k >= obj.masks.length || k === obj.selected) return;
    obj.selected = k;
    record();
    renderAll();
  }

  async function addPrompt(prompt) {
    if (!S.image || !S.image.id) return;
    let obj = activeObject();
    if (!obj) obj = newObject();
    if (prompt.point) obj.points.push(prompt.point);
    if (prompt.box) obj.box = prompt.box;
    drawUi();
    await predict(obj);
  }

  async function predict(obj) {
    const seq = ++requestSeq;
    const body = {
      points: obj.points.map((p) => [p[0], p[1]]),
      labels: obj.points.map((p) => p[2]),
      box: obj.box,
      // SAM's advice: three candidates for one ambiguous click, one mask once prompts agree.
      multimask_output: obj.points.length === 1 && !obj.box,
    };
    if (els.zoomIn.checked) {
      // Zoom-in refines on a crop around the previous answer: send the chosen candidate's
      // low-res logits when that answer had exactly the prompts before this click.
      body.zoom_in = true;
      body.return_low_res_logits = true;
      const prev = obj.logits;
      if (prev && prev.points === obj.points.length - 1 && prev.box === !!obj.box) {
        body.mask_input = prev.all[Math.min(obj.selected, prev.all.length - 1)];
        // ... and the crop it was refined on, whose encoding the server may still hold.
        if (prev.crop) body.zoom_crop = prev.crop;
      }
    }
    busy(1);
    const started = performance.now();
    try {
      let res = await postJson(`/v1/images/${S.image.id}/predict`, body);
      if (res.status === 404) {
        setStatus("Image left the server's cache: uploading it again…");
        await uploadImage();
        res = await postJson(`/v1/images/${S.image.id}/predict`, body);
      }
      if (!res.ok) throw new Error(await errorText(res));
      const out = await res.json();
      if (seq !== requestSeq || !S.objects.includes(obj)) return; // a newer request owns the view
      obj.masks = out.masks;
      obj.selected = out.best;
      obj.logits = out.low_res_logits
        ? { points: obj.points.length, box: !!obj.box, all: out.low_res_logits, crop: out.zoom_crop }
        : null;
      renderAll();
      S.lastRoundTripMs = performance.now() - started;
      S.lastDecodeMs = out.decode_ms;
      els.timing.textContent =
        `mask in ${S.lastRoundTripMs.toFixed(0)} ms (model ${out.decode_ms.toFixed(0)} ms)`;
      setStatus(`${obj.name}: predicted IoU ${out.masks[out.best].score.toFixed(3)}`);
    } catch (err) {
      if (seq === requestSeq) setStatus(`prediction failed: ${err.message}`, true);
    } finally {
      busy(-1);
      if (seq === requestSeq) record();
    }
  }

  // ------------------------------------------------------------------ segment everything
  async function segmentEverything() {
    if (!S.image || !S.image.id) return;
    busy(1);
    setStatus("Segmenting everything…");
    const started = performance.now();
    try {
      const body = { points_per_side: Number(els.pps.value) };
      let res = await postJson(`/v1/images/${S.image.id}/everything`, body);
      if (res.status === 404) {
        await uploadImage();
        res = await postJson(`/v1/images/${S.image.id}/everything`, body);
      }
      if (!res.ok) throw new Error(await errorText(res));
      const out = await res.json();
      S.everything = out.masks;
      S.showEverything = true;
      els.showEverything.checked = true;
      renderMasks();
      const ms = performance.now() - started;
      setStatus(`Segment everything: ${out.masks.length} masks.`);
      els.timing.textContent = `segment everything in ${ms.toFixed(0)} ms`;
    } catch (err) {
      setStatus(`segment everything failed: ${err.message}`, true);
    } finally {
      busy(-1);
      updateButtons();
    }
  }

  function adoptEverything() {
    if (!S.everything.length) return;
    for (const m of S.everything) {
      const obj = newObject(false);
      obj.masks = [{ segmentation: m.segmentation, score: m.predicted_iou, area: m.area, bbox: m.bbox }];
    }
    S.everything = [];
    if (S.active < 0) S.active = 0;
    record();
    renderAll();
  }

  // ------------------------------------------------------------------ rendering
  function renderAll() {
    renderMasks();
    drawUi();
    renderObjects();
    renderCandidates();
    updateButtons();
  }

  function renderMasks() {
    const ctx = els.mask.getContext("2d");
    if (!S.image) return;
    const { width: w, height: h } = S.image;
    const img = ctx.createImageData(w, h);
    const buf = img.data;
    if (!S.hideMasks) {
      if (S.showEverything) {
        S.everything.forEach((m, k) => paintRle(buf, w, h, m.segmentation, hexToRgb(paletteColor(k + 7)), 90));
      }
      // The selected object is painted last, so that it is never hidden by another one.
      const order = S.objects.map((_, i) => i).filter((i) => i !== S.active);
      if (S.active >= 0) order.push(S.active);
      for (const i of order) {
        const obj = S.objects[i];
        const m = obj.masks[obj.selected];
        if (m) paintRle(buf, w, h, m.segmentation, hexToRgb(obj.color), i === S.active ? 150 : 115);
      }
    }
    ctx.putImageData(img, 0, 0);
    let painted = 0;
    for (let o = 3; o < buf.length; o += 4) if (buf[o]) painted++;
    document.body.dataset.maskPixels = String(painted);
  }

  let drag = null; // {x0, y0, x1, y1} while drawing a box

  function drawUi() {
    const ctx = els.ui.getContext("2d");
    if (!S.image) return;
    ctx.clearRect(0, 0, els.ui.width, els.ui.height);
    const px = 1 / scale; // one screen pixel in image pixels
    const obj = activeObject();
    if (obj && obj.box) strokeBox(ctx, obj.box, "#4c9aff", 2 * px, []);
    if (drag) strokeBox(ctx, [drag.x0, drag.y0, drag.x1, drag.y1], "#ffffff", 1.5 * px, [6 * px, 4 * px]);
    if (obj) {
      for (const [x, y, label] of obj.points) {
        ctx.beginPath();
        ctx.arc(x, y, 5 * px, 0, 2 * Math.PI);
        ctx.fillStyle = label === 1 ? "#19c37d" : "#ff4d4f";
        ctx.fill();
        ctx.lineWidth = 1.5 * px;
        ctx.strokeStyle = "#ffffff";
        ctx.stroke();
      }
    }
  }

  function strokeBox(ctx, b, color, width, dash) {
    ctx.save();
    ctx.setLineDash(dash);
    ctx.lineWidth = width;
    ctx.strokeStyle = color;
    ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
    ctx.restore();
  }

  function renderObjects() {
    els.objects.textContent = "";
    S.objects.forEach((obj, i) => {
      const li = document.createElement("li");
      li.className = i === S.active ? "active" : "";
      li.dataset.index = String(i);
      const color = document.createElement("input");
      color.type = "color";
      color.value = obj.color;
      color.title = "colour";
      color.addEventListener("input", () => { obj.color = color.value; renderMasks(); });
      color.addEventListener("change", () => record());
      const name = textInput(obj.name, "name", (v) => { obj.name = v || `object ${obj.id}`; });
      const category = textInput(obj.category, "category", (v) => { obj.category = v || "object"; });
      const del = document.createElement("button");
      del.textContent = "×";
      del.title = "delete (Del)";
      del.addEventListener("click", (e) => { e.stopPropagation(); S.active = i; deleteActive(); });
      li.append(color, name, category, del);
      li.addEventListener("click", () => selectObject(i));
      els.objects.append(li);
    });
  }

  function textInput(value, title, onChange) {
    const input = document.createElement("input");
    input.type = "text";
    input.value = value;
    input.title = title;
    input.placeholder = title;
    input.maxLength = 200;
    input.addEventListener("change", () => { onChange(input.value.trim()); record(); });
    // Enter confirms and hands the keyboard back to the image (shortcuts work again).
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") { input.blur(); els.ui.focus(); } });
    return input;
  }

  function renderCandidates() {
    els.candidates.textContent = "";
    const obj = activeObject();
    if (!obj || !obj.masks.length) {
      const span = document.createElement("span");
      span.className = "muted";
      span.textContent = S.image ? "click the image" : "open an image";
      els.candidates.append(span);
      return;
    }
    obj.masks.forEach((m, k) => {
      const b = document.createElement("button");
      b.textContent = `${k + 1} · ${m.score.toFixed(2)}`;
      b.title = `candidate ${k + 1}: predicted IoU ${m.score.toFixed(3)}, ${m.area} px (key ${k + 1})`;
      b.className = k === obj.selected ? "active" : "";
      b.addEventListener("click", () => selectCandidate(k));
      els.candidates.append(b);
    });
  }

  function updateButtons() {
    const ready = !!(S.image && S.image.id);
    const annotated = S.objects.some((o) => o.masks.length);
    els.undo.disabled = !undoStack.length;
    els.redo.disabled = !redoStack.length;
    els.everything.disabled = !ready;
    els.adopt.disabled = !S.everything.length;
    for (const b of [els.exportCoco, els.exportPolygons, els.exportLabels]) b.disabled = !ready || !annotated;
    const obj = activeObject();
    els.exportMask.disabled = !(obj && obj.masks.length);
  }

  // ------------------------------------------------------------------ export
  function annotations() {
    return S.objects
      .filter((o) => o.masks.length)
      .map((o) => ({
        segmentation: o.masks[o.selected].segmentation,
        category: o.category || "object",
        name: o.name,
        score: o.masks[o.selected].score,
      }));
  }

  function stem() {
    const name = S.image ? S.image.fileName : "image";
    return name.replace(/\.[^.]*$/, "") || "image";
  }

  function download(blob, name) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }

  async function exportCoco(mode) {
    const res = await postJson(`/v1/images/${S.image.id}/export/coco`, {
      annotations: annotations(), mode, file_name: S.image.fileName,
    });
    if (!res.ok) return setStatus(`export failed: ${await errorText(res)}`, true);
    download(await res.blob(), `${stem()}${mode === "polygon" ? ".polygons" : ""}.coco.json`);
    setStatus(`Exported ${annotations().length} objects as COCO JSON.`);
  }

  async function exportLabels() {
    const res = await postJson(`/v1/images/${S.image.id}/export/label-map`, { annotations: annotations() });
    if (!res.ok) return setStatus(`export failed: ${await errorText(res)}`, true);
    download(await res.blob(), `${stem()}_labels.png`);
    setStatus("Exported the label map (0 background, k = object k).");
  }

  function exportMask() {
    const obj = activeObject();
    if (!obj || !obj.masks.length) return;
    const { width: w, height: h } = S.image;
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(w, h);
    for (let o = 3; o < img.data.length; o += 4) img.data[o] = 255;
    paintRle(img.data, w, h, obj.masks[obj.selected].segmentation, [255, 255, 255], 255);
    ctx.putImageData(img, 0, 0);
    canvas.toBlob((blob) => download(blob, `${stem()}_${obj.name.replace(/[^\w.-]+/g, "_")}.png`), "image/png");
  }

  // ------------------------------------------------------------------ input
  function toImage(e) {
    const r = els.ui.getBoundingClientRect();
    const x = ((e.clientX - r.left) / r.width) * S.image.width;
    const y = ((e.clientY - r.top) / r.height) * S.image.height;
    return [Math.min(Math.max(x, 0), S.image.width), Math.min(Math.max(y, 0), S.image.height)];
  }

  let press = null; // {x, y, sx, sy, negative}

  els.ui.addEventListener("contextmenu", (e) => e.preventDefault());
  els.ui.addEventListener("pointerdown", (e) => {
    if (!S.image || !S.image.id || (e.button !== 0 && e.button !== 2)) return;
    e.preventDefault();
    els.ui.focus();
    els.ui.setPointerCapture(e.pointerId);
    const [x, y] = toImage(e);
    press = { x, y, sx: e.clientX, sy: e.clientY, negative: e.button === 2 || e.shiftKey };
  });
  els.ui.addEventListener("pointermove", (e) => {
    if (!press || press.negative) return;
    if (!drag && Math.hypot(e.clientX - press.sx, e.clientY - press.sy) < 5) return;
    const [x, y] = toImage(e);
    drag = { x0: press.x, y0: press.y, x1: x, y1: y };
    drawUi();
  });
  els.ui.addEventListener("pointerup", (e) => {
    if (!press) return;
    const p = press;
    press = null;
    if (drag) {
      const d = drag;
      drag = null;
      const box = [Math.min(d.x0, d.x1), Math.min(d.y0, d.y1), Math.max(d.x0, d.x1), Math.max(d.y0, d.y1)];
      addPrompt({ box: box.map((v) => Math.round(v * 10) / 10) });
    } else {
      addPrompt({ point: [Math.round(p.x * 10) / 10, Math.round(p.y * 10) / 10, p.negative ? 0 : 1] });
    }
  });
  els.ui.addEventListener("pointercancel", () => { press = null; drag = null; drawUi(); });

  document.addEventListener("keydown", (e) => {
    const t = e.target;
    const typing = t instanceof HTMLInputElement && (t.type === "text" || t.type === "number");
    if (typing || t instanceof HTMLSelectElement || t instanceof HTMLTextAreaElement) {
      if (e.key === "Escape") { t.blur(); els.ui.focus(); }
      return;
    }
    const ctrl = e.ctrlKey || e.metaKey;
    const key = e.key.toLowerCase();
    let handled = true;
    if (ctrl && key === "z" && !e.shiftKey) undo();
    else if (ctrl && (key === "y" || (key === "z" && e.shiftKey))) redo();
    else if (ctrl || e.altKey) handled = false;
    else if (["1", "2", "3"].includes(e.key)) selectCandidate(Number(e.key) - 1);
    else if (e.key === "Tab") {
      const obj = activeObject();
      if (obj && obj.masks.length > 1) selectCandidate((obj.selected + 1) % obj.masks.length);
    } else if (key === "n") { newObject(); record(); renderAll(); }
    else if (e.key === "[") selectObject(S.active - 1);
    else if (e.key === "]") selectObject(S.active + 1);
    else if (e.key === "Escape") clearActive();
    else if (e.key === "Delete" || e.key === "Backspace") deleteActive();
    else if (key === "e") segmentEverything();
    else if (key === "v") { S.showEverything = !S.showEverything; els.showEverything.checked = S.showEverything; renderMasks(); }
    else if (key === "h") { S.hideMasks = !S.hideMasks; renderMasks(); }
    else if (key === "z" && !ctrl) {
      els.zoomIn.checked = !els.zoomIn.checked;
      setStatus(`zoom-in refinement ${els.zoomIn.checked ? "on" : "off"}`);
    }
    else handled = false;
    if (handled) e.preventDefault();
  });

  els.file.addEventListener("change", () => { openFile(els.file.files[0]); els.file.value = ""; });
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", (e) => {
    if (e.target === document.documentElement || !e.relatedTarget) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) openFile(file);
  });
  window.addEventListener("resize", fitCanvases);

  els.undo.addEventListener("click", undo);
  els.redo.addEventListener("click", redo);
  els.newObject.addEventListener("click", () => { newObject(); record(); renderAll(); });
  els.everything.addEventListener("click", segmentEverything);
  els.showEverything.addEventListener("change", () => { S.showEverything = els.showEverything.checked; renderMasks(); });
  els.adopt.addEventListener("click", adoptEverything);
  els.exportCoco.addEventListener("click", () => exportCoco("rle"));
  els.exportPolygons.addEventListener("click", () => exportCoco("polygon"));
  els.exportLabels.addEventListener("click", exportLabels);
  els.exportMask.addEventListener("click", exportMask);

  document.body.dataset.ready = "0";
  document.body.dataset.busy = "0";
  resetHistory();
  // For scripts and tests: read-only access to the page's state and actions.
  window.segany = { state: S, undo, redo, openFile, rleCounts };
})();
