// Pure helpers for the progress widget: numbers to short text, and how to lay out worker lanes.
// No DOM here, so `node --test js/` can check every branch. widget.py joins this file and
// progress.js into one ES module (the frontend loads the widget as a single module, so a relative
// import could not be resolved there).

/** "1,234": thousands separators that do not depend on the browser's locale. */
export function formatCount(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return "?";
  const sign = n < 0 ? "-" : "";
  const digits = String(Math.trunc(Math.abs(n)));
  return sign + digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

/** Elapsed time: "0.4 s", "12.3 s", "1:05", "1:02:03". */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds) || seconds < 0) return "–";
  if (seconds < 60) {
    // One decimal, except when rounding would print "60.0 s".
    const text = seconds.toFixed(1);
    if (text !== "60.0") return `${text} s`;
  }
  const total = Math.round(seconds);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = String(total % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
}

/** Time left: whole seconds (a tenth of a second is noise in an estimate), "–" when unknown. */
export function formatEta(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds) || seconds < 0) return "–";
  if (seconds >= 86400) return "> 1 day";
  if (seconds < 1) return "< 1 s";
  const whole = Math.round(seconds);
  return whole < 60 ? `${whole} s` : formatDuration(whole);
}

/** Items per second: "1,234/s", "85.2/s", "0.50/s", or per minute when slower than 0.1/s. */
export function formatRate(perSecond) {
  if (perSecond === null || perSecond === undefined || !Number.isFinite(perSecond) || perSecond <= 0) {
    return "–";
  }
  if (perSecond >= 100) return `${formatCount(Math.round(perSecond))}/s`;
  if (perSecond >= 10) return `${perSecond.toFixed(1)}/s`;
  if (perSecond >= 0.1) return `${perSecond.toFixed(2)}/s`;
  return `${(perSecond * 60).toFixed(1)}/min`;
}

/** Resident memory: "812 KiB", "52 MiB", "1.4 GiB"; empty when not sampled yet. */
export function formatBytes(bytes) {
  if (!bytes || !Number.isFinite(bytes) || bytes <= 0) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const text = value >= 10 || unit === 0 ? String(Math.round(value)) : value.toFixed(1);
  return `${text} ${units[unit]}`;
}

/**
 * Bar geometry. Widths are percentages of the whole bar (done in one colour, failed in another);
 * `label` is what the header shows. Unknown totals give `indeterminate: true`.
 */
export function barGeometry(done, failed, total) {
  const finished = (done || 0) + (failed || 0);
  if (total === null || total === undefined || total < 0) {
    return { indeterminate: true, done: 0, failed: 0, label: "" };
  }
  if (total === 0) return { indeterminate: false, done: 100, failed: 0, label: "100%" };
  const clamp = (x) => Math.max(0, Math.min(100, x));
  const donePct = clamp((100 * (done || 0)) / total);
  const failedPct = clamp(Math.min(100 - donePct, (100 * (failed || 0)) / total));
  return { indeterminate: false, done: donePct, failed: failedPct, label: percentLabel(finished, total) };
}

/**
 * Whole percent, rounded (1 of 6 is "17%"), but never "100%" before every item has an outcome nor
 * "0%" after the first (as percent() in nbparallel/progress/format.py). Empty for an unknown total.
 */
export function percentLabel(finished, total) {
  if (total === null || total === undefined || total < 0) return "";
  if (total === 0 || finished >= total) return "100%";
  const whole = Math.floor((100 * finished) / total + 0.5);
  return `${Math.max(finished > 0 ? 1 : 0, Math.min(99, whole))}%`;
}

/** One submitted task: the display shows no counts, percentages, rates or worker totals. */
export function isSingleTask(total, unit) {
  return total === 1 && unit === "tasks";
}

/** The colour class of the whole widget: a run that finished with failures is a warning, not a success. */
export function stateTone(state, failed) {
  if (state === "done") return failed > 0 ? "warn" : "ok";
  if (state === "failed") return "bad";
  if (state === "cancelled") return "muted";
  return "live";
}

/** What a worker lane says it is doing. */
export function laneLabel(lane) {
  switch (lane.state) {
    case "busy":
      if (lane.label) return lane.label; // a %%parallel run: its parameters
      return lane.index === null || lane.index === undefined ? "busy" : `item ${formatCount(lane.index)}`;
    case "loading":
      return "loading";
    case "task":
      return lane.index === null || lane.index === undefined ? "task" : `task ${lane.index + 1}`;
    case "other":
      return "other job";
    case "starting":
      return "starting";
    case "crashed":
      return "crashed";
    default:
      return "idle";
  }
}

/**
 * How many lane columns fit in `width` pixels, and whether to draw compact chips instead of rows
 * (a 64-core machine should not push the bar off screen).
 */
export function layoutLanes(count, width, minLaneWidth = 262) {
  if (!count || count < 1) return { columns: 0, rows: 0, compact: false };
  const compact = count > 16;
  const laneWidth = compact ? 100 : minLaneWidth;
  const fit = Math.max(1, Math.floor((width || laneWidth) / laneWidth));
  const columns = Math.min(count, fit);
  return { columns, rows: Math.ceil(count / columns), compact };
}

/**
 * The name under which a view keeps a section's open state and scroll position, the same in the
 * live widget and in the static rendering that replaces it (nbparallel/progress/static.py).
 */
export function sectionKey(kind, error) {
  if (kind !== "error") return kind;
  const index = error.index === null || error.index === undefined ? null : error.index;
  return index === null ? `error-${error.where}` : `error-${index}`;
}

/** The header's count: items with an outcome over the total, "423 / 1,000" (failures are counted in). */
export function countsText(done, failed, total) {
  const finished = (done || 0) + (failed || 0);
  if (total === null || total === undefined || total < 0) return `${formatCount(finished)} items`;
  return `${formatCount(finished)} / ${formatCount(total)}`;
}
