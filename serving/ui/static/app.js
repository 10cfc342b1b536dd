// The web page of the pneumonia classifier: each chosen or dropped file goes to POST /explain of this server,
// one at a time, and its answer is shown: verdict, probability against the threshold, refusal, warnings,
// heatmap with an opacity slider, model tag. Hand-written, no dependencies, nothing from another origin.
"use strict";

(() => {
  const KEY_STORAGE = "pneumonia-api-key"; // sessionStorage: this tab only
  const EXPLAIN_URL = new URL("../explain", document.baseURI); // the page is /ui/: the API is beside /ui
  const HEALTH_URL = new URL("../health", document.baseURI);
  const MAX_BUSY_RETRIES = 3;
  // A request the server has not answered in this long is given up (its own limit, PNEUMONIA_TIMEOUT_S, is 60 s
  // by default): a stopped server left "Sending the image…" on screen for good, and every later file behind it.
  // The page's <html data-request-timeout-ms> may set another.
  const requestTimeoutMs = () => Number(document.documentElement.dataset.requestTimeoutMs) || 90000;
  // What the server accepts as a key (settings.py): a pasted en dash made every request fail as "cannot reach".
  const KEY_PATTERN = /^[\x21-\x7e]{16,}$/;

  const $ = (selector, root = document) => root.querySelector(selector);
  const keyInput = $("#api-key");
  const keyStatus = $("#key-status");
  const progress = $("#progress");
  const gateNotice = $("#gate-notice");
  const results = $("#results");
  const template = $("#result-template");

  let queue = Promise.resolve();
  // The files chosen since the page was last cleared: "Clear the results" aborts them all (the request in flight,
  // a wait before a retry, the files still queued) and starts a new generation.
  let generation = { controller: new AbortController(), pending: 0 };

  // ------------------------------------------------------------------ API key, kept in this tab only

  // A browser that blocks site data refuses sessionStorage: the key is then kept by this page alone (a helper's
  // find: "Use this key" threw, and every upload went without the key the user had just given).
  let keyInMemory = null;

  function apiKey() {
    if (keyInMemory !== null) return keyInMemory;
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (_) {
      return "";
    }
  }

  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
      keyInMemory = null;
    } catch (_) {
      keyInMemory = key;
    }
  }

  function showKeyStatus() {
    const unkept = keyInMemory ? " This browser does not let the page keep it: reloading the page forgets it." : "";
    keyStatus.textContent = apiKey()
      ? `A key is set for this tab.${unkept}`
      : "No key set: the server is called without one.";
  }

  // The key typed in the field, once it is used (the button, Enter, or choosing files with a key typed and not yet
  // used: those went out without it, and the 401 then asked for the key the field held). False when it is not one.
  function useTypedKey() {
    const key = keyInput.value.trim();
    if (key && !KEY_PATTERN.test(key)) {
      keyStatus.textContent = "Not used: an API key is at least 16 characters, letters, digits and ASCII "
        + "punctuation only (no spaces, no typographic dashes or quotes). Paste it again.";
      return false;
    }
    storeKey(key);
    keyInput.value = "";
    showKeyStatus();
    readGate();
    return true;
  }

  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    useTypedKey();
  });

  $("#forget-key").addEventListener("click", () => {
    storeKey("");
    keyInput.value = "";
    showKeyStatus();
  });

  // ------------------------------------------------------------------ what this server's validity gate does

  // The page says an image the model may not answer is refused; that holds only where the gate refuses. /health
  // tells (it may need the key: until then nothing is said). A helper's find: with the gate off, a black image got
  // "PNEUMONIA 0.99" and a heatmap under that promise.
  async function readGate() {
    const headers = { Accept: "application/json" };
    const key = apiKey();
    if (key) headers["X-API-Key"] = key;
    let validity = null;
    try {
      const response = await fetch(HEALTH_URL, { method: "POST", headers });
      if (response.ok) validity = (await response.json()).validity || null;
    } catch (_) {
      validity = null;
    }
    gateNotice.textContent = gateText(validity);
    gateNotice.hidden = !gateNotice.textContent;
  }

  function gateText(validity) {
    if (!validity) return "";
    if (validity.mode === "off") {
      return "This server's validity gate is off: every image that decodes gets a verdict and a heatmap, a blank "
        + "image, a photograph or a knee X-ray too (only a DICOM whose tags name another modality, view or body "
        + "part is still refused). Check that each file is a frontal chest X-ray yourself.";
    }
    if (validity.mode === "warn") {
      return "This server's validity gate only warns: an image it would refuse (not a frontal chest X-ray, blank, "
        + "inverted, rotated, a crop) still gets a verdict, with a warning naming the check it failed (a DICOM whose "
        + "tags name another modality, view or body part is still refused). Read each result's warnings before its "
        + "verdict.";
    }
    if (validity.fitted === false) {
      return "The model this server serves has no validity gate: an image that is not a frontal chest X-ray may "
        + "get a verdict. Check that each file is one yourself.";
    }
    return "";
  }

  // ------------------------------------------------------------------ choosing and dropping files

  const input = $("#files");
  input.addEventListener("change", () => {
    enqueue(Array.from(input.files || []));
    input.value = ""; // choosing the same file again explains it again
  });

  const zone = $("#drop-zone");
  ["dragenter", "dragover"].forEach((name) =>
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    }),
  );
  ["dragleave", "dragend"].forEach((name) => zone.addEventListener(name, () => zone.classList.remove("dragging")));
  // Files dropped anywhere on the page are explained (beside the zone, on the results, they were dropped silently);
  // the browser must not replace the page with the file.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    enqueue(Array.from((event.dataTransfer && event.dataTransfer.files) || []));
  });

  // Clearing cancels too (the cleared files were sent, and the status line then announced results the page no
  // longer showed; a file waiting out a 503 held the next upload for its whole Retry-After).
  $("#clear").addEventListener("click", () => {
    const cancelled = generation.pending;
    generation.controller.abort();
    generation = { controller: new AbortController(), pending: 0 };
    results.replaceChildren();
    progress.textContent = cancelled
      ? `Cleared; ${cancelled} X-ray${cancelled === 1 ? "" : "s"} not yet answered ${cancelled === 1 ? "was" : "were"} cancelled.`
      : "No X-rays yet.";
  });

  function enqueue(files) {
    if (files.length && keyInput.value.trim()) useTypedKey();
    const current = generation;
    for (const file of files) {
      const card = newCard(file);
      current.pending += 1;
      queue = queue.then(() => explain(file, card, current.controller.signal)).finally(() => {
        current.pending -= 1;
      });
    }
  }

  // ------------------------------------------------------------------ calling the server

  // A file name in a sentence, isolated from the text around it: a name with a right-to-left override reversed the
  // announced verdict and numbers ("4100.0" for 0.0014).
  const isolated = (name) => `\u2068${name}\u2069`;

  function newCard(file) {
    const item = template.content.firstElementChild.cloneNode(true);
    $(".file-name", item).textContent = file.name || "unnamed file";
    setState(item, "waiting", "Waiting for the previous X-rays to finish.");
    const slider = $(".opacity", item);
    slider.setAttribute("aria-label", `Heatmap opacity for ${file.name || "unnamed file"}`); // one per card
    slider.addEventListener("input", () => applyOpacity(item));
    results.append(item);
    return item;
  }

  function setState(card, state, text) {
    card.dataset.state = state;
    $(".state", card).textContent = text;
  }

  // A wait that ends early when the page is cleared.
  const sleep = (ms, signal) => new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });

  // Whether the file can still be read, by its first chunk: a dropped folder, or a file moved or deleted since it
  // was chosen, failed the request and the page said "Cannot reach the server". (Chromium reads a slice of a deleted
  // file without complaint; its stream fails.)
  async function readable(file) {
    try {
      const reader = file.stream().getReader();
      await reader.read();
      reader.cancel().catch(() => {});
      return true;
    } catch (_) {
      return false;
    }
  }

  async function explain(file, card, cleared) {
    const name = file.name || "unnamed file";
    for (let attempt = 0; ; attempt += 1) {
      if (cleared.aborted) return; // cleared while it waited
      setState(card, "working", "Sending the image and computing its heatmap…");
      progress.textContent = `Explaining ${isolated(name)}…`;
      const form = new FormData();
      form.append("image", file, name);
      const headers = { Accept: "application/json" };
      const key = apiKey();
      if (key) headers["X-API-Key"] = key;
      const timeoutMs = requestTimeoutMs();
      const signal = AbortSignal.any && AbortSignal.timeout
        ? AbortSignal.any([cleared, AbortSignal.timeout(timeoutMs)])
        : cleared;
      let response;
      let body = null;
      try {
        response = await fetch(EXPLAIN_URL, { method: "POST", body: form, headers, signal });
        try {
          body = await response.json();
        } catch (error) {
          if (signal.aborted) throw error;
          body = null;
        }
      } catch (_) {
        if (cleared.aborted) return; // aborted by "Clear the results"
        if (signal.aborted) {
          return fail(card, name, `The server did not answer within ${Math.round(timeoutMs / 1000)} s. Choose the `
            + "file again in a moment; if it keeps happening, tell the service's operators.");
        }
        if (!(await readable(file))) {
          return fail(card, name, "This could not be read: a folder (open it and choose its files), or a file "
            + "moved or deleted since it was chosen. Choose the files again.");
        }
        return fail(card, name, "Cannot reach the server. Check that it is running and that this page still "
          + "has a network connection, then choose the file again.");
      }
      if (cleared.aborted) return;
      const retryAfter = Number.parseInt(response.headers.get("Retry-After") || "", 10);
      // Busy (503) or this page sending faster than the rate limit allows (429): wait as asked, then go on.
      if ([429, 503].includes(response.status) && Number.isFinite(retryAfter) && attempt < MAX_BUSY_RETRIES) {
        const seconds = Math.min(Math.max(retryAfter, 1), 30);
        const reason = (detail(body) || {}).type;
        const why = response.status === 429 ? "Sending too fast for the server's rate limit"
          : reason === "not_ready" ? "The server is still starting"
            : reason === "explain_busy" ? "The server is busy computing other explanations" : "The server is busy";
        setState(card, "working", `${why}; trying again in ${seconds} s.`);
        progress.textContent = `${isolated(name)}: ${why.charAt(0).toLowerCase()}${why.slice(1)}; trying again in `
          + `${seconds} s.`;
        await sleep(seconds * 1000, cleared);
        continue;
      }
      if (!response.ok || !body || !body.prediction) {
        return fail(card, name, humanError(response.status, body, retryAfter));
      }
      return show(card, name, body);
    }
  }

  function detail(body) {
    if (body && Array.isArray(body.detail) && body.detail.length) return body.detail[0];
    return null;
  }

  function serverMessage(body) {
    const first = detail(body);
    if (first && first.msg) return first.msg;
    if (body && typeof body.error === "string") return body.error;
    return "";
  }

  // What a person can do about a failed call, in words.
  function humanError(status, body, retryAfter) {
    const first = detail(body);
    const reason = first ? first.type : "";
    const said = serverMessage(body);
    const wait = Number.isFinite(retryAfter) ? `${retryAfter} s` : "a few seconds";
    if (status === 401 || status === 403) {
      if (keyInput.value.trim()) {
        return "The key typed above is not an API key (see the note under it), so it was not sent. Paste the key "
          + "again, then choose the file again.";
      }
      return apiKey()
        ? "The server did not accept the API key. Check the key, enter it again above, and choose the file again."
        : "This server needs an API key. Enter it above, then choose the file again.";
    }
    if (status === 413 || ["too_many_bytes", "too_many_pixels", "request_too_large"].includes(reason)) {
      return `This file is too large for the server: ${said}. Send a smaller export of the image.`;
    }
    if (status === 429) return `Too many requests from this browser. Wait ${wait} and choose the file again.`;
    if (status === 503) {
      if (reason === "explain_unavailable") {
        return `The server could not compute the explanation (${said}). If choosing the file again gives the same `
          + "answer, tell the service's operators.";
      }
      if (reason === "not_ready" || /loading/.test(said)) {
        return `The server is still starting. Wait ${wait} and choose the file again.`;
      }
      if (reason === "explain_busy") {
        return `The server is busy computing other explanations. Wait ${wait} and choose the file again.`;
      }
      return `The server cannot answer now${said ? ` (${said})` : ""}. Wait ${wait} and choose the file again.`;
    }
    if (status === 504) return "The server took too long to answer. Choose the file again in a moment.";
    if (status === 400 || status === 415 || status === 422) {
      const hints = {
        empty: "The file is empty.",
        not_an_image: "This file is not an image the server can read. Send a DICOM, JPEG, PNG, TIFF, BMP or WebP "
          + "file.",
        unsupported_format: "The server does not accept this image format. Send a DICOM, JPEG, PNG, TIFF, BMP or "
          + "WebP file.",
        corrupt: "The file looks damaged: the server could not decode it.",
        too_small: "The image is too small to classify.",
        dicom_no_pixel_data: "This DICOM file holds no image the server can read.",
        dicom_unsupported_syntax: "The server cannot decode this DICOM file's compression. Export it uncompressed "
          + "(or as JPEG, JPEG-LS, JPEG 2000 or RLE) and send it again.",
      };
      const hint = hints[reason] || "The server refused this file.";
      if (!said || hint.includes(said)) return hint;
      // The server's words alone where they say the hint and more: "The file is empty. (the file is empty (0 bytes))"
      if (said.toLowerCase().startsWith(hint.replace(/\.$/, "").toLowerCase())) {
        return `${said.charAt(0).toUpperCase()}${said.slice(1)}.`;
      }
      return `${hint} (${said})`;
    }
    if (status >= 500) {
      return `The server failed (HTTP ${status}). Try again; if it keeps failing, tell the service's operators.`;
    }
    return `The server answered HTTP ${status}${said ? `: ${said}` : ""}.`;
  }

  function fail(card, name, message) {
    setState(card, "error", "Not classified.");
    const error = $(".error", card);
    error.textContent = message;
    error.hidden = false;
    progress.textContent = `${isolated(name)}: not classified. ${message}`;
  }

  // ------------------------------------------------------------------ showing an answer

  // Four decimals, or as many as it takes to tell the probability from the threshold (the probability is served
  // with six, the threshold unrounded): "0.5126 against the threshold 0.5126" read as a tie.
  function formatPair(probability, threshold) {
    for (let digits = 4; ; digits += 1) {
      const pair = [probability.toFixed(digits), threshold.toFixed(digits)];
      if (pair[0] !== pair[1] || digits === 12) return pair;
    }
  }

  function show(card, name, body) {
    const prediction = body.prediction;
    card.dataset.status = prediction.status;
    $(".model", card).textContent = prediction.model;
    $(".model-line", card).hidden = false;

    const warnings = prediction.warnings || [];
    if (warnings.length) {
      const list = $(".warning-list", card);
      list.replaceChildren(...warnings.map((text) => {
        const item = document.createElement("li");
        item.textContent = text;
        return item;
      }));
      $(".warnings", card).hidden = false;
    }

    if (prediction.status === "refused") {
      const refusal = prediction.refusal || { reason: "refused", message: "the image was refused" };
      $(".refusal-message", card).textContent = refusal.message;
      $(".refusal-reason", card).textContent = refusal.reason;
      $(".refusal", card).hidden = false;
      const none = $(".no-heatmap", card);
      none.textContent = body.note || "No heatmap: the image was refused.";
      none.hidden = false;
      setState(card, "refused", "Refused: no verdict.");
      const also = warnings.length ? `.${said(warnings)}` : "";
      progress.textContent = `${isolated(name)}: refused (${refusal.reason}): ${refusal.message}${also}`;
      return;
    }

    const probability = Number(prediction.probability);
    const threshold = Number(prediction.threshold);
    card.dataset.label = prediction.label;
    card.dataset.probability = String(prediction.probability);
    card.dataset.threshold = String(prediction.threshold);
    const label = $(".label", card);
    label.textContent = prediction.label;
    label.classList.add(prediction.label === "PNEUMONIA" ? "pneumonia" : "normal");
    const [shownProbability, shownThreshold] = formatPair(probability, threshold);
    $(".probability", card).textContent = shownProbability;
    $(".threshold", card).textContent = shownThreshold;
    // From the verdict itself, never recomputed from the numbers: the two must not disagree on the page.
    $(".side", card).textContent = prediction.label === "PNEUMONIA"
      ? "at or above it: PNEUMONIA"
      : "below it: NORMAL";
    const bar = $(".bar", card);
    bar.setAttribute("aria-label",
      `Probability ${shownProbability} on a scale from 0 to 1; threshold at ${shownThreshold}`);
    $(".bar-fill", card).style.width = `${(probability * 100).toFixed(2)}%`;
    $(".bar-threshold", card).style.left = `${(threshold * 100).toFixed(2)}%`;
    $(".verdict", card).hidden = false;

    const heatmap = body.heatmap;
    if (heatmap) {
      const base = $(".base", card);
      const overlay = $(".overlay", card);
      base.src = `data:image/png;base64,${heatmap.image_png}`;
      base.alt = `The X-ray ${name} as the model saw it`;
      overlay.src = `data:image/png;base64,${heatmap.overlay_png}`;
      overlay.alt = `Heatmap of the evidence for ${heatmap.target} over ${name}: red where it was strongest, `
        + "blue or uncoloured where it was weak";
      base.width = overlay.width = heatmap.width;
      base.height = overlay.height = heatmap.height;
      $(".note", card).textContent = body.note;
      $(".heatmap", card).hidden = false;
      applyOpacity(card);
    }
    setState(card, "done", "Done.");
    progress.textContent = `${isolated(name)}: ${prediction.label}, probability of pneumonia ${shownProbability} `
      + `against the threshold ${shownThreshold}.${said(warnings)}`;
  }

  // The warnings in the announcement too: a screen reader heard a clean verdict for a 100 x 100 image.
  function said(warnings) {
    if (!warnings.length) return "";
    return ` ${warnings.length === 1 ? "Warning" : `${warnings.length} warnings`}: ${warnings.join("; ")}.`;
  }

  function applyOpacity(card) {
    const slider = $(".opacity", card);
    const value = Number(slider.value);
    $(".overlay", card).style.opacity = String(value / 100);
    $(".opacity-value", card).textContent = `${value}%`;
  }

  showKeyStatus();
  readGate();
})();
