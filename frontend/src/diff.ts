// Steered minus unsteered: the difference of the two viewers' current maps (same stream, query, layer, head and
// method, kept in step by the linked selection), drawn over the token strip and the image in a diverging scale.
import { el, fmt } from "./util";
import type { Viewer } from "./viewer";

function diverging(v: number): string {
  // v in [-1, 1]: blue (less when steered) .. white .. red (more when steered)
  const a = Math.min(1, Math.abs(v));
  return v >= 0 ? `rgba(200,30,30,${(0.08 + 0.87 * a).toFixed(3)})` : `rgba(30,80,200,${(0.08 + 0.87 * a).toFixed(3)})`;
}

export class DiffView {
  readonly root: HTMLElement;
  private caption: HTMLElement;
  private strip: HTMLElement;
  private canvas: HTMLCanvasElement;
  private top: HTMLElement;

  constructor(host: HTMLElement, private a: Viewer, private b: Viewer) {
    this.root = el("div", { class: "as-diff as-panel", "data-ready": "0" });
    this.caption = el("div", { class: "as-caption" });
    this.strip = el("div", { class: "as-strip", "aria-label": "difference per token" });
    this.canvas = el("canvas", { class: "as-overlay as-diffmap", width: "336", height: "336" });
    this.top = el("ol", { class: "as-top" });
    this.root.append(el("strong", { text: "steered − unsteered" }), this.caption,
      el("div", { class: "as-note", text: "red: more when steered · blue: less · white: unchanged (both maps in the method's own numbers)" }),
      this.strip, this.canvas, el("div", { class: "as-k", text: "largest changes" }), this.top);
    host.append(this.root);
  }

  update(): void {
    const da = this.a.drawn(), db = this.b.drawn();
    if (!da || !db || da.stream !== db.stream || da.method !== db.method) {
      this.caption.textContent = "no difference to show: one side has no map for this selection";
      this.root.dataset.ready = "0";
      return;
    }
    const s = this.a.stream, sb = this.b.stream;
    const n = Math.min(da.values.length, db.values.length);
    const d = new Float32Array(n);
    let max = 0, l1 = 0;
    for (let i = 0; i < n; i++) {
      d[i] = db.values[i] - da.values[i];
      max = Math.max(max, Math.abs(d[i]));
      l1 += Math.abs(d[i]);
    }
    const same = da.q === db.q && da.layer === db.layer && da.head === db.head;
    let differ = 0;
    for (let i = 0; i < n; i++) if (s.tokens[i] !== sb.tokens[i]) differ++;
    this.caption.textContent = `${db.what}, steered minus unsteered · sum |Δ| ${fmt(l1)} · largest |Δ| ${fmt(max)}`
      + (same ? "" : " · the two sides show different rows")
      + (differ ? ` · ${differ} position(s) hold different tokens in the two runs (generated text differs)` : "");
    this.root.dataset.l1 = l1.toFixed(6);
    this.root.dataset.ready = "1";
    // token strip (words only; image patches go on the map)
    const patch = new Map<number, [number, number, number]>();
    for (const [pos, img, r, c] of s.patch) patch.set(pos, [img, r, c]);
    this.strip.replaceChildren();
    for (let i = 0; i < n; i++) {
      if (patch.has(i)) continue;
      const t = el("span", { class: "as-tok", "data-i": String(i), text: s.tokens[i] || "\u00a0", title: `#${i}: Δ ${fmt(d[i])}` });
      t.style.backgroundColor = max > 0 ? diverging(d[i] / max) : "";
      this.strip.append(t);
    }
    // image map: the first image's grid
    const ctx = this.canvas.getContext("2d")!;
    const W = this.canvas.width, H = this.canvas.height;
    ctx.clearRect(0, 0, W, H);
    if (s.grids.length) {
      const [rows, cols] = s.grids[0];
      for (const [pos, [img, r, c]] of patch) {
        if (img !== 0 || pos >= n) continue;
        ctx.fillStyle = max > 0 ? diverging(d[pos] / max) : "#fff";
        ctx.fillRect((c * W) / cols, (r * H) / rows, W / cols + 0.5, H / rows + 0.5);
      }
      this.canvas.classList.remove("as-hidden");
    } else {
      this.canvas.classList.add("as-hidden");
    }
    const order = [...d.keys()].sort((x, y) => Math.abs(d[y]) - Math.abs(d[x])).slice(0, 8).filter((k) => d[k] !== 0);
    this.top.replaceChildren(...order.map((k) => el("li", { "data-k": String(k) },
      el("span", { class: "as-toptok", text: `${s.tokens[k] || "·"} #${k}` }), el("span", { text: `${d[k] > 0 ? "+" : ""}${fmt(d[k])}` }))));
  }
}
