// StreetCLIP in the browser: photos are decoded, preprocessed and geolocated on this page with onnxruntime-web's
// WebAssembly back end. The page fetches only its own files and the model's (config.json, preprocessor_config.json
// and one graph); no photo, pixel or answer is ever sent anywhere.

import * as ort from "./node_modules/onnxruntime-web/dist/ort.wasm.min.mjs";
import { CandidateTable, DECISIONS, confidenceRegion, rankAnswers } from "./decisions.js";
import { WorldMap } from "./map.js";
import { decodeImage, imageSettings, pixelValues } from "./preprocess.js";

// The runtime's WebAssembly files, served beside the page (never from a CDN).
ort.env.wasm.wasmPaths = new URL("./node_modules/onnxruntime-web/dist/", import.meta.url).href;

const NUMBER_DIGITS = { latitude: 4, longitude: 4, expected_distance_km: 1, radius_km: 0 };
const PROBABILITY_DIGITS = 4;

const elements = Object.fromEntries(
  ["status", "photos", "drop", "decision", "top_k", "map", "errors", "confidence", "answers"].map((id) => [id, document.getElementById(id)]),
);
const state = { model: null, photos: [], errors: [] };

function setStatus(text, phase, details = {}) {
  elements.status.textContent = text;
  elements.status.dataset.phase = phase;
  Object.assign(elements.status.dataset, details);
}

// The model's address and graph: the query (?model=URL&graph=onnx/model_quantized.onnx) overrides settings.json.
// ?threads=N sets the WebAssembly threads (onnxruntime-web's default: half the cores, at most 4).
async function modelLocation() {
  const response = await fetch("settings.json");
  if (!response.ok) throw new Error(`settings.json could not be read (HTTP ${response.status}).`);
  const settings = await response.json();
  const query = new URLSearchParams(window.location.search);
  const model = query.get("model") ?? settings.model;
  const graph = query.get("graph") ?? settings.graph;
  if (query.has("threads")) ort.env.wasm.numThreads = Number.parseInt(query.get("threads"), 10);
  return { base: new URL(model.endsWith("/") ? model : `${model}/`, window.location.href), graph };
}

async function fetchJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url} could not be read (HTTP ${response.status}).`);
  return response.json();
}

async function loadModel() {
  const { base, graph } = await modelLocation();
  const config = await fetchJson(new URL("config.json", base));
  const preprocessor = await fetchJson(new URL("preprocessor_config.json", base));
  const imageSize = config.vision_config?.image_size;
  const session = await ort.InferenceSession.create(new URL(graph, base).href, { executionProviders: ["wasm"] });
  for (const name of ["country_logits", "city_logits", "logits"]) {
    if (!session.outputNames.includes(name)) throw new Error(`${graph} has no output ${name}: export it with \`streetclip export\`.`);
  }
  const table = new CandidateTable(config);
  return { session, table, imageSize, settings: imageSettings(preprocessor, imageSize), map: new WorldMap(elements.map, table), name: base.href };
}

async function geolocate(file) {
  const { rgb, width, height } = await decodeImage(file);
  const { session, settings, imageSize } = state.model;
  const input = new ort.Tensor("float32", pixelValues(rgb, width, height, settings), [1, 3, imageSize, imageSize]);
  const results = await session.run({ pixel_values: input });
  return Object.fromEntries(session.outputNames.map((name) => [name, results[name].data]));
}

async function addPhotos(files) {
  if (!state.model || !files.length) return;
  const started = performance.now();
  let answered = 0;
  for (const file of files) {
    const number = state.photos.length + state.errors.length + 1;
    setStatus(`Geolocating ${file.name} (${number})…`, "busy");
    try {
      state.photos.push({ number, name: file.name, outputs: await geolocate(file) });
      answered += 1;
    } catch (error) {
      state.errors.push({ number, name: file.name, message: error.message });
    }
    render();
  }
  const seconds = (performance.now() - started) / 1000;
  setStatus(`Answered ${answered} of ${files.length} photos in ${seconds.toFixed(2)} s, here in this browser.`, "done", {
    photos: String(answered),
    seconds: String(seconds),
  });
}

// A cell shows `text`; any value other than text is kept whole, as JSON, in its data-value.
function cell(row, text, value) {
  const td = row.insertCell();
  td.textContent = text;
  if (value !== undefined && typeof value !== "string") td.dataset.value = JSON.stringify(value);
  return td;
}

function shown(field, value) {
  if (typeof value === "number") return value.toFixed(NUMBER_DIGITS[field] ?? PROBABILITY_DIGITS);
  if (value === null) return "none";
  if (typeof value === "object") {
    return Object.entries(value)
      .map(([radius, mass]) => `${radius} km: ${mass.toFixed(PROBABILITY_DIGITS)}`)
      .join(", ");
  }
  return String(value);
}

function listItems(list, items) {
  list.replaceChildren(
    ...items.map((text) => {
      const item = document.createElement("li");
      item.textContent = text;
      return item;
    }),
  );
}

function render() {
  const decision = elements.decision.value;
  const topK = Math.max(1, Number.parseInt(elements.top_k.value, 10) || 1);
  const { table: places, map } = state.model;
  const ranked = state.photos.map((photo) => {
    const answers = rankAnswers(places, photo.outputs, decision, topK);
    return { ...photo, answers, region: confidenceRegion(places, photo.outputs, answers[0]) };
  });
  map.show(ranked);
  const table = elements.answers;
  table.tHead.replaceChildren();
  table.tBodies[0].replaceChildren();
  if (ranked.length) {
    const fields = Object.keys(ranked[0].answers[0]);
    const header = table.tHead.insertRow();
    for (const name of ["photo", "file", "rank", ...fields]) header.appendChild(document.createElement("th")).textContent = name;
    for (const photo of ranked) {
      photo.answers.forEach((answer, rank) => {
        const row = table.tBodies[0].insertRow();
        cell(row, String(photo.number));
        cell(row, photo.name);
        cell(row, String(rank + 1));
        for (const field of fields) cell(row, shown(field, answer[field]), answer[field]);
      });
    }
  }
  // How sure, around each best answer, in the Space's words.
  listItems(elements.confidence, ranked.map(({ number, name, region }) => `${number}. ${name}: ${region.words}`));
  listItems(elements.errors, state.errors.map(({ number, name, message }) => `${number}. ${name}: ${message}`));
}

async function main() {
  for (const decision of DECISIONS) elements.decision.add(new Option(decision.replace("_", " "), decision));
  elements.photos.addEventListener("change", () => {
    const files = [...elements.photos.files];
    elements.photos.value = ""; // the next choice, even of the same files, is a new one
    addPhotos(files);
  });
  elements.drop.addEventListener("dragover", (event) => event.preventDefault());
  elements.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    addPhotos([...event.dataTransfer.files]);
  });
  for (const control of [elements.decision, elements.top_k]) control.addEventListener("change", () => state.model && render());
  try {
    state.model = await loadModel();
  } catch (error) {
    setStatus(`The model could not be loaded: ${error.message}`, "error");
    return;
  }
  elements.photos.disabled = false;
  const { table, name } = state.model;
  setStatus(`Ready: ${table.numCities} candidate cities in ${table.country_names.length} countries (${name}).`, "ready");
}

main();
