"use strict";
// Scores each chosen or dropped image with POST score?heatmap=true, one at a time, in order.
// Everything the server or the user named (file names, messages) goes in as text, never as markup.

const results = document.getElementById("results");
const input = document.getElementById("files");
const drop = document.getElementById("drop");
let thresholds = null;
let queue = Promise.resolve();

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function number(value) {
  if (value === null || value === undefined) return "–";
  if (!Number.isFinite(value)) return String(value);
  const size = Math.abs(value);
  return size !== 0 && (size >= 1e4 || size < 1e-3) ? value.toExponential(3) : String(Number(value.toPrecision(4)));
}

function describe(list, pairs) {
  list.replaceChildren();
  for (const [term, value] of pairs) {
    list.append(element("dt", "", term), element("dd", "", String(value)));
  }
}

async function loadModel() {
  const list = document.getElementById("card");
  try {
    const response = await fetch("model");
    const model = await response.json();
    thresholds = model.thresholds;
    const calibration = model.calibration;
    describe(list, [
      ["trained on", `${model.training_data.images} images`],
      ["from", model.training_data.path],
      ["left out as likely outliers", model.training_data.rejected_as_outliers],
      ["sees", `${model.image_size} px, ` + (model.code_grid > 1 ? `${model.code_grid}×${model.code_grid} local codes` : "one code per image")],
      ["reconstruction threshold", number(thresholds.reconstruction)],
      ["density threshold", number(thresholds.density)],
      ...(thresholds.anomaly_log_odds === null ? [] : [["lookalike log-odds threshold", number(thresholds.anomaly_log_odds)]]),
      ["thresholds set by", calibration ? `calibration on ${calibration.good_samples} good and ${calibration.anomalous_samples} anomalous samples`
                                        : "training's defaults (not calibrated)"],
    ]);
    const warnings = document.getElementById("warnings");
    for (const warning of calibration ? calibration.warnings : []) warnings.append(element("li", "", warning));
  } catch (error) {
    describe(list, [["model", "summary unavailable"]]);
  }
}

function signals(row) {
  const table = element("table", "signals");
  const lines = [
    ["reconstruction error", row.reconstruction_error, thresholds && thresholds.reconstruction, (v, t) => v > t, "≤"],
    ["log-density", row.log_density, thresholds && thresholds.density, (v, t) => v < t, "≥"],
  ];
  if (row.anomaly_log_odds !== null) {
    lines.push(["lookalike log-odds", row.anomaly_log_odds, thresholds && thresholds.anomaly_log_odds, (v, t) => v > t, "≤"]);
  }
  for (const [name, value, threshold, over, within] of lines) {
    const tr = element("tr", threshold !== null && over(value, threshold) ? "over" : "within");
    tr.append(element("th", "", name), element("td", "value", number(value)),
              element("td", "threshold", threshold === null ? "" : `threshold ${within} ${number(threshold)}`));
    table.append(tr);
  }
  return table;
}

function show(item, row) {
  item.className = "result " + (row.anomaly ? "anomalous" : "normal");
  item.querySelector(".verdict").textContent = row.anomaly ? "anomalous" : "normal";
  const body = element("div", "body");
  if (row.heatmap_png) {
    const image = element("img", "heatmap");
    image.alt = "anomaly map of " + row.path;
    image.src = "data:image/png;base64," + row.heatmap_png;
    body.append(image);
  }
  const facts = element("div", "facts");
  facts.append(element("p", "score", `score ${number(row.score)}` + (row.anomaly ? ` (by ${row.reason})` : "")),
               signals(row), element("p", "peak", `map peaks at x ${row.peak_x}, y ${row.peak_y}`));
  body.append(facts);
  item.append(body);
}

async function score(file) {
  const item = element("li", "result pending");
  const head = element("div", "head");
  head.append(element("span", "name", file.name), element("span", "verdict", "scoring…"));
  item.append(head);
  results.append(item);
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await fetch("score?heatmap=true", { method: "POST", body: form });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `the server answered ${response.status}`);
    show(item, answer[0]);
  } catch (error) {
    item.className = "result failed";
    item.querySelector(".verdict").textContent = "not scored";
    item.append(element("p", "error", error.message));
  }
}

function take(files) {
  for (const file of files) queue = queue.then(() => score(file));
}

input.addEventListener("change", () => { take([...input.files]); input.value = ""; });
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => { event.preventDefault(); take([...event.dataTransfer.files]); });
loadModel();
