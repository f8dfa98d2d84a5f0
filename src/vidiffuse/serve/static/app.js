// The vidiffuse web page: plain modern JavaScript, no build step, no third-party code.
// Every /v1 call carries the API key as a Bearer header, which is why progress events are read with fetch()
// and a small server-sent-events parser instead of EventSource (EventSource cannot send headers).
"use strict";

const KEY_STORAGE = "vidiffuse.apiKey";
const SETTINGS_OPEN_STORAGE = "vidiffuse.settingsOpen";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const GALLERY_LIMIT = 48;
const POLL_MS = 1000;
const SETTING_FIELDS = ["steps", "guidance", "frames", "seed", "cache_threshold"];  // numbers; ids = request fields

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) if (child != null) node.append(child);
  return node;
};

class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

const state = {
  key: null,
  follow: null,            // AbortController of the job whose progress the "Current video" panel shows
  followingId: null,       // that job
  playingId: null,         // the job whose video is in the player (may be an older one from the gallery)
  videoUrls: new Map(),    // job id → object URL of its MP4 (fetched once per visit)
  videoLoads: new Map(),   // job id → pending Promise of that URL
  provenance: new Map(),   // job id → Promise of its provenance JSON
  galleryItems: new Map(), // job id → <li>
};

// ---- storage: localStorage can be unavailable (private modes, strict settings); then the key lives in memory
const storage = {
  get(name) { try { return localStorage.getItem(name); } catch { return null; } },
  set(name, value) { try { localStorage.setItem(name, value); } catch { /* memory only */ } },
  remove(name) { try { localStorage.removeItem(name); } catch { /* nothing stored */ } },
};
const keyStore = {
  get: () => storage.get(KEY_STORAGE),
  set: (key) => storage.set(KEY_STORAGE, key),
  clear: () => storage.remove(KEY_STORAGE),
};

// ---- the API --------------------------------------------------------------------------------------------
async function api(path, { method = "GET", body, signal, raw = false, key = state.key } = {}) {
  const headers = { Authorization: `Bearer ${key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, signal, cache: "no-store",
                                   body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "Cannot reach the server. Check your connection and try again.");
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`.trim();
    try {
      const data = await response.json();
      if (data && data.detail) detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
    } catch { /* not JSON: keep the status line */ }
    const retry = Number(response.headers.get("Retry-After")) || null;
    if (response.status === 401 && key === state.key) keyRejected();
    throw new ApiError(response.status, detail, retry);
  }
  return raw ? response : response.json();
}

// Server-sent events from a fetch() response body: yields {event, data} as each blank line ends one.
async function* readServerSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", event = "message", data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (line === "") {
          if (data.length) yield { event, data: data.join("\n") };
          event = "message";
          data = [];
        } else if (!line.startsWith(":")) {  // a line starting with ':' is a comment (keep-alive)
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event = val;
          else if (field === "data") data.push(val);
        }
      }
    }
  } finally {
    reader.releaseLock();
  }
}

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const onAbort = () => { clearTimeout(timer); reject(new DOMException("aborted", "AbortError")); };
  const timer = setTimeout(() => { signal?.removeEventListener("abort", onAbort); resolve(); }, ms);
  signal?.addEventListener("abort", onAbort, { once: true });
});

// ---- the key ---------------------------------------------------------------------------------------------
function showKeyForm({ error = "", notice = "", canCancel = false } = {}) {
  $("key-section").hidden = false;
  $("key-cancel").hidden = !canCancel;
  $("key-error").textContent = error;
  $("key-notice").textContent = notice;
  $("key-notice").hidden = !notice;
  $("key-input").value = "";
  $("key-input").setAttribute("aria-invalid", error ? "true" : "false");
  $("key-input").focus();
}

function showWorkspace() {
  $("key-section").hidden = true;
  $("workspace").hidden = false;
  $("gallery-section").hidden = false;
  $("key-status").hidden = false;
  $("key-label").textContent = `API key …${state.key.slice(-4)} saved in this browser`;
}

function hideWorkspace() {
  $("workspace").hidden = true;
  $("gallery-section").hidden = true;
  $("key-status").hidden = true;
}

