// The progress widget's view: draws the state that nbparallel/progress/widget.py syncs, nothing more.
// Python does the counting and throttling (at most ~10 updates a second); this file only turns the
// traits into DOM. Hooks for tests and styling: classes start with "nbp-", and the root carries
// data-state / data-done / data-failed / data-total.
//
// What the user opened and where they scrolled survives everything: updates only add to the DOM or
// change text (a section is never rebuilt), and when the call ends and its widget is replaced by a
// static rendering (nbparallel/progress/static.py), the same sections are opened and scrolled there
// (see "Keeping the user's view" below).
import {
  barGeometry,
  countsText,
  formatBytes,
  formatCount,
  formatDuration,
  formatEta,
  formatRate,
  isSingleTask,
  laneLabel,
  layoutLanes,
  sectionKey,
  stateTone,
} from "./format.js";

const TRAITS = [
  "description", "state", "done", "failed", "total", "rate", "elapsed", "eta", "workers", "lanes",
  "errors", "error_count", "summary", "cancellable", "cancel_requested", "shown", "unit",
];

function h(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// -- Keeping the user's view ----------------------------------------------------------------------
// One registry per page, shared by every widget's module (each widget loads this file as a module of
// its own): key (the display id) -> { open: {section: bool}, scroll: {section: px}, pending }.
// A view writes what the user does into it; when the static rendering with that key appears in the
// page, a MutationObserver (connected only while some key waits for it) applies it there before the
// browser paints, so no section snaps shut and the page does not jump.

const REGISTRY = Symbol.for("nbparallel.progress.ui");
const WAIT_FOR_STATIC_MS = 60_000;

function registry() {
  globalThis[REGISTRY] ??= { views: new Map(), observer: null, timer: null };
  return globalThis[REGISTRY];
}

function uiState(key) {
  const views = registry().views;
  if (!views.has(key)) views.set(key, { open: {}, scroll: {}, pending: false });
  return views.get(key);
}

/** Open the sections and set the scroll positions ``ui`` recorded, inside ``root``. */
function applyUi(root, ui) {
  for (const node of root.querySelectorAll("details[data-nbp-section]")) {
    const want = ui.open[node.dataset.nbpSection];
    if (want !== undefined && node.open !== want) node.open = want;
  }
  for (const node of root.querySelectorAll("[data-nbp-scroll]")) {
    const top = ui.scroll[node.dataset.nbpScroll];
    if (top) node.scrollTop = top;
  }
}

function restoreStatic(added) {
  const reg = registry();
  for (const node of added) {
    if (!(node instanceof Element)) continue;
    const found = node.matches(".nbp-static[data-nbp-key]") ? [node] : node.querySelectorAll(".nbp-static[data-nbp-key]");
    for (const root of found) {
      const ui = reg.views.get(root.dataset.nbpKey);
      if (!ui || !ui.pending) continue;
      applyUi(root, ui);
      ui.pending = false;
    }
  }
  if (![...reg.views.values()].some((ui) => ui.pending)) stopWatching();
}

function stopWatching() {
  const reg = registry();
  reg.observer?.disconnect();
  reg.observer = null;
  clearTimeout(reg.timer);
}

/** The call behind ``key`` ended: its static rendering is about to replace the widget. */
function expectStatic(key) {
  const reg = registry();
  uiState(key).pending = true;
  if (!reg.observer && typeof MutationObserver !== "undefined") {
    reg.observer = new MutationObserver((records) => restoreStatic(records.flatMap((r) => [...r.addedNodes])));
    reg.observer.observe(document.body, { childList: true, subtree: true });
  }
  clearTimeout(reg.timer);
  reg.timer = setTimeout(() => {
    for (const ui of reg.views.values()) ui.pending = false;
    stopWatching();
  }, WAIT_FOR_STATIC_MS);
  // Already there (the widget's last frame came after the static rendering): apply it now.
  restoreStatic([document.body]);
}

// -- drawing --------------------------------------------------------------------------------------

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
    errorsBox: h("details", "nbp-errors"),
    errorsTitle: h("summary", "nbp-section-title"),
    errorList: h("ol", "nbp-error-list"),
    lanesBox: h("details", "nbp-lanes-box"),
    lanesTitle: h("summary", "nbp-section-title"),
    lanes: h("div", "nbp-lanes"),
  };
  parts.cancel.type = "button";
  parts.bar.setAttribute("role", "progressbar");
  parts.bar.setAttribute("aria-valuemin", "0");
  parts.bar.append(parts.barDone, parts.barFailed);
  head.append(parts.badge, parts.desc, parts.counts, parts.pct, h("span", "nbp-spacer"), parts.rate,
    parts.time, parts.cancel);
  parts.errorsBox.dataset.nbpSection = "errors";
  parts.errorsBox.open = true; // the list of one-line failures; each traceback opens on its own
  parts.errorList.dataset.nbpScroll = "errors";
  parts.errorsBox.append(parts.errorsTitle, parts.errorList);
  parts.lanesBox.dataset.nbpSection = "lanes";
  parts.lanesBox.append(parts.lanesTitle, parts.lanes);
  root.append(head, parts.bar, parts.summary, parts.errorsBox, parts.lanesBox);
  el.append(root);
  return parts;
}

