// Each progress widget's own ES module: it loads the view (format.js + progress.js, joined by
// nbparallel/progress/widget.py) and its CSS from the kernel's one shared ViewCode model, once per
// page, so saved widget state holds the view's code once, not once per widget.
const VIEWS = Symbol.for("nbparallel.progress.views");

function loadView(model) {
  const cache = (globalThis[VIEWS] ??= new Map());
  const id = model.get("view_code");
  if (!cache.has(id)) {
    const pending = (async () => {
      const shared = await model.widget_manager.get_model(id);
      const style = document.createElement("style");
      style.dataset.nbparallelView = id;
      style.textContent = shared.get("css");
      document.head.append(style);
      const url = URL.createObjectURL(new Blob([shared.get("code")], { type: "text/javascript" }));
      try {
        return (await import(/* webpackIgnore: true */ url)).default;
      } finally {
        URL.revokeObjectURL(url);
      }
    })();
    pending.catch(() => cache.delete(id)); // a later view tries again
    cache.set(id, pending);
  }
  return cache.get(id);
}

/** Without the shared model (a frontend that lost it): the one-line summary, as text. */
function fallback(model, el, error) {
  const line = document.createElement("div");
  line.className = "nbp-fallback";
  const description = model.get("description");
  line.textContent = (description ? `${description}: ` : "") + model.get("summary");
  line.title = `nbparallel: the progress view could not load (${error})`;
  el.replaceChildren(line);
  const redraw = () => {
    line.textContent = (description ? `${description}: ` : "") + model.get("summary");
  };
  model.on("change:summary", redraw);
  return () => model.off("change:summary", redraw);
}

export default {
  async render(context) {
    let view;
    try {
      if (!context.model.widget_manager) throw new Error("this frontend gives widgets no widget_manager");
      view = await loadView(context.model);
    } catch (error) {
      return fallback(context.model, context.el, error);
    }
    return view.render(context);
  },
};