function forgetEverything() {
  state.follow?.abort();
  state.follow = null;
  state.followingId = null;
  state.playingId = null;
  for (const url of state.videoUrls.values()) URL.revokeObjectURL(url);
  state.videoUrls.clear();
  state.videoLoads.clear();
  state.provenance.clear();
  state.galleryItems.clear();
  $("gallery").replaceChildren();
  $("player").removeAttribute("src");
  $("player-figure").hidden = true;
  $("player-provenance").replaceChildren();
  resetJobPanel();
}

function keyRejected() {
  keyStore.clear();
  state.key = null;
  forgetEverything();
  hideWorkspace();
  showKeyForm({ error: "The server did not accept the saved key (it may have been revoked). Enter another one." });
}

async function onKeySubmit(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) {
    $("key-error").textContent = "Enter your API key.";
    $("key-input").setAttribute("aria-invalid", "true");
    $("key-input").focus();
    return;
  }
  const button = event.submitter || $("key-form").querySelector("button[type=submit]");
  button.disabled = true;
  try {
    await api(`/v1/videos?limit=1`, { key });  // check the key before keeping it
  } catch (error) {
    $("key-error").textContent = error.status === 401 ? "The server did not accept this key." : error.message;
    $("key-input").setAttribute("aria-invalid", "true");
    $("key-input").focus();
    return;
  } finally {
    button.disabled = false;
  }
  if (key !== state.key) forgetEverything();
  state.key = key;
  keyStore.set(key);
  showWorkspace();
  $("prompt").focus();
  await loadGallery({ resume: true });
}

// ---- submitting ------------------------------------------------------------------------------------------
function clearFormErrors() {
  $("form-error").hidden = true;
  $("form-error").textContent = "";
  for (const node of $("generate-form").querySelectorAll("[aria-invalid=true]")) node.removeAttribute("aria-invalid");
}

function showFormError(message, fields = []) {
  $("form-error").textContent = message;
  $("form-error").hidden = false;
  for (const name of fields) {
    const input = $(name);
    if (input) input.setAttribute("aria-invalid", "true");
    if (input && $("settings").contains(input)) $("settings").open = true;
  }
}

function readRequest() {
  const body = { prompt: $("prompt").value.trim() };
  const problems = [];
  for (const name of SETTING_FIELDS) {
    const input = $(name);
    if (input.validity.badInput) {  // the browser could not read a number out of what was typed
      problems.push(name);
      continue;
    }
    if (input.value === "") continue;
    body[name] = Number(input.value);  // 8.5 steps goes to the server as is: it says what is wrong
  }
  if ($("sampler").value) body.sampler = $("sampler").value;
  return { body, problems };
}

async function onGenerate(event) {
  event.preventDefault();
  clearFormErrors();
  const { body, problems } = readRequest();
  if (!body.prompt) {
    showFormError("Write a prompt first: describe the video you want.", ["prompt"]);
    $("prompt").focus();
    return;
  }
  if (problems.length) {
    const names = problems.map((name) => document.querySelector(`label[for="${name}"]`).textContent.toLowerCase());
    showFormError(`Enter a number for ${names.join(", ")}.`, problems);
    return;
  }
  const button = $("generate");
  button.disabled = true;
  button.textContent = "Sending…";
  try {
    const job = await api("/v1/videos", { method: "POST", body });
    renderGalleryItem(job, { prepend: true });
    $("gallery-empty").hidden = true;
    followJob(job);
  } catch (error) {
    if (error.status === 401) return;
    let message = error.message;
    if (error.status === 429 && error.retryAfter) {
      message = `${message.replace(/\.?$/, ".")} Try again in ${formatSeconds(error.retryAfter)}.`;
    }
    // the server names the fields it rejects ("steps: at most 100 on this server; prompt: ...")
    const fields = message.split("; ").map((part) => part.split(":")[0].trim())
      .filter((name) => name === "prompt" || SETTING_FIELDS.includes(name) || name === "sampler");
    showFormError(message, fields);
  } finally {
    button.disabled = false;
    button.textContent = "Generate video";
  }
}