function drawHead(parts, m) {
  const { state, done, failed, total } = m;
  const single = isSingleTask(total, m.unit);
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
  parts.desc.title = m.description;
  parts.counts.hidden = single;
  parts.pct.hidden = single;
  parts.rate.hidden = single;
  parts.counts.textContent = single ? "" : countsText(done, failed, total);
  parts.counts.title = `${formatCount(done)} succeeded, ${formatCount(failed)} failed` +
    (total === null ? ", total not known yet" : ` of ${formatCount(total)}`);
  const bar = barGeometry(done, failed, total);
  parts.pct.textContent = single ? "" : bar.label;
  const spin = (bar.indeterminate || single) && state === "running";
  parts.bar.classList.toggle("nbp-indeterminate", spin);
  if (single) {
    parts.barDone.style.width = state === "running" ? "" : (failed > 0 ? "0%" : "100%");
    parts.barFailed.style.width = state !== "running" && failed > 0 ? "100%" : "0%";
  } else {
    parts.barDone.style.width = bar.indeterminate ? (state === "running" ? "" : "100%") : `${bar.done}%`;
    parts.barFailed.style.width = `${bar.failed}%`;
  }
  if (!bar.indeterminate && !single) parts.bar.setAttribute("aria-valuenow", bar.label.replace("%", ""));
  parts.rate.textContent = formatRate(m.rate);
  parts.rate.title = "items per second";
  const elapsed = formatDuration(m.elapsed);
  const eta = state === "running" && m.eta !== null && !single;
  parts.time.textContent = eta ? `${elapsed} · ETA ${formatEta(m.eta)}` : elapsed;
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
  const ui = view.ui.open.lanes;
  const open = ui === undefined ? running : ui;
  if (parts.lanesBox.open !== open) {
    view.settingLanes = true;
    parts.lanesBox.open = open;
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
    const tasks = lane.tasks === null || lane.tasks === undefined ? "" : `${formatCount(lane.tasks)} done`;
    const title = [`worker ${position + 1} · pid ${lane.pid}`, what, mem, tasks, lane.note].filter(Boolean);
    row.title = title.join(" · ");
    row.append(h("span", "nbp-dot"));
    if (layout.compact) {
      row.append(h("span", "nbp-lane-what", what));
    } else {
      row.append(h("span", "nbp-lane-name", `w${position + 1}`), h("span", "nbp-lane-what", what),
        h("span", "nbp-lane-mem", mem));
      if (tasks) row.append(h("span", "nbp-lane-tasks", tasks));
    }
    if (lane.restarts > 0) {
      const mark = h("span", "nbp-lane-restarts", `↻${lane.restarts}`);
      mark.title = lane.note || "this worker crashed and was replaced";
      row.append(mark);
    }
    return row;
  });
  parts.lanes.replaceChildren(...rows);
}

function errorRow(error, view) {
  const li = h("li", "nbp-error");
  li.dataset.index = error.index === null || error.index === undefined ? "" : String(error.index);
  const box = h("details");
  const key = sectionKey("error", error);
  box.dataset.nbpSection = key;
  if (view.ui.open[key]) box.open = true;
  box.addEventListener("toggle", () => {
    view.ui.open[key] = box.open;
  });
  const head = h("summary");
  head.append(h("span", "nbp-error-where", error.where), h("span", "nbp-error-msg", error.message));
  head.title = error.message;
  const trace = h("pre", "nbp-traceback", error.traceback || error.message);
  trace.dataset.nbpScroll = `traceback-${key}`;
  box.append(head, trace);
  li.append(box);
  return li;
}

function drawErrors(parts, errors, count, view) {
  parts.errorsBox.hidden = count === 0;
  const shown = errors.length < count ? ` (first ${formatCount(errors.length)} listed)` : "";
  parts.errorsTitle.textContent = `${formatCount(count)} failed${shown}`;
  // The list only grows during a run: rows already drawn keep their open state and the scroll.
  const list = parts.errorList;
  if (list.children.length > errors.length) list.replaceChildren();
  for (let i = list.children.length; i < errors.length; i += 1) list.append(errorRow(errors[i], view));
}

function render({ model, el }) {
  const key = model.get("key") || "";
  const view = { ui: key ? uiState(key) : { open: {}, scroll: {} }, settingLanes: false, drawn: {} };
  const parts = buildSkeleton(el);
  applyUi(parts.root, view.ui);
  for (const box of [parts.errorsBox, parts.lanesBox]) {
    box.addEventListener("toggle", () => {
      if (box === parts.lanesBox && view.settingLanes) {
        view.settingLanes = false;
        return;
      }
      view.ui.open[box.dataset.nbpSection] = box.open;
    });
  }
  // Scroll positions (the failure list, each traceback) are kept as the user leaves them.
  parts.root.addEventListener("scroll", (event) => {
    const target = event.target;
    if (target instanceof Element && target.dataset.nbpScroll) view.ui.scroll[target.dataset.nbpScroll] = target.scrollTop;
  }, true);
  parts.cancel.addEventListener("click", () => {
    model.set("cancel_requested", true);
    model.save_changes();
  });

  const read = () => Object.fromEntries(TRAITS.map((name) => [name, model.get(name)]));
  const draw = () => {
    const m = read();
    drawHead(parts, m);
    // Lists are redrawn only when they changed.
    if (view.drawn.lanes !== m.lanes || view.drawn.running !== (m.state === "running")) {
      drawLanes(parts, m.lanes || [], m.state === "running", view);
      view.drawn.lanes = m.lanes;
      view.drawn.running = m.state === "running";
    }
    if (view.drawn.errors !== m.errors || view.drawn.errorCount !== m.error_count) {
      drawErrors(parts, m.errors || [], m.error_count || 0, view);
      view.drawn.errors = m.errors;
      view.drawn.errorCount = m.error_count;
    }
    if (m.state !== "running" && key && !view.ended) {
      view.ended = true;
      expectStatic(key);
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
    // Removed because the call ended: its static rendering takes over what the user had opened.
    if (key && model.get("state") !== "running") expectStatic(key);
  };
}

export default { render };
