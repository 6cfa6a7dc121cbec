// The search page: POST /search, thumbnails from /items/{id}/image, the live panel from /status.
// Text from the server goes in with textContent only: item ids are whatever producers sent.
"use strict";

const THUMB_PX = 96;
const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
const form = $("search-form"), fileInput = $("file"), idInput = $("item-id");

// A server started with an API key (STREAMHASH_SECURITY__API_KEY) answers 401: ask for the key once and keep it
// in a same-site cookie, which the server also reads, so that thumbnails (<img>, no headers) load with it too.
const KEY_COOKIE = "streamhash_api_key";
let keyDeclined = false;

async function api(url, init) {
  let response = await fetch(url, init);
  if (response.status === 401 && !keyDeclined) {
    const key = window.prompt("This streamhash server needs its API key:");
    if (!key) {
      keyDeclined = true;
      return response;
    }
    document.cookie = `${KEY_COOKIE}=${encodeURIComponent(key)}; path=/; SameSite=Strict`;
    response = await fetch(url, init);
  }
  return response;
}

function imageUrl(id) {
  return `/items/${encodeURIComponent(id)}/image?size=${THUMB_PX}`;
}

function showError(text) {
  $("error").textContent = text || "";
}

async function detail(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

function numberOrNull(input) {
  return input.value.trim() === "" ? null : Number(input.value);
}

function showQuery(src) {
  $("query-preview").hidden = !src;
  if (src) $("query-image").src = src;
}

async function search() {
  showError("");
  const by = form.elements.by.value;
  const k = numberOrNull($("k")) ?? 10, radius = numberOrNull($("radius"));
  let init;
  if (by === "item") {
    const id = idInput.value.trim();
    if (!id) return showError("Type a stored item id, or pick a random one.");
    init = {method: "POST", headers: {"content-type": "application/json"},
            body: JSON.stringify({item_id: id, k, radius})};
    showQuery(imageUrl(id));
  } else {
    const file = fileInput.files[0];
    if (!file) return showError("Choose or drop an image file first.");
    const data = new FormData();
    data.append("image", file);
    data.append("k", String(k));
    if (radius !== null) data.append("radius", String(radius));
    init = {method: "POST", body: data};
    // a browser cannot show .npy; the server's answer is what matters
    showQuery(file.name.endsWith(".npy") ? null : URL.createObjectURL(file));
  }
  $("summary").textContent = "Searching…";
  const response = await api("/search", init);
  if (!response.ok) {
    $("summary").textContent = "No results.";
    $("results").replaceChildren();
    return showError(await detail(response));
  }
  render(await response.json(), by === "item" ? idInput.value.trim() : null);
}

// class names where the index has them (sent with the images, or STREAMHASH_DATA__CLASS_NAMES), else the bare labels
function labelText(hit) {
  if (hit.labels === null) return "unlabeled";
  return hit.label_names ? hit.label_names.join(", ") || "none" : `labels ${hit.labels.join(", ") || "none"}`;
}

function render(answer, queryId) {
  const shards = answer.shards || [];
  // a shard that did not answer is said, never hidden: its items are missing from these results
  const missing = shards.filter((s) => !s.answered).map((s) => s.shard || s.url);
  const untrained = answer.model_version <= 1 ? "UNTRAINED model (no learning round yet): hits are close to noise · " : "";
  $("summary").textContent = untrained + `${answer.results.length} results · model version ${answer.model_version} · ` +
    `generation ${answer.generation} · ${answer.index_size} items in ${shards.length} shards · ` +
    `${answer.took_ms.toFixed(1)} ms · query code ${answer.code_hex}` +
    (answer.reranked ? " · ties ordered by look-alikes: their labels' vote, then similarity" : "") +
    (answer.partial ? ` · PARTIAL: no answer from ${missing.join(", ")}` : "");
  const items = answer.results.map((hit) => {
    const li = document.createElement("li");
    li.className = "hit";
    li.dataset.id = hit.id;
    li.dataset.distance = String(hit.distance);
    const button = document.createElement("button");
    button.type = "button";
    button.title = `search by ${hit.id}`;
    const img = document.createElement("img");
    img.src = imageUrl(hit.id);
    img.alt = `item ${hit.id}`;
    img.width = img.height = THUMB_PX;
    const caption = document.createElement("span");
    caption.className = "caption";
    for (const [cls, text] of [["id", hit.id], ["distance", `d = ${hit.distance}` + (hit.similarity == null ? "" : ` · cos ${hit.similarity.toFixed(2)}`)], ["labels", labelText(hit)]]) {
      const part = document.createElement("span");
      part.className = cls;
      part.textContent = text;
      caption.append(part);
    }
    button.append(img, caption);
    button.addEventListener("click", () => {
      form.elements.by.value = "item";
      idInput.value = hit.id;
      search();
    });
    li.append(button);
    return li;
  });
  $("results").replaceChildren(...items);
  // a stored item comes first in its own results: its class goes under the query image
  const first = answer.results[0];
  $("query-caption").textContent = first && first.id === queryId ? `the query · ${labelText(first)}` : "the query";
}

form.addEventListener("submit", (event) => {
  event.preventDefault(); // Enter in any field lands here
  search().catch((e) => showError(String(e)));
});
fileInput.addEventListener("change", () => { $("by-image").checked = true; });
idInput.addEventListener("input", () => { $("by-item").checked = true; });

$("random").addEventListener("click", async () => {
  showError("");
  const response = await api("/random");
  if (!response.ok) return showError(await detail(response));
  idInput.value = (await response.json()).id;
  $("by-item").checked = true;
  search().catch((e) => showError(String(e)));
});

const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (!event.dataTransfer.files.length) return;
  fileInput.files = event.dataTransfer.files;
  $("by-image").checked = true;
  search().catch((e) => showError(String(e)));
});

function sparkline(history) {
  if (history.length < 2) return "";
  const t0 = history[0][0], t1 = history[history.length - 1][0];
  const lo = Math.min(...history.map((p) => p[1])), hi = Math.max(...history.map((p) => p[1]));
  return history.map(([t, n]) => {
    const x = t1 === t0 ? 200 : ((t - t0) / (t1 - t0)) * 200;
    const y = hi === lo ? 20 : 38 - ((n - lo) / (hi - lo)) * 36;
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  }).join(" ");
}

async function poll() {
  try {
    const response = await api("/status");
    if (response.ok) {
      const s = await response.json();
      const minutes = Math.max(1, Math.round(s.window_s / 60));
      $("live-items").textContent = String(s.index_size);
      $("live-rate").textContent = s.ingest_rate.toFixed(1);
      $("live-model").textContent = String(s.model_version);
      if (s.model) {
        $("live-trained").textContent = s.model.trained ? "trained" : s.model.note;
        $("live-trained").classList.toggle("warn", !s.model.trained);
      }
      $("live-generation").textContent = String(s.generation);
      $("live-rounds").textContent = String(s.learning_rounds);
      $("live-window").textContent = `in the last ${minutes} min (${s.learning_rounds_total} since start)`;
      const last = s.last_reencode;
      $("live-reencodes").textContent = `${s.reencodes} (${s.reencodes_total} since start)` + (last ?
        `; last: generation ${last.generation} (model v${last.model_version}), ${Math.round(last.ago_s)} s ago` : "");
      $("spark-line").setAttribute("points", sparkline(s.history));
    }
  } catch (e) {
    // the server restarting is not the page's error: keep the last numbers and poll again
  }
  setTimeout(poll, POLL_MS);
}
poll();