// ---- following one job -----------------------------------------------------------------------------------
function resetJobPanel() {
  $("job-state").dataset.status = "idle";
  $("job-announce").textContent = "";
  $("job-status").textContent = "Nothing generated yet in this visit.";
  $("progress").value = 0;
  $("progress-text").textContent = "0%";
  $("cancel").hidden = true;
}

async function followJob(job) {
  state.follow?.abort();
  const controller = new AbortController();
  state.follow = controller;
  state.followingId = job.id;
  renderJob(job);
  if (matchMedia("(max-width: 800px)").matches) {  // one column: bring the progress into view
    const smooth = !matchMedia("(prefers-reduced-motion: reduce)").matches;
    $("current").scrollIntoView({ block: "start", behavior: smooth ? "smooth" : "auto" });
  }
  const { signal } = controller;
  try {
    let last = job;
    try {
      const response = await api(`/v1/videos/${job.id}/events`, { raw: true, signal });
      for await (const message of readServerSentEvents(response)) {
        if (message.event !== "job") continue;
        last = JSON.parse(message.data);
        renderJob(last);
        if (TERMINAL.has(last.status)) break;
      }
    } catch (error) {
      if (error.name === "AbortError" || error.status === 401 || error.status === 404) throw error;
      // the stream broke (proxy, network): polling below picks up where it stopped
    }
    while (!TERMINAL.has(last.status)) {
      await sleep(POLL_MS, signal);
      try {
        last = await api(`/v1/videos/${job.id}`, { signal });
        renderJob(last);
      } catch (error) {
        if (error.name === "AbortError" || error.status === 401 || error.status === 404) throw error;
        $("job-status").textContent = "Lost contact with the server; retrying…";
      }
    }
    if (signal.aborted) return;
    renderGalleryItem(last);
    if (last.status === "succeeded") await showVideo(last);
    loadGallery();
  } catch (error) {
    if (error.name === "AbortError" || error.status === 401) return;
    $("job-state").dataset.status = "failed";
    $("job-status").textContent = `Could not follow the job: ${error.message}`;
    $("cancel").hidden = true;
  } finally {
    if (state.follow === controller) state.follow = null;
  }
}

function renderJob(job) {
  if (job.id === state.followingId) renderPanel(job);
  renderGalleryItem(job);
}

function renderPanel(job) {
  const { step, total, fraction } = job.progress;
  const done = job.status === "succeeded";
  const value = done ? 1 : fraction;
  if ($("job-state").dataset.status !== job.status) announce(job);
  $("job-state").dataset.status = job.status;
  $("progress").value = value;
  $("progress").setAttribute("aria-valuetext", `${Math.round(value * 100)} percent`);
  $("progress-text").textContent = `${Math.round(value * 100)}%`;
  $("cancel").hidden = TERMINAL.has(job.status);
  $("job-status").textContent = describeJob(job, step, total);
}

// screen readers hear each change of state once, not every step
function announce(job) {
  const what = { queued: "Your video is waiting for a free worker.", running: "Generating your video.",
                 succeeded: "Your video is ready.", failed: `Generation failed: ${job.error || "unknown error"}`,
                 cancelled: "Generation cancelled." }[job.status];
  if (what) $("job-announce").textContent = what;
}

function describeJob(job, step, total) {
  const eta = job.eta_seconds != null ? ` · about ${formatSeconds(job.eta_seconds)} left` : "";
  switch (job.status) {
    case "queued": return `Waiting for a free worker${eta}…`;
    case "running": return total > 0 && step > 0 ? `Generating: step ${step} of ${total}${eta}` : "Starting…";
    case "succeeded": {
      const took = job.started && job.finished ? ` in ${formatSeconds(job.finished - job.started)}` : "";
      return `Done${took}.`;
    }
    case "failed": return `Failed: ${job.error || "unknown error"}`;
    case "cancelled": return "Cancelled.";
    default: return job.status;
  }
}

async function onCancel() {
  const id = state.followingId;
  if (!id) return;
  $("cancel").disabled = true;
  try {
    const job = await api(`/v1/videos/${id}`, { method: "DELETE" });
    renderJob(job);
    $("job-status").textContent = job.status === "cancelled" ? "Cancelled." : "Cancelling…";
  } catch (error) {
    if (error.status !== 401) $("job-status").textContent = `Could not cancel: ${error.message}`;
  } finally {
    $("cancel").disabled = false;
  }
}

