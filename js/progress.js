// The progress widget's view: draws the state that nbparallel/widget.py syncs, nothing more.
// Python does the counting and throttling (at most ~10 updates a second); this file only turns the
// traits into DOM. Hooks for tests and styling: classes start with "nbp-", and the root carries
// data-state / data-done / data-failed / data-total.
import {
  barGeometry,
  countsText,
  formatBytes,
  formatCount,
  formatDuration,
  formatEta,
  formatRate,
  laneLabel,
  layoutLanes,
  stateTone,
} from "./format.js";

const TRAITS = [
  "description", "state", "done", "failed", "total", "rate", "elapsed", "eta", "workers", "lanes",
  "errors", "error_count", "output", "output_count", "summary", "cancellable", "cancel_requested", "shown",
];

function h(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function buildSkeleton(el) {
  const root = h("div", "nbp-progress");
  const head = h("div", "nbp-head");
  const parts = {
    root,
    badge: h("span", "nbp-badge"),
    desc: h("span", "nbp-desc"),
    counts: h("span", "nbp-counts"),
    pct: h("span", "nbp-pct"),
    rate: h("span", "nbp-rate"),
    time: h("span", "nbp-time"),
    cancel: h("button", "nbp-cancel", "Cancel"),
    bar: h("div", "nbp-bar"),
    barDone: h("div", "nbp-bar-done"),
    barFailed: h("div", "nbp-bar-failed"),
    summary: h("div", "nbp-summary"),
    lanesBox: h("details", "nbp-lanes-box"),
    lanesTitle: h("summary", "nbp-section-title"),
    lanes: h("div", "nbp-lanes"),
    errorsBox: h("details", "nbp-errors"),
    errorsTitle: h("summary", "nbp-section-title"),
    errorList: h("ol", "nbp-error-list"),
    outputBox: h("details", "nbp-output"),
    outputTitle: h("summary", "nbp-section-title"),
    outputLines: h("pre", "nbp-output-lines"),
  };
  parts.cancel.type = "button";
  parts.bar.setAttribute("role", "progressbar");
  parts.bar.setAttribute("aria-valuemin", "0");
  parts.bar.append(parts.barDone, parts.barFailed);
  head.append(parts.badge, parts.desc, parts.counts, parts.pct, h("span", "nbp-spacer"), parts.rate,
    parts.time, parts.cancel);
  parts.lanesBox.append(parts.lanesTitle, parts.lanes);
  parts.errorsBox.append(parts.errorsTitle, parts.errorList);
  parts.outputBox.append(parts.outputTitle, parts.outputLines);
  root.append(head, parts.bar, parts.summary, parts.lanesBox, parts.errorsBox, parts.outputBox);
  el.append(root);
  return parts;
}

function drawHead(parts, m) {
  const { state, done, failed, total } = m;
  const tone = stateTone(state, failed);
  const root = parts.root;
  root.dataset.state = state;
  root.dataset.tone = tone;
  root.dataset.done = String(done);
  root.dataset.failed = String(failed);
  root.dataset.total = total === null ? "" : String(total);
  root.style.display = m.shown ? "" : "none";
  parts.badge.textContent = state === "done" && failed > 0 ? "done, with failures" : state;
  parts.desc.textContent = m.description;
  parts.counts.textContent = countsText(done, failed, total);
  parts.counts.title = `${formatCount(done)} succeeded, ${formatCount(failed)} failed` +
    (total === null ? ", total not known yet" : ` of ${formatCount(total)}`);
  const bar = barGeometry(done, failed, total);
  parts.pct.textContent = bar.label;
  parts.bar.classList.toggle("nbp-indeterminate", bar.indeterminate && state === "running");
  parts.barDone.style.width = bar.indeterminate ? (state === "running" ? "" : "100%") : `${bar.done}%`;
  parts.barFailed.style.width = `${bar.failed}%`;
  if (!bar.indeterminate) parts.bar.setAttribute("aria-valuenow", bar.label.replace("%", ""));
  parts.rate.textContent = formatRate(m.rate);
  parts.rate.title = "items per second";
  const elapsed = formatDuration(m.elapsed);
  parts.time.textContent = state === "running" && m.eta !== null ? `${elapsed} · ETA ${formatEta(m.eta)}` : elapsed;
  parts.summary.textContent = state === "running" ? "" : m.summary;
  parts.summary.hidden = state === "running" || !m.summary;
  const canCancel = m.cancellable && state === "running";
  parts.cancel.hidden = !canCancel;
  parts.cancel.disabled = m.cancel_requested;
  parts.cancel.textContent = m.cancel_requested ? "Cancelling…" : "Cancel";
}

function drawLanes(parts, lanes, running, view) {
  parts.lanesBox.hidden = lanes.length === 0;
  const busy = lanes.filter((lane) => lane.state === "busy" || lane.state === "task").length;
  parts.lanesTitle.textContent = `workers · ${busy} busy of ${lanes.length}`;
  // Open while running; closed at the end, unless the user chose otherwise.
  if (!view.lanesTouched && parts.lanesBox.open !== running) {
    view.settingLanes = true;
    parts.lanesBox.open = running;
  }
  const layout = layoutLanes(lanes.length, parts.root.clientWidth || 640);
  parts.lanes.classList.toggle("nbp-compact", layout.compact);
  // Lanes pack to the left at a readable width rather than stretching across a wide cell.
  const laneWidth = layout.compact ? "92px" : "250px";
  parts.lanes.style.gridTemplateColumns = `repeat(${Math.max(1, layout.columns)}, minmax(0, ${laneWidth}))`;
  const rows = lanes.map((lane, position) => {
    const row = h("div", "nbp-lane");
    row.dataset.state = lane.state;
    row.dataset.pid = String(lane.pid);
    const what = laneLabel(lane);
    const mem = formatBytes(lane.rss);
    const tasks = `${formatCount(lane.tasks || 0)} done`;
    const title = [`worker ${position + 1} · pid ${lane.pid}`, what, mem, tasks, lane.note].filter(Boolean);
    row.title = title.join(" · ");
    row.append(h("span", "nbp-dot"));
    if (layout.compact) {
      row.append(h("span", "nbp-lane-what", what));
    } else {
      row.append(h("span", "nbp-lane-name", `w${position + 1}`), h("span", "nbp-lane-what", what),
        h("span", "nbp-lane-mem", mem), h("span", "nbp-lane-tasks", tasks));
    }
    if (lane.restarts > 0) {
      const mark = h("span", "nbp-lane-restarts", `↻${lane.restarts}`);
      mark.title = lane.note || "this worker was replaced";
      row.append(mark);
    }
    return row;
  });
  parts.lanes.replaceChildren(...rows);
}

function errorRow(error) {
  const li = h("li", "nbp-error");
  li.dataset.index = error.index === null ? "" : String(error.index);
  const box = h("details");
  const head = h("summary");
  const where = error.index === null || error.index === undefined ? "task" : `item ${formatCount(error.index)}`;
  const item = error.item && error.item !== String(error.index) ? ` (${error.item})` : "";
  head.append(h("span", "nbp-error-where", where + item), h("span", "nbp-error-msg", error.message));
  box.append(head, h("pre", "nbp-traceback", error.traceback || error.message));
  li.append(box);
  return li;
}

function drawErrors(parts, errors, count) {
  parts.errorsBox.hidden = count === 0;
  const shown = errors.length < count ? ` (first ${formatCount(errors.length)} listed)` : "";
  parts.errorsTitle.textContent = `${formatCount(count)} failed${shown}`;
  // The list only grows during a run, so rows already drawn keep their open/closed state.
  const list = parts.errorList;
  if (list.children.length > errors.length) list.replaceChildren();
  for (let i = list.children.length; i < errors.length; i += 1) list.append(errorRow(errors[i]));
}

function drawOutput(parts, lines, count) {
  parts.outputBox.hidden = count === 0;
  const dropped = count - lines.length;
  parts.outputTitle.textContent = `worker output · ${formatCount(count)} lines` + (dropped > 0 ? ` (last ${lines.length} kept)` : "");
  const pre = parts.outputLines;
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.replaceChildren(...lines.map((line) => {
    const tag = line.index === null || line.index === undefined ? "" : `[item ${line.index}] `;
    return h("div", line.stream === "stderr" ? "nbp-line nbp-stderr" : "nbp-line", tag + line.text);
  }));
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

function render({ model, el }) {
  const parts = buildSkeleton(el);
  const view = { lanesTouched: false, settingLanes: false, drawn: {} };
  parts.lanesBox.addEventListener("toggle", () => {
    if (view.settingLanes) view.settingLanes = false;
    else view.lanesTouched = true;
  });
  parts.cancel.addEventListener("click", () => {
    model.set("cancel_requested", true);
    model.save_changes();
  });

  const read = () => Object.fromEntries(TRAITS.map((name) => [name, model.get(name)]));
  const draw = () => {
    const m = read();
    drawHead(parts, m);
    // Lists are redrawn only when they changed: output may hold hundreds of lines.
    if (view.drawn.lanes !== m.lanes || view.drawn.running !== (m.state === "running")) {
      drawLanes(parts, m.lanes || [], m.state === "running", view);
      view.drawn.lanes = m.lanes;
      view.drawn.running = m.state === "running";
    }
    if (view.drawn.errors !== m.errors || view.drawn.errorCount !== m.error_count) {
      drawErrors(parts, m.errors || [], m.error_count || 0);
      view.drawn.errors = m.errors;
      view.drawn.errorCount = m.error_count;
    }
    if (view.drawn.output !== m.output) {
      drawOutput(parts, m.output || [], m.output_count || 0);
      view.drawn.output = m.output;
    }
  };

  // One update message sets several traits; draw once for all of them.
  let queued = false;
  const schedule = () => {
    if (queued) return;
    queued = true;
    queueMicrotask(() => {
      queued = false;
      draw();
    });
  };
  for (const name of TRAITS) model.on(`change:${name}`, schedule);
  draw();
  return () => {
    for (const name of TRAITS) model.off(`change:${name}`, schedule);
  };
}

export default { render };
