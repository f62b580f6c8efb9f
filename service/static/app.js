// qzoom demo page: posts the image and question to POST /ask as multipart with Accept: text/event-stream and
// renders each Server-Sent Event (observe, gate, propose, zoom, answer, error) as it arrives. EventSource cannot
// POST, so the stream is read from fetch()'s ReadableStream and parsed here. Boxes and heatmaps arrive in
// original-image pixels; the SVG overlay's viewBox is the image's natural size, so they need no rescaling.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const KEY_STORAGE = "qzoom.apiKey";
  const COLORS = ["#ff3d71", "#ffaa00", "#00b8d9", "#8f5cff", "#00c853", "#ff6d00", "#e040fb", "#aeea00"];

  const el = {
    form: $("ask-form"), input: $("image-input"), dropzone: $("dropzone"), imageName: $("image-name"),
    query: $("query"), forceZoom: $("force-zoom"), maxSteps: $("max-steps"), gateThresh: $("gate-thresh"),
    roiThresh: $("roi-thresh"), maxBoxes: $("max-boxes"), boxMode: $("box-mode"), multiBox: $("multi-box"),
    maxNewTokens: $("max-new-tokens"),
    apiKey: $("api-key"), forgetKey: $("forget-key"), submit: $("submit"), cancel: $("cancel"), error: $("error"),
    status: $("server-status"), viewer: $("viewer"), empty: $("viewer-empty"), frame: $("frame"),
    preview: $("preview"), overlay: $("overlay"), heatmap: $("heatmap"), boxes: $("boxes"), legend: $("legend"),
    showHeatmap: $("show-heatmap"), gateScore: $("gate-score"), zoomCount: $("zoom-count"),
    visualTokens: $("visual-tokens"), totalMs: $("total-ms"), answer: $("answer"), steps: $("steps"),
    timings: $("timings"), live: $("live"),
  };

  let file = null;
  let objectUrl = null;
  let controller = null;
  let run = null; // what the current request has shown so far
  let finished = 0; // requests completed (answered, refused or failed), exposed as data-finished on the form

  // -- server status ----------------------------------------------------------------------------------------

  async function checkReady() {
    let next = 0;
    try {
      const res = await fetch("/readyz", { cache: "no-store" });
      const body = await res.json().catch(() => ({}));
      if (res.ok) {
        setStatus("ready", `Ready · model ${body.model ?? "?"}`);
      } else {
        const msg = body.error?.message ?? `HTTP ${res.status}`;
        const failed = msg.startsWith("the model failed");
        setStatus(failed ? "down" : "loading", failed ? "Model failed to load" : "Loading the model…", msg);
        next = failed ? 0 : 2000;
      }
    } catch (err) {
      setStatus("down", "Server unreachable", String(err));
      next = 5000;
    }
    if (next) setTimeout(checkReady, next);
  }

  function setStatus(state, text, title = "") {
    el.status.dataset.state = state;
    el.status.textContent = text;
    el.status.title = title;
  }

  // -- API key ------------------------------------------------------------------------------------------------

  function loadKey() {
    try { el.apiKey.value = localStorage.getItem(KEY_STORAGE) ?? ""; } catch { /* storage disabled */ }
  }
  function saveKey() {
    try {
      const v = el.apiKey.value.trim();
      if (v) localStorage.setItem(KEY_STORAGE, v); else localStorage.removeItem(KEY_STORAGE);
    } catch { /* storage disabled: the key still works for this page */ }
  }

  // -- image ---------------------------------------------------------------------------------------------------

  function setFile(f) {
    if (!f) return;
    if (f.type && !f.type.startsWith("image/")) {
      showError(`“${f.name}” is not an image (${f.type}).`);
      return;
    }
    hideError();
    file = f;
    if (objectUrl) URL.revokeObjectURL(objectUrl);
    objectUrl = URL.createObjectURL(f);
    el.imageName.textContent = `${f.name} · ${formatBytes(f.size)}`;
    el.preview.src = objectUrl;
    clearOverlay();
  }

  el.preview.addEventListener("load", () => {
    const w = el.preview.naturalWidth, h = el.preview.naturalHeight;
    el.overlay.setAttribute("viewBox", `0 0 ${w} ${h}`);
    el.frame.dataset.width = String(w);
    el.frame.dataset.height = String(h);
    el.frame.hidden = false;
    el.empty.hidden = true;
    if (file) el.imageName.textContent = `${file.name} · ${w}×${h} px · ${formatBytes(file.size)}`;
  });
  el.preview.addEventListener("error", () => {
    if (file) showError(`The browser cannot display “${file.name}”; the server may still read it.`);
  });

  el.input.addEventListener("change", () => setFile(el.input.files[0]));

  for (const target of [el.dropzone, el.viewer]) {
    target.addEventListener("dragover", (e) => { e.preventDefault(); target.classList.add("dragging"); });
    target.addEventListener("dragleave", () => target.classList.remove("dragging"));
    target.addEventListener("drop", (e) => {
      e.preventDefault();
      target.classList.remove("dragging");
      const f = e.dataTransfer?.files?.[0];
      if (f) setFile(f);
    });
  }

  // -- overlay -------------------------------------------------------------------------------------------------

  function clearOverlay() {
    el.boxes.replaceChildren();
    for (const tag of el.frame.querySelectorAll(".box-tag")) tag.remove();
    el.heatmap.setAttribute("visibility", "hidden");
    el.heatmap.removeAttribute("href");
    el.legend.replaceChildren();
  }

  function drawBox(box, index, label) {
    const [x0, y0, x1, y1] = box;
    const color = COLORS[index % COLORS.length];
    const rect = document.createElementNS(SVG_NS, "rect");
    rect.setAttribute("class", "zoom-box");
    rect.setAttribute("x", x0);
    rect.setAttribute("y", y0);
    rect.setAttribute("width", x1 - x0);
    rect.setAttribute("height", y1 - y0);
    rect.setAttribute("stroke", color);
    rect.setAttribute("fill", color);
    rect.setAttribute("vector-effect", "non-scaling-stroke");
    rect.dataset.box = box.join(",");
    el.boxes.append(rect);
    // The label is HTML placed in percentages of the image, so its text stays readable at any image size.
    const w = Number(el.frame.dataset.width), h = Number(el.frame.dataset.height);
    const tag = document.createElement("span");
    tag.className = "box-tag";
    tag.textContent = label;
    tag.style.left = `${(100 * x0) / w}%`;
    tag.style.top = `${(100 * y0) / h}%`;
    tag.style.background = color;
    el.frame.append(tag);
    const item = document.createElement("span");
    item.className = "legend-item";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = color;
    item.append(swatch, `${label}: [${box.join(", ")}]`);
    el.legend.append(item);
  }

  // Heat ramp: transparent blue through orange to yellow; alpha grows with the value so low cells stay see-through.
  function heatColor(v) {
    const stops = [[0, [40, 20, 120]], [0.5, [230, 60, 70]], [0.8, [255, 150, 30]], [1, [255, 240, 90]]];
    let i = 1;
    while (i < stops.length - 1 && v > stops[i][0]) i += 1;
    const [p0, c0] = stops[i - 1], [p1, c1] = stops[i];
    const t = Math.min(1, Math.max(0, (v - p0) / (p1 - p0)));
    return [0, 1, 2].map((k) => Math.round(c0[k] + (c1[k] - c0[k]) * t));
  }

  function drawHeatmap(data) {
    const rows = data.heatmap;
    if (!Array.isArray(rows) || !rows.length || !Array.isArray(rows[0])) return;
    const [gh, gw] = data.heatmap_grid ?? [rows.length, rows[0].length];
    const box = data.heatmap_box ?? [0, 0, Number(el.frame.dataset.width), Number(el.frame.dataset.height)];
    const peak = Math.max(1e-6, ...rows.flat());
    const canvas = document.createElement("canvas");
    canvas.width = gw;
    canvas.height = gh;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(gw, gh);
    for (let r = 0; r < gh; r += 1) {
      for (let c = 0; c < gw; c += 1) {
        const v = Math.min(1, Math.max(0, (rows[r]?.[c] ?? 0) / peak)); // relative to this map's peak
        const [R, G, B] = heatColor(v);
        const o = 4 * (r * gw + c);
        img.data[o] = R; img.data[o + 1] = G; img.data[o + 2] = B;
        img.data[o + 3] = Math.round(150 * v * v); // at most ~60% opaque: the picture stays readable
      }
    }
    ctx.putImageData(img, 0, 0);
    el.heatmap.setAttribute("href", canvas.toDataURL("image/png"));
    el.heatmap.setAttribute("x", box[0]);
    el.heatmap.setAttribute("y", box[1]);
    el.heatmap.setAttribute("width", box[2] - box[0]);
    el.heatmap.setAttribute("height", box[3] - box[1]);
    el.heatmap.dataset.grid = `${gh}x${gw}`;
    el.heatmap.dataset.box = box.join(",");
    el.heatmap.setAttribute("visibility", el.showHeatmap.checked ? "visible" : "hidden");
  }

  el.showHeatmap.addEventListener("change", () => {
    if (el.heatmap.getAttribute("href")) {
      el.heatmap.setAttribute("visibility", el.showHeatmap.checked ? "visible" : "hidden");
    }
  });

  // -- results -------------------------------------------------------------------------------------------------

  function resetResults() {
    clearOverlay();
    el.steps.replaceChildren();
    el.timings.replaceChildren();
    for (const dd of [el.gateScore, el.zoomCount, el.visualTokens, el.totalMs]) dd.textContent = "—";
    el.gateScore.dataset.score = "";
    el.answer.textContent = "Thinking…";
    el.answer.dataset.state = "pending";
    run = { started: performance.now(), gates: 0, zooms: 0, boxes: 0, tokens: 0 };
  }

  function addStep(kind, title, detail) {
    const li = document.createElement("li");
    li.className = `step step-${kind}`;
    li.dataset.step = kind;
    const strong = document.createElement("strong");
    strong.textContent = title;
    const span = document.createElement("span");
    span.textContent = detail;
    li.append(strong, " ", span);
    el.steps.append(li);
  }

  const ms = (v) => (typeof v === "number" ? `${v.toFixed(v < 10 ? 1 : 0)} ms` : "");

  function onEvent(name, data) {
    switch (name) {
      case "observe":
        run.tokens = data.visual_tokens ?? 0;
        el.visualTokens.textContent = String(run.tokens);
        addStep("observe", "Coarse view", `${data.visual_tokens} visual tokens` +
          (data.grid ? ` (${data.grid[0]}×${data.grid[1]} grid)` : "") + `, ${ms(data.ms)}`);
        break;
      case "gate": {
        run.gates += 1;
        const score = Number(data.gate_score);
        if (run.gates === 1) {
          el.gateScore.textContent = `${score.toFixed(3)} → ${data.fires ? "zoom" : "coarse view is enough"}`;
          el.gateScore.dataset.score = String(score);
        }
        addStep("gate", `Gate ${run.gates}`,
          `p = ${score.toFixed(3)}: ${data.fires ? "needs detail, zoom" : "enough, answer"}, ${ms(data.ms)}`);
        break;
      }
      case "propose": {
        drawHeatmap(data);
        const n = data.boxes?.length ?? 0;
        const peak = typeof data.heatmap_peak === "number" ? `, peak ${data.heatmap_peak.toFixed(3)}` : "";
        addStep("propose", "Region proposal", `${n ? `${n} box${n > 1 ? "es" : ""}` : "no region passed τroi"}` +
          `${peak}, ${ms(data.ms)}`);
        break;
      }
      case "zoom": {
        run.zooms += 1;
        for (const box of data.boxes ?? []) {
          drawBox(box, run.boxes, `Zoom ${data.zoom_step ?? run.zooms}`);
          run.boxes += 1;
        }
        run.tokens += data.visual_tokens ?? 0;
        el.visualTokens.textContent = String(run.tokens);
        el.zoomCount.textContent = String(run.zooms);
        const boxes = (data.boxes ?? []).map((b) => `[${b.join(", ")}] (${b[2] - b[0]}×${b[3] - b[1]} px)`);
        addStep("zoom", `Zoom ${data.zoom_step ?? run.zooms}`,
          `${boxes.join("; ")}, +${data.visual_tokens} tokens, ${ms(data.ms)}`);
        break;
      }
      case "answer":
        showAnswer(data.result ?? { answer: data.answer }, data.ms);
        break;
      case "error":
        showApiError(data, "The request failed while streaming");
        el.answer.textContent = "No answer.";
        el.answer.dataset.state = "empty";
        break;
      default:
        break; // unknown events from a newer server are ignored
    }
  }

  function showAnswer(result, answerMs) {
    el.answer.textContent = result.answer === "" ? "(empty answer)" : result.answer;
    el.answer.dataset.state = "done";
    if (typeof answerMs === "number") addStep("answer", "Answer", `decoded in ${ms(answerMs)}`);
    if (typeof result.visual_tokens === "number") el.visualTokens.textContent = String(result.visual_tokens);
    if (Array.isArray(result.steps)) {
      el.zoomCount.textContent = String(result.steps.length);
      // With several boxes answered one at a time (multi_box "best") the answer was read beside one of them:
      // the boxes it was not read beside stay drawn, dashed.
      const read = new Set(result.steps.map((step) => step.box.join(",")));
      for (const rect of el.boxes.querySelectorAll("rect.zoom-box")) {
        rect.classList.toggle("unread", !read.has(rect.dataset.box));
      }
    }
    if (result.gate_score == null && run.gates === 0) {
      const forced = el.forceZoom.value;
      el.gateScore.textContent = forced === "true" ? "not run (zoom forced)"
        : forced === "false" ? "not run (zoom off)" : "not run";
    }
    el.totalMs.textContent = `${Math.round(performance.now() - run.started)} ms`;
    el.timings.replaceChildren();
    for (const [stage, v] of Object.entries(result.timings_ms ?? {})) {
      const tr = document.createElement("tr");
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = stage;
      const td = document.createElement("td");
      td.className = "num";
      td.textContent = Number(v).toFixed(1);
      tr.append(th, td);
      el.timings.append(tr);
    }
    if (result.model) el.answer.title = `model ${result.model}`;
  }

  // -- errors --------------------------------------------------------------------------------------------------

  function showError(text) {
    el.error.textContent = text;
    el.error.hidden = false;
  }
  function hideError() {
    el.error.hidden = true;
    el.error.textContent = "";
  }
  function showApiError(body, fallback, status) {
    const err = body?.error;
    const code = err?.code ?? (status ? `http_${status}` : "error");
    const message = err?.message ?? fallback;
    showError(`${status ? `${status} ` : ""}${code}: ${message}`);
    el.error.dataset.code = code;
  }

  // -- SSE over fetch ------------------------------------------------------------------------------------------

  function parseBlock(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue; // comments carry the server's keep-alive pings
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    return data.length ? { event, data: data.join("\n") } : null;
  }

  async function* sseEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buf += value;
      // Normalise line ends; a trailing CR may be half of a CRLF split across chunks, so it waits for the next.
      const hold = !done && buf.endsWith("\r");
      let text = (hold ? buf.slice(0, -1) : buf).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = text.indexOf("\n\n")) >= 0) {
        const ev = parseBlock(text.slice(0, cut));
        text = text.slice(cut + 2);
        if (ev) yield ev;
      }
      buf = hold ? `${text}\r` : text;
      if (done) {
        const ev = parseBlock(buf);
        if (ev) yield ev;
        return;
      }
    }
  }

  // -- submit --------------------------------------------------------------------------------------------------

  function buildForm() {
    const fd = new FormData();
    fd.append("image", file, file.name || "image");
    fd.append("query", el.query.value.trim());
    const options = {
      force_zoom: el.forceZoom.value, max_steps: el.maxSteps.value, gate_thresh: el.gateThresh.value,
      roi_thresh: el.roiThresh.value, max_boxes: el.maxBoxes.value, box_mode: el.boxMode.value,
      multi_box: el.multiBox.value, max_new_tokens: el.maxNewTokens.value,
    };
    // Empty means "the model's default": the field is left out and the server validates the rest.
    for (const [k, v] of Object.entries(options)) if (String(v).trim() !== "") fd.append(k, String(v).trim());
    return fd;
  }

  function setBusy(busy) {
    el.submit.disabled = busy;
    el.submit.textContent = busy ? "Asking…" : "Ask";
    el.cancel.disabled = !busy;
    el.live.setAttribute("aria-busy", String(busy));
    document.body.classList.toggle("busy", busy);
  }

  async function ask(e) {
    e.preventDefault();
    hideError();
    if (!file) {
      showError("Choose an image first.");
      el.input.focus();
      return;
    }
    if (!el.query.value.trim()) {
      showError("Type a question about the image.");
      el.query.focus();
      return;
    }
    saveKey();
    resetResults();
    setBusy(true);
    controller = new AbortController();
    const headers = { Accept: "text/event-stream" };
    const key = el.apiKey.value.trim();
    if (key) headers["X-API-Key"] = key;
    let answered = false;
    try {
      const res = await fetch("/ask", { method: "POST", body: buildForm(), headers, signal: controller.signal });
      if (!res.ok) {
        const body = await res.json().catch(() => null);
        const retry = res.headers.get("Retry-After");
        showApiError(body, res.statusText || "request failed", res.status);
        if (retry) el.error.textContent += ` (retry in ${retry} s)`;
        el.answer.textContent = "No answer.";
        el.answer.dataset.state = "empty";
        return;
      }
      if (!(res.headers.get("content-type") ?? "").startsWith("text/event-stream")) {
        showAnswer(await res.json());
        answered = true;
        return;
      }
      for await (const { event, data } of sseEvents(res.body)) {
        let parsed;
        try { parsed = JSON.parse(data); } catch { continue; }
        onEvent(event, parsed);
        if (event === "answer" || event === "error") answered = true;
      }
      if (!answered) showError("The stream ended before the answer arrived.");
    } catch (err) {
      if (err.name === "AbortError") {
        showError("Stopped.");
      } else {
        showError(`Could not reach the server: ${err.message ?? err}`);
      }
      if (!answered) {
        el.answer.textContent = "No answer.";
        el.answer.dataset.state = "empty";
      }
    } finally {
      controller = null;
      setBusy(false);
      finished += 1;
      el.form.dataset.finished = String(finished);
    }
  }

  el.form.addEventListener("submit", ask);
  el.cancel.addEventListener("click", () => controller?.abort());
  el.query.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) el.form.requestSubmit();
  });
  el.apiKey.addEventListener("change", saveKey);
  el.forgetKey.addEventListener("click", () => { el.apiKey.value = ""; saveKey(); el.apiKey.focus(); });

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  loadKey();
  checkReady();
})();