// ---- videos and provenance -------------------------------------------------------------------------------
function videoUrl(jobId) {
  if (state.videoUrls.has(jobId)) return Promise.resolve(state.videoUrls.get(jobId));
  if (!state.videoLoads.has(jobId)) {
    const load = api(`/v1/videos/${jobId}/content`, { raw: true })
      .then((response) => response.blob())
      .then((blob) => {
        const url = URL.createObjectURL(blob.type ? blob : new Blob([blob], { type: "video/mp4" }));
        state.videoUrls.set(jobId, url);
        return url;
      })
      .finally(() => state.videoLoads.delete(jobId));
    state.videoLoads.set(jobId, load);
  }
  return state.videoLoads.get(jobId);
}

function provenanceOf(jobId) {
  if (!state.provenance.has(jobId)) {
    const load = api(`/v1/videos/${jobId}/provenance`);
    load.catch(() => state.provenance.delete(jobId));  // try again next time
    state.provenance.set(jobId, load);
  }
  return state.provenance.get(jobId);
}

async function showVideo(job) {
  state.playingId = job.id;
  try {
    const url = await videoUrl(job.id);
    if (job.id !== state.playingId) return;  // another video was asked for meanwhile
    const player = $("player");
    player.src = url;
    $("download").href = url;
    $("download").download = `vidiffuse-${job.id.slice(0, 8)}.mp4`;
    $("download").hidden = false;
    $("player-caption").textContent = job.request.prompt;
    $("player-figure").hidden = false;
    player.play().catch(() => { /* autoplay refused: the controls are there */ });
    $("player-provenance").replaceChildren(provenanceBlock(job.id));
  } catch (error) {
    if (error.status !== 401) $("job-status").textContent = `The video is ready but could not be loaded: ${error.message}`;
  }
}

function openInPlayer(job) {
  if (!state.follow) {  // nothing in progress: the panel describes the video being watched
    state.followingId = job.id;
    renderPanel(job);
  }
  showVideo(job).then(() => $("player").focus());
}

// "AI-generated · watermark ✓ · C2PA signed (dev cert)", or what is wrong
function summarizeProvenance(report) {
  const wm = report.watermark || {};
  const mf = report.manifest || {};
  const parts = ["AI-generated"];
  const warnings = [];
  if (wm.detected) parts.push("watermark ✓");
  else warnings.push("watermark not found");
  if (!mf.present) warnings.push("no C2PA manifest");
  else if (mf.tampered) warnings.push("C2PA manifest tampered");
  else if (!mf.valid) warnings.push("C2PA manifest invalid");
  else parts.push(mf.trusted ? "C2PA signed ✓" : "C2PA signed (dev cert)");
  if (report.consistent === false) warnings.push("watermark and manifest disagree");
  const text = [...parts, ...warnings.map((w) => `⚠ ${w}`)].join(" · ");
  return { ok: warnings.length === 0, text };
}

function provenanceBlock(jobId) {
  const badge = el("p", { className: "badge pending", textContent: "Checking provenance…" });
  const wrap = el("div", { className: "provenance" }, badge);
  provenanceOf(jobId).then((report) => {
    const { ok, text } = summarizeProvenance(report);
    badge.className = `badge ${ok ? "ok" : "warn"}`;
    badge.textContent = text;
    badge.dataset.watermark = report.watermark?.detected ? "detected" : "missing";
    badge.dataset.manifest = report.manifest?.valid ? "valid" : (report.manifest?.present ? "invalid" : "absent");
    wrap.append(provenanceDetails(report));
  }, (error) => {
    badge.className = "badge warn";
    badge.textContent = `Provenance unavailable: ${error.message}`;
  });
  return wrap;
}

