// Attention knockout panel (served runs only: it needs the model). The server blocks one token set's attention to
// another in a sliding window of layers (attnscope.flow) and returns the answer's relative probability change per
// window; drawn here as one line per flow, in SVG.
import "./knockout.css";
import { api } from "./source";
import { el, fmt } from "./util";

const SETS = ["image", "question", "subject", "other", "last"];
const LINE_COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"];

export interface KnockoutAnswer {
  curve: { model: string; layers: number; window: number; windows: [number, number][]; flows: string[]; mean: Record<string, number[]> };
  answer: string;
  p: number;
  sets: Record<string, number>;
  forwards: number;
}

const SVG = "http://www.w3.org/2000/svg";

function svg<K extends keyof SVGElementTagNameMap>(tag: K, attrs: Record<string, string | number>): SVGElementTagNameMap[K] {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

/** The curves as an SVG chart: x = window centre (layer), y = relative change in % (0 line drawn). */
export function drawCurve(answer: KnockoutAnswer): SVGSVGElement {
  const W = 460, H = 220, L = 46, R = 10, T = 10, B = 34;
  const c = answer.curve;
  const xs = c.windows.map(([a, b]) => (a + b) / 2);
  const all = c.flows.flatMap((f) => c.mean[f].map((v) => 100 * v)).concat([0]);
  let lo = Math.min(...all), hi = Math.max(...all);
  if (hi - lo < 1) { lo -= 0.5; hi += 0.5; }
  const x = (v: number) => L + ((v - 0) / Math.max(c.layers - 1, 1)) * (W - L - R);
  const y = (v: number) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "as-kochart", role: "img" });
  root.append(svg("line", { x1: L, x2: W - R, y1: y(0), y2: y(0), stroke: "#999", "stroke-dasharray": "3 3" }));
  root.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, stroke: "#444" }));
  root.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#444" }));
  for (const v of [lo, 0, hi]) {
    const t = svg("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end", "font-size": 9 });
    t.textContent = `${v > 0 ? "+" : ""}${fmt(v, 0)}%`;
    root.append(t);
  }
  for (const v of [0, Math.round((c.layers - 1) / 2), c.layers - 1]) {
    const t = svg("text", { x: x(v), y: H - B + 12, "text-anchor": "middle", "font-size": 9 });
    t.textContent = String(v);
    root.append(t);
  }
  const label = svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", "font-size": 9 });
  label.textContent = `layer (centre of a ${c.window}-layer window)`;
  root.append(label);
  c.flows.forEach((f, i) => {
    const colour = LINE_COLOURS[i % LINE_COLOURS.length];
    const pts = c.mean[f].map((v, k) => `${x(xs[k]).toFixed(1)},${y(100 * v).toFixed(1)}`).join(" ");
    const line = svg("polyline", { points: pts, fill: "none", stroke: colour, "stroke-width": 1.6, "data-flow": f });
    const title = svg("title", {});
    title.textContent = f;
    line.append(title);
    root.append(line);
    c.mean[f].forEach((v, k) => {
      const dot = svg("circle", { cx: x(xs[k]), cy: y(100 * v), r: 2.2, fill: colour });
      const tip = svg("title", {});
      tip.textContent = `${f}, layers ${c.windows[k][0]}–${c.windows[k][1]}: ${v >= 0 ? "+" : ""}${fmt(100 * v, 1)}%`;
      dot.append(tip);
      root.append(dot);
    });
  });
  return root;
}

/** The knockout panel for one served run: pick flow and window, run, see the curve (errors in red, replacing it). */
export function knockoutPanel(base: string, rid: string): HTMLElement {
  const box = el("div", { class: "as-panel as-knockout", "data-ready": "0" });
  const source = el("select", { "aria-label": "knockout source" });
  const target = el("select", { "aria-label": "knockout target" });
  source.append(el("option", { value: "", text: "(default flows)" }));
  target.append(el("option", { value: "", text: "(default flows)" }));
  for (const s of SETS) {
    source.append(el("option", { value: s, text: s }));
    target.append(el("option", { value: s, text: s }));
  }
  const windowIn = el("input", { type: "number", min: "1", value: "4", size: "3", "aria-label": "knockout window" });
  const strideIn = el("input", { type: "number", min: "1", value: "2", size: "3", "aria-label": "knockout stride" });
  const subject = el("input", { type: "text", size: "10", placeholder: "subject words", "aria-label": "knockout subject" });
  const go = el("button", { type: "button", class: "as-korun", text: "Knock out" });
  const caption = el("div", { class: "as-panel-caption" });
  const chart = el("div", { class: "as-kochart-box" });
  const legend = el("div", { class: "as-kolegend" });
  box.append(el("strong", { text: "attention knockout" }),
    el("div", { class: "as-note", text: "target rows cannot read source keys in a window of layers; the answer's probability change per window (unsteered model, first answer token)" }),
    el("div", { class: "as-koform" }, el("label", {}, "source ", source), " → ", el("label", {}, "target ", target),
      el("label", {}, " window ", windowIn), el("label", {}, " stride ", strideIn), " ", subject, " ", go),
    caption, chart, legend);
  go.onclick = async () => {
    go.disabled = true;
    box.dataset.ready = "0";
    caption.classList.remove("as-error");
    caption.textContent = "running the knockout…";
    const body: Record<string, unknown> = { window: windowIn.value, stride: strideIn.value };
    if (source.value) body.source = source.value;
    if (target.value) body.target = target.value;
    if (subject.value.trim()) body.subject = subject.value.trim();
    try {
      const a = await api<KnockoutAnswer>(`${base}/runs/${encodeURIComponent(rid)}/knockout`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      caption.textContent = `answer ${JSON.stringify(a.answer)} (p = ${fmt(a.p, 3)}) · ${a.forwards} forwards · sets: `
        + Object.entries(a.sets).map(([k, n]) => `${k} ${n}`).join(", ");
      chart.replaceChildren(drawCurve(a));
      legend.replaceChildren(...a.curve.flows.map((f, i) => el("span", { class: "as-kokey", text: f, style: `color:${LINE_COLOURS[i % LINE_COLOURS.length]}` })));
      box.dataset.ready = "1";
    } catch (err) {
      chart.replaceChildren();
      legend.replaceChildren();
      caption.textContent = `error: ${(err as Error).message}`;
      caption.classList.add("as-error");
    } finally {
      go.disabled = false;
    }
  };
  return box;
}
