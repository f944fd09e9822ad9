// Unit tests for the widget's pure helpers: `node --test js/` (pytest runs it too, tests/system/test_js.py).
import assert from "node:assert/strict";
import { test } from "node:test";

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
  percentLabel,
  sectionKey,
  stateTone,
} from "./format.js";

test("formatCount groups thousands and survives odd input", () => {
  assert.equal(formatCount(0), "0");
  assert.equal(formatCount(999), "999");
  assert.equal(formatCount(1000), "1,000");
  assert.equal(formatCount(1234567), "1,234,567");
  assert.equal(formatCount(-4200), "-4,200");
  assert.equal(formatCount(null), "?");
  assert.equal(formatCount(Number.NaN), "?");
});

test("formatDuration: seconds with a decimal, then m:ss, then h:mm:ss", () => {
  assert.equal(formatDuration(0), "0.0 s");
  assert.equal(formatDuration(0.44), "0.4 s");
  assert.equal(formatDuration(12.34), "12.3 s");
  assert.equal(formatDuration(59.96), "1:00"); // would round to "60.0 s"
  assert.equal(formatDuration(65), "1:05");
  assert.equal(formatDuration(3723), "1:02:03");
  assert.equal(formatDuration(null), "–");
  assert.equal(formatDuration(-1), "–");
});

test("formatEta is whole seconds and says when it does not know", () => {
  assert.equal(formatEta(null), "–");
  assert.equal(formatEta(undefined), "–");
  assert.equal(formatEta(Number.POSITIVE_INFINITY), "–");
  assert.equal(formatEta(0.3), "< 1 s");
  assert.equal(formatEta(7.4), "7 s");
  assert.equal(formatEta(125), "2:05");
  assert.equal(formatEta(90000), "> 1 day");
});

test("formatRate picks a precision by magnitude, and per minute for slow work", () => {
  assert.equal(formatRate(0), "–");
  assert.equal(formatRate(null), "–");
  assert.equal(formatRate(12345.6), "12,346/s");
  assert.equal(formatRate(85.24), "85.2/s");
  assert.equal(formatRate(0.5), "0.50/s");
  assert.equal(formatRate(0.05), "3.0/min");
});

test("formatBytes uses binary units and is empty before the first sample", () => {
  assert.equal(formatBytes(0), "");
  assert.equal(formatBytes(null), "");
  assert.equal(formatBytes(512), "512 B");
  assert.equal(formatBytes(1536), "1.5 KiB");
  assert.equal(formatBytes(52 * 2 ** 20), "52 MiB");
  assert.equal(formatBytes(1.44 * 2 ** 30), "1.4 GiB");
});

test("percentLabel rounds, but says 100% only at the end and 0% only before the first", () => {
  assert.equal(percentLabel(1, 6), "17%"); // not 16%
  assert.equal(percentLabel(1, 8), "13%"); // halves round up, as in Python's percent()
  assert.equal(percentLabel(999, 1000), "99%");
  assert.equal(percentLabel(1, 1000), "1%");
  assert.equal(percentLabel(0, 1000), "0%");
  assert.equal(percentLabel(6, 6), "100%");
  assert.equal(percentLabel(0, 0), "100%");
  assert.equal(percentLabel(3, null), "");
});

test("isSingleTask: one submitted task shows no counts", () => {
  assert.equal(isSingleTask(1, "tasks"), true);
  assert.equal(isSingleTask(2, "tasks"), false);
  assert.equal(isSingleTask(1, "items"), false);
});

test("sectionKey names sections as the static rendering does", () => {
  assert.equal(sectionKey("errors"), "errors");
  assert.equal(sectionKey("error", { index: 7, where: "item 7" }), "error-7");
  assert.equal(sectionKey("error", { index: null, where: "task 2" }), "error-task 2");
});

test("barGeometry splits done and failed, rounds the percent, and handles unknown totals", () => {
  assert.deepEqual(barGeometry(0, 0, 10), { indeterminate: false, done: 0, failed: 0, label: "0%" });
  assert.deepEqual(barGeometry(3, 1, 10), { indeterminate: false, done: 30, failed: 10, label: "40%" });
  assert.equal(barGeometry(999, 0, 1000).label, "99%");
  assert.equal(barGeometry(1000, 0, 1000).label, "100%");
  assert.equal(barGeometry(5, 0, 0).label, "100%");
  assert.equal(barGeometry(5, 0, null).indeterminate, true);
  // More outcomes than the total (a total that was a guess) never overflows the bar.
  const over = barGeometry(12, 3, 10);
  assert.equal(over.done, 100);
  assert.equal(over.failed, 0);
  assert.equal(over.label, "100%");
});

test("stateTone: failures make a finished run a warning; a failed run is bad", () => {
  assert.equal(stateTone("running", 0), "live");
  assert.equal(stateTone("done", 0), "ok");
  assert.equal(stateTone("done", 2), "warn");
  assert.equal(stateTone("failed", 1), "bad");
  assert.equal(stateTone("cancelled", 0), "muted");
});

test("laneLabel names what a worker is doing", () => {
  assert.equal(laneLabel({ state: "busy", index: 1234 }), "item 1,234");
  assert.equal(laneLabel({ state: "busy", index: null }), "busy");
  assert.equal(laneLabel({ state: "busy", index: 2, label: "k=0, seed=3" }), "k=0, seed=3");
  assert.equal(laneLabel({ state: "loading", index: null }), "loading");
  assert.equal(laneLabel({ state: "task", index: 0 }), "task 1");
  assert.equal(laneLabel({ state: "other" }), "other job");
  assert.equal(laneLabel({ state: "starting" }), "starting");
  assert.equal(laneLabel({ state: "crashed" }), "crashed");
  assert.equal(laneLabel({ state: "idle" }), "idle");
  assert.equal(laneLabel({}), "idle");
});

test("layoutLanes fits columns to the width and goes compact for many workers", () => {
  assert.deepEqual(layoutLanes(0, 800), { columns: 0, rows: 0, compact: false });
  assert.deepEqual(layoutLanes(2, 800), { columns: 2, rows: 1, compact: false });
  assert.deepEqual(layoutLanes(8, 700), { columns: 2, rows: 4, compact: false });
  assert.deepEqual(layoutLanes(1, 100), { columns: 1, rows: 1, compact: false });
  const many = layoutLanes(64, 880);
  assert.equal(many.compact, true);
  assert.equal(many.columns, 8);
  assert.equal(many.rows, 8);
});

test("countsText counts failures as finished items", () => {
  assert.equal(countsText(420, 3, 1000), "423 / 1,000");
  assert.equal(countsText(7, 0, null), "7 items");
  assert.equal(countsText(0, 0, 0), "0 / 0");
});