function provenanceDetails(report) {
  const wm = report.watermark || {};
  const mf = report.manifest || {};
  const rows = [
    ["Watermark", wm.detected ? `detected (p = ${formatP(wm.p_value)})` : `not detected (p = ${formatP(wm.p_value)})`],
    ["Payload", wm.payload ?? "—"],
    ["C2PA manifest", !mf.present ? "absent" : mf.valid ? "valid" : mf.tampered ? "tampered" : "invalid"],
    ["Signer", mf.signer?.common_name ? `${mf.signer.common_name}${mf.trusted ? " (trusted)" : " (not a trusted certificate)"}` : "—"],
  ];
  if (mf.issues?.length) rows.push(["Issues", mf.issues.join(", ")]);
  const list = el("dl");
  for (const [name, value] of rows) list.append(el("dt", { textContent: name }), el("dd", { textContent: String(value) }));
  return el("details", { className: "provenance-details" }, el("summary", { textContent: "Provenance details" }), list);
}

// ---- the gallery -----------------------------------------------------------------------------------------
const lazyVideos = "IntersectionObserver" in window ? new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    lazyVideos.unobserve(entry.target);
    loadThumbnail(entry.target);
  }
}, { rootMargin: "200px" }) : null;

function loadThumbnail(video) {
  const jobId = video.dataset.jobId;
  videoUrl(jobId).then((url) => {
    video.src = url;
    const link = video.closest("li")?.querySelector("a.download");
    if (link) { link.href = url; link.hidden = false; }
  }, () => { video.replaceWith(el("div", { className: "thumb placeholder", textContent: "Video unavailable" })); });
}

async function loadGallery({ resume = false } = {}) {
  if (!state.key) return;
  let jobs;
  try {
    ({ jobs } = await api(`/v1/videos?limit=${GALLERY_LIMIT}`));
  } catch (error) {
    if (error.status !== 401) $("gallery-empty").textContent = `Could not load your videos: ${error.message}`;
    $("gallery-empty").hidden = error.status === 401;
    return;
  }
  const keep = new Set(jobs.map((job) => job.id));
  for (const [id, item] of state.galleryItems) {
    if (!keep.has(id)) { item.remove(); state.galleryItems.delete(id); }
  }
  for (const job of jobs) renderGalleryItem(job);
  $("gallery").replaceChildren(...jobs.map((job) => state.galleryItems.get(job.id)));
  $("gallery-empty").textContent = "No videos yet: your first one will appear here.";
  $("gallery-empty").hidden = jobs.length > 0;
  if (resume && !state.follow) {  // a job still running from an earlier visit: follow it again
    const active = jobs.find((job) => !TERMINAL.has(job.status));
    if (active) followJob(active);
  }
}

function renderGalleryItem(job, { prepend = false } = {}) {
  const item = state.galleryItems.get(job.id);
  if (item && item.dataset.status === job.status) {
    // same state: only the percentage moves; the item stays (and keeps keyboard focus)
    const placeholder = item.querySelector(".thumb.placeholder.running");
    if (placeholder) placeholder.textContent = `Generating ${Math.round(job.progress.fraction * 100)}%`;
    return;
  }
  const fresh = el("li", { className: "gallery-item" });
  fresh.dataset.jobId = job.id;
  fresh.dataset.status = job.status;
  fillGalleryItem(fresh, job, item);
  if (item) item.replaceWith(fresh);
  else if (prepend) $("gallery").prepend(fresh);
  state.galleryItems.set(job.id, fresh);
}

function fillGalleryItem(item, job, previous) {
  const settings = job.request || {};
  if (job.status === "succeeded") {
    // reuse the old thumbnail if it already plays, so a refresh does not restart it
    let video = previous?.querySelector("video.thumb");
    if (!video) {
      video = el("video", { className: "thumb", muted: true, defaultMuted: true, loop: true, autoplay: true,
                            playsInline: true, preload: "auto" });
      video.setAttribute("aria-label", `Video: ${settings.prompt}`);
      video.dataset.jobId = job.id;
      if (lazyVideos) lazyVideos.observe(video);
      else loadThumbnail(video);
    }
    item.append(video);
  } else {
    const label = { queued: "Waiting…", running: `Generating ${Math.round(job.progress.fraction * 100)}%`,
                    failed: "Failed", cancelled: "Cancelled" }[job.status] || job.status;
    item.append(el("div", { className: `thumb placeholder ${job.status}`, textContent: label }));
  }

  const body = el("div", { className: "item-body" });
  body.append(el("p", { className: "item-prompt", textContent: settings.prompt || "(no prompt)" }));
  const facts = [formatWhen(job.created)];
  if (settings.steps) facts.push(`${settings.steps} steps`);
  if (settings.sampler) facts.push(settings.sampler);
  if (settings.seed != null) facts.push(`seed ${settings.seed}`);
  body.append(el("p", { className: "item-meta", textContent: facts.join(" · ") }));
  if (job.status === "failed") body.append(el("p", { className: "item-error", textContent: job.error || "Failed" }));
  if (job.status === "cancelled") body.append(el("p", { className: "item-meta", textContent: "Cancelled" }));

  const actions = el("div", { className: "item-actions" });
  if (job.status === "succeeded") {
    body.append(previous?.querySelector(".provenance") || provenanceBlock(job.id));
    const watch = el("button", { type: "button", textContent: "Watch" });
    watch.setAttribute("aria-label", `Watch: ${settings.prompt}`);
    watch.addEventListener("click", () => openInPlayer(job));
    const link = el("a", { className: "download button-link", textContent: "Download",
                           download: `vidiffuse-${job.id.slice(0, 8)}.mp4`, hidden: true });
    link.setAttribute("aria-label", `Download: ${settings.prompt}`);
    if (state.videoUrls.has(job.id)) { link.href = state.videoUrls.get(job.id); link.hidden = false; }
    actions.append(watch, link);
  } else if (!TERMINAL.has(job.status) && job.id !== state.followingId) {
    const follow = el("button", { type: "button", textContent: "Follow" });
    follow.addEventListener("click", () => followJob(job));
    actions.append(follow);
  }
  const reuse = el("button", { type: "button", textContent: "Reuse settings" });
  reuse.setAttribute("aria-label", `Reuse the prompt and settings of: ${settings.prompt}`);
  reuse.addEventListener("click", () => reuseSettings(settings));
  actions.append(reuse);
  body.append(actions);
  item.append(body);
}

function reuseSettings(settings) {
  $("prompt").value = settings.prompt || "";
  for (const name of SETTING_FIELDS) $(name).value = settings[name] ?? "";
  $("sampler").value = settings.sampler || "";
  clearFormErrors();
  $("prompt").focus();
  $("prompt").scrollIntoView({ block: "center", behavior: "smooth" });
}

// ---- formatting ------------------------------------------------------------------------------------------
function formatSeconds(seconds) {
  if (seconds < 1) return "under a second";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  return `${Math.round(seconds / 60)} min`;
}

function formatP(p) {
  if (p == null) return "—";
  return p < 1e-3 ? p.toExponential(1) : p.toFixed(3);
}

function formatWhen(epochSeconds) {
  const date = new Date(epochSeconds * 1000);
  const ago = (Date.now() - date) / 1000;
  if (ago < 60) return "just now";
  if (ago < 3600) return `${Math.round(ago / 60)} min ago`;
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

// ---- start -----------------------------------------------------------------------------------------------
function start() {
  $("key-form").addEventListener("submit", onKeySubmit);
  $("key-cancel").addEventListener("click", () => { $("key-section").hidden = true; showWorkspace(); $("prompt").focus(); });
  $("change-key").addEventListener("click", () => { hideWorkspace(); showKeyForm({ canCancel: true }); });
  $("forget-key").addEventListener("click", () => {
    keyStore.clear();
    state.key = null;
    forgetEverything();
    hideWorkspace();
    showKeyForm({ notice: "Key forgotten: this browser no longer stores it." });
  });
  $("generate-form").addEventListener("submit", onGenerate);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("generate-form").requestSubmit();
    }
  });
  $("cancel").addEventListener("click", onCancel);
  $("refresh-gallery").addEventListener("click", () => loadGallery());
  $("settings").open = storage.get(SETTINGS_OPEN_STORAGE) === "1";
  $("settings").addEventListener("toggle", () => storage.set(SETTINGS_OPEN_STORAGE, $("settings").open ? "1" : "0"));
  resetJobPanel();

  state.key = keyStore.get();
  if (state.key) {
    showWorkspace();
    loadGallery({ resume: true });
  } else {
    showKeyForm();
  }
}

start();
