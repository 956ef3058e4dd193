// The viewer of one run: token strip, image overlay, layers x heads grid and one head's detail.
import type { Block, ExplEntry, LayerBlock, Source, StreamMeta, ViewDoc } from "./types";
import {
  GridKeys, HEAD_COLOURS, INFERNO, PAD_ROW, ROLE_COLOURS, VIRIDIS, bytes, drawHeat, el, fmt, normalize, rgb,
} from "./util";

/** Said beside the empty head grid where every stored row is padding: the metrics leave padding rows out. */
const ONLY_PAD = " none: every stored row of this batch row is padding, which the head metrics and thumbnails leave out";

export interface Selection {
  stream: string;
  q: number; // the query row shown
  target: number | null; // the token clicked (a generated token shows the row of the step that produced it)
  layer: number;
  head: number; // head id, or -1 for the mean of heads
}

export interface ViewerOptions {
  label?: string;
  onSelect?: (sel: Selection) => void;
  onRender?: (v: Viewer) => void; // after every redraw (the steered-minus-unsteered view listens)
}

/** What a viewer draws now: the map over its stream's positions and the words that name it. */
export interface Drawn {
  stream: string;
  method: string;
  q: number;
  layer: number;
  head: number;
  values: Float32Array; // method's numbers (attention weights for raw)
  what: string;
}

const LINES_FULL = 48; // BertViz-style lines between every pair up to this many tokens
const TOP_KEYS = 24;

interface Overlay {
  image: number;
  canvas: HTMLCanvasElement;
  img: HTMLImageElement | null;
  rows: number;
  cols: number;
}

export class Viewer {
  readonly root: HTMLElement;
  private si = 0;
  private s!: StreamMeta;
  private q = 0;
  private target: number | null = null;
  private li = 0;
  private hi = -1; // head index, -1 = mean
  private metric = "";
  private method = "raw";
  private gamma = 0.6;
  private block: Block | null = null;
  private expl: ExplEntry | null = null;
  private explError = "";
  private patchOf: ([number, number, number] | null)[] = [];
  private patchAt = new Map<string, number>();
  private tokenEls: HTMLElement[] = [];
  private overlays: Overlay[] = [];
  private cells: HTMLElement[][] = [];
  private meanCells: HTMLElement[] = [];
  private keys: GridKeys | null = null;
  private els!: Record<string, HTMLElement>;
  private layerCache: LayerBlock | null = null;
  private ticket = 0;
  private patternDrawn = ""; // the gamma the static pattern thumbnails were last drawn with
  renderMs = 0;

  constructor(host: HTMLElement, readonly doc: ViewDoc, readonly source: Source, readonly opts: ViewerOptions = {}) {
    this.root = el("div", { class: "as-viewer" });
    host.append(this.root);
    const first = Math.max(0, doc.streams.findIndex((s) => s.name === (doc.generation?.stream ?? "")));
    void this.setStream(doc.generation ? first : this.defaultStream());
  }

  private defaultStream(): number {
    // a VLM's language stream, else the first stream
    const lang = this.doc.streams.findIndex((s) => s.name === "language");
    return lang >= 0 ? lang : 0;
  }

  role(i: number): string {
    return this.doc.roles[this.s.roles[i]] ?? "unknown";
  }

  /** Whether position `i` is padding (its row, if stored, is no token's attention). */
  isPad(i: number): boolean {
    return i < this.s.length && this.role(i) === "pad";
  }

  get selection(): Selection {
    return { stream: this.s.name, q: this.q, target: this.target, layer: this.s.layers[this.li] ?? 0, head: this.hi < 0 ? -1 : this.s.heads[this.hi] };
  }

  // --- building ------------------------------------------------------------------------------------------
  async setStream(i: number): Promise<void> {
    this.si = i;
    this.s = this.doc.streams[i];
    const s = this.s;
    this.patchOf = new Array(s.length).fill(null);
    this.patchAt.clear();
    for (const [pos, img, r, c] of s.patch) {
      this.patchOf[pos] = [img, r, c];
      this.patchAt.set(`${img},${r},${c}`, pos);
    }
    this.li = Math.max(0, s.layers.length - 1);
    this.hi = -1;
    this.layerCache = null;
    const metrics = this.metricNames();
    this.metric = metrics.includes(this.metric) ? this.metric : metrics[0] ?? "";
    this.build();
    await this.select(this.defaultQuery(), null, false);
    this.root.dataset.ready = "1";
  }

  private defaultQuery(): number {
    const s = this.s;
    if (!s.queries.length) return 0;
    const cls = s.roles.findIndex((r) => this.doc.roles[r] === "cls");
    if (cls >= 0 && s.queries.includes(cls)) return cls;
    const g = this.doc.generation;
    if (g && s.name === g.stream && g.prompt_length > 0) return this.nearest(g.prompt_length - 1);
    // the last stored row of a token (a right-padded sequence ends in padding, whose rows are no token's)
    for (let i = s.queries.length - 1; i >= 0; i--) if (!this.isPad(s.queries[i])) return s.queries[i];
    return s.queries[s.queries.length - 1];
  }

  private metricNames(): string[] {
    const names = Object.keys(this.s?.metrics ?? {});
    for (const t of this.doc.tables) for (const k of Object.keys(t.metrics)) names.push(`${t.title}: ${k}`);
    return names;
  }

  private build(): void {
    const s = this.s, doc = this.doc;
    this.root.replaceChildren();
    const bar = el("div", { class: "as-bar" });
    if (this.opts.label) bar.append(el("strong", { class: "as-label", text: this.opts.label }));
    if (doc.streams.length > 1) {
      const sel = el("select", { class: "as-stream", "aria-label": "stream" });
      doc.streams.forEach((st, i) => sel.append(el("option", { value: String(i), text: `${st.name} (${st.length})` })));
      sel.value = String(this.si);
      sel.onchange = () => void this.setStream(Number(sel.value));
      bar.append(el("label", {}, "stream ", sel));
    }
    const method = el("select", { class: "as-method", "aria-label": "method" });
    for (const m of this.methodNames()) method.append(el("option", { value: m, text: m }));
    method.value = this.method;
    method.onchange = () => { this.method = method.value; void this.refreshMethod(); };
    const faith = el("span", { class: "as-faith", title: "faithfulness of the selected method's map" });
    const gamma = el("input", { type: "range", min: "0.2", max: "1", step: "0.05", value: String(this.gamma), class: "as-gamma", "aria-label": "contrast" });
    gamma.oninput = () => { this.gamma = Number(gamma.value); this.render(); };
    bar.append(el("label", {}, "method ", method), faith, el("label", { title: "γ < 1 lifts faint attention next to a sink" }, "contrast γ ", gamma));
    if (this.source.exportUrl) bar.append(el("a", { class: "as-export", href: this.source.exportUrl, download: "" , text: "export HTML" }));
    const caption = el("div", { class: "as-caption", role: "status" });
    const units = el("div", { class: "as-units as-note" });
    const answer = el("div", { class: "as-answer" });
    if (doc.generation && doc.generation.stream === s.name) {
      answer.append(el("span", { class: "as-k", text: "answer " }), el("span", { class: "as-answer-text", text: doc.generation.answer.replace(/\n/g, "↵") }));
    }

    const legend = el("div", { class: "as-legend" });
    const present = new Set(s.roles.map((r) => doc.roles[r]));
    for (const r of doc.roles) if (present.has(r)) legend.append(el("span", { class: "as-chip", style: `border-color:${ROLE_COLOURS[r]}`, text: r }));
    if (s.sinks.length) legend.append(el("span", { class: "as-chip as-sink", text: `sinks: ${s.sinks.map((i) => `‘${s.tokens[i]}’ #${i}`).join(", ")}`, title: doc.sink_definition ?? "attention sinks" }));
    if (s.tail.length) legend.append(el("span", { class: "as-chip", style: `border-color:${ROLE_COLOURS.generated};border-style:dashed`, text: "last generated (no row)" }));

    const strip = el("div", { class: "as-strip", "aria-label": "tokens" });
    this.tokenEls = [];
    const frag = document.createDocumentFragment();
    for (let i = 0; i < s.length; i++) {
      const role = this.role(i);
      const t = el("span", { class: (this.patchOf[i] ? "as-tok as-patch" : "as-tok") + (role === "pad" ? " as-pad" : ""), "data-i": String(i) });
      if (!this.patchOf[i]) t.textContent = s.tokens[i] || "\u00a0";
      t.title = `#${i} ${role}${this.patchOf[i] ? ` (${this.patchOf[i]!.slice(1).join(",")})` : ""}: ${s.tokens[i]}${role === "pad" ? ` (${PAD_ROW})` : ""}`;
      t.style.borderBottomColor = ROLE_COLOURS[role] ?? "#999";
      if (s.sinks.includes(i)) t.classList.add("as-sink");
      this.tokenEls.push(t);
      frag.append(t);
    }
    s.tail.forEach((tok, j) => {
      const t = el("span", { class: "as-tok as-tail", "data-tail": String(j), text: tok, title: `generated last: ${tok} (never fed back, so it has no row of its own)` });
      t.style.borderBottomColor = ROLE_COLOURS.generated;
      frag.append(t);
    });
    strip.append(frag);
    strip.onclick = (ev) => {
      const t = (ev.target as HTMLElement).closest(".as-tok") as HTMLElement | null;
      if (!t) return;
      const pos = t.dataset.i !== undefined ? Number(t.dataset.i) : s.length + Number(t.dataset.tail);
      void this.clickToken(pos);
    };

    // image overlays: one per image this stream has patches of
    const images = el("div", { class: "as-panel as-images" });
    this.overlays = [];
    s.grids.forEach(([rows, cols], k) => {
      const canvas = el("canvas", { class: "as-overlay", "data-image": String(k), "aria-label": `image ${k} with heat map` });
      const src = doc.images[k] ?? doc.images[0];
      const size = 336;
      canvas.width = size;
      canvas.height = Math.round(size * rows / cols);
      const ov: Overlay = { image: k, canvas, img: null, rows, cols };
      if (src) {
        const img = new Image();
        img.src = src;
        ov.img = img;
        img.decode().then(() => {
          canvas.height = Math.round(size * img.naturalHeight / img.naturalWidth);
          this.drawOverlays();
        }).catch(() => undefined);
      }
      canvas.onclick = (ev) => {
        const rect = canvas.getBoundingClientRect();
        const c = Math.min(cols - 1, Math.floor(((ev.clientX - rect.left) / rect.width) * cols));
        const r = Math.min(rows - 1, Math.floor(((ev.clientY - rect.top) / rect.height) * rows));
        const pos = this.patchAt.get(`${k},${r},${c}`);
        if (pos !== undefined) void this.select(this.nearest(pos), pos);
      };
      this.overlays.push(ov);
      images.append(canvas);
    });
    if (s.grids.length) images.append(el("div", { class: "as-note", text: "click the image to pick a patch as the query" }));

    // layers x heads grid
    const gridPanel = el("div", { class: "as-panel as-gridpanel" });
    const metricSel = el("select", { class: "as-metric", "aria-label": "head metric" });
    for (const m of this.metricNames()) metricSel.append(el("option", { value: m, text: m }));
    metricSel.value = this.metric;
    metricSel.onchange = () => { this.metric = metricSel.value; this.renderGrid(); };
    const metricLegend = el("span", { class: "as-mlegend" });
    gridPanel.append(el("div", { class: "as-k", text: "raw attention of the selected query, per layer (rows) and head (columns)" }),
      el("div", { class: "as-gridhead" }, el("label", {}, "cell border: ", metricSel), metricLegend));
    const grid = el("div", { class: "as-grid", role: "grid", "data-layers": String(s.layers.length), "data-heads": String(s.heads.length) });
    grid.style.gridTemplateColumns = `2.4em repeat(${s.heads.length}, var(--cell)) 6px var(--cell)`;
    // rows as ARIA rows that take no box (display: contents), so the cells stay items of the CSS grid
    const header = el("div", { class: "as-grow", role: "row" }, el("span", {}));
    for (const h of s.heads) header.append(el("span", { class: "as-hlabel", role: "columnheader", text: `H${h}` }));
    header.append(el("span", {}), el("span", { class: "as-hlabel", role: "columnheader", text: "mean" }));
    grid.append(header);
    this.cells = [];
    this.meanCells = [];
    this.patternDrawn = "";
    const thumb = this.thumbSize();
    s.layers.forEach((layer, li) => {
      const line = el("div", { class: "as-grow", role: "row" }, el("span", { class: "as-llabel", role: "rowheader", text: `L${layer}` }));
      const row: HTMLElement[] = [];
      s.heads.forEach((head, hi) => {
        const cell = el("div", { class: "as-cell", role: "gridcell", "data-l": String(layer), "data-h": String(head), "aria-label": `layer ${layer}, head ${head}` });
        const c = el("canvas");
        c.width = thumb[1];
        c.height = thumb[0];
        cell.append(c);
        cell.onclick = () => this.setHead(li, hi);
        row.push(cell);
        line.append(cell);
      });
      line.append(el("span", {}));
      const mean = el("div", { class: "as-cell-mean", role: "gridcell", "data-l": String(layer), title: `layer ${layer}: mean of heads`, "aria-label": `layer ${layer}, mean of heads` });
      const mc = el("canvas");
      mc.width = thumb[1];
      mc.height = thumb[0];
      mean.append(mc);
      mean.onclick = () => this.setHead(li, -1);
      this.meanCells.push(mean);
      line.append(mean);
      grid.append(line);
      this.cells.push(row);
    });
    const H = s.heads.length;
    this.keys = new GridKeys(this.cells.map((row, li) => [...row, this.meanCells[li]]), (li, c) => this.setHead(li, c < H ? c : -1));
    this.keys.current(this.li, this.hi < 0 ? H : this.hi); // the tab key reaches the picked head first
    if (!s.layers.length) grid.append(el("div", { class: "as-note", text: "no attention rows in this document" }));
    gridPanel.append(grid);

    const detail = el("div", { class: "as-panel as-detail" });
    const detailTitle = el("div", { class: "as-dtitle" });
    const stats = el("div", { class: "as-stats" });
    const lines = el("canvas", { class: "as-lines" });
    lines.onclick = (ev) => this.clickLines(ev, lines);
    const top = el("ol", { class: "as-top" });
    const topLabel = el("div", { class: "as-k", text: "most attended keys" });
    detail.append(detailTitle, stats, lines, topLabel, top);

    const main = el("div", { class: "as-main" }, ...(s.grids.length ? [images] : []), ...(s.layers.length ? [gridPanel] : []), detail);
    this.root.append(bar, answer, caption, units, legend, strip, main);
    this.els = { bar, caption, units, faith, strip, grid, detailTitle, stats, lines, top, topLabel, metricLegend, method };
  }

  private methodNames(): string[] {
    const names = new Set<string>(this.s.queries.length ? ["raw"] : []);
    for (const e of this.doc.explanations) if (e.stream === this.s.name) names.add(e.method);
    for (const m of this.source.methods) if (m !== "raw" && this.s.queries.length) names.add(m);
    if (!names.size) names.add("raw");
    if (!names.has(this.method)) this.method = [...names][0];
    return [...names];
  }

  private thumbSize(): [number, number] {
    if (this.s.grids.length) return this.s.grids[0];
    const p = this.s.pattern?.size ?? 16;
    return [p, p];
  }

  // --- selection -----------------------------------------------------------------------------------------
  /** The stored row nearest to `pos`: spatially for an image patch, by position otherwise. */
  nearest(pos: number): number {
    const qs = this.s.queries;
    if (!qs.length) return pos;
    const p = this.patchOf[pos];
    if (p) {
      let best = -1, bd = Infinity;
      for (const q of qs) {
        const o = this.patchOf[q];
        if (!o || o[0] !== p[0]) continue;
        const d = (o[1] - p[1]) ** 2 + (o[2] - p[2]) ** 2;
        if (d < bd) { bd = d; best = q; }
      }
      if (best >= 0) return best;
    }
    let lo = 0, hi = qs.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (qs[mid] < pos) lo = mid + 1; else hi = mid;
    }
    const cands = [qs[lo], qs[Math.max(0, lo - 1)]];
    return cands.reduce((a, b) => (Math.abs(b - pos) < Math.abs(a - pos) || (Math.abs(b - pos) === Math.abs(a - pos) && b < a) ? b : a));
  }

  private async clickToken(pos: number): Promise<void> {
    // a generated token: the row of the step that produced it (its previous position)
    const generated = pos >= this.s.length || this.role(pos) === "generated";
    const q = generated ? pos - 1 : pos;
    await this.select(this.nearest(q), pos);
  }

  async select(q: number, target: number | null, notify = true): Promise<void> {
    const t0 = performance.now();
    const ticket = ++this.ticket;
    this.q = q;
    this.target = target;
    if (this.s.queries.length) {
      try {
        const block = await this.source.block(this.s, q);
        if (ticket !== this.ticket) return;
        this.block = block;
        this.q = block.q;
      } catch (err) {
        this.els.caption.textContent = `could not load rows: ${(err as Error).message}`;
        this.els.caption.classList.add("as-error");
        return;
      }
    }
    await this.refreshMethod(false);
    if (ticket !== this.ticket) return;
    this.render();
    this.renderMs = performance.now() - t0;
    this.root.dataset.selectMs = this.renderMs.toFixed(1);
    if (notify) this.opts.onSelect?.(this.selection);
  }

  setHead(li: number, hi: number, notify = true): void {
    this.li = li;
    this.hi = hi;
    this.keys?.current(li, hi < 0 ? this.s.heads.length : hi);
    this.layerCache = null;
    this.render();
    if (notify) this.opts.onSelect?.(this.selection);
  }

  /** Follow another viewer's selection (steered vs unsteered side by side). */
  async follow(sel: Selection): Promise<void> {
    const si = this.doc.streams.findIndex((s) => s.name === sel.stream);
    if (si >= 0 && si !== this.si) await this.setStream(si);
    const li = this.s.layers.indexOf(sel.layer);
    if (li >= 0) this.li = li;
    this.hi = sel.head < 0 ? -1 : Math.max(-1, this.s.heads.indexOf(sel.head));
    this.layerCache = null;
    const q = Math.min(sel.q, this.s.length - 1);
    await this.select(this.nearest(q), sel.target, false);
  }

  private async refreshMethod(render = true): Promise<void> {
    this.expl = null;
    this.explError = "";
    const faith = this.els.faith;
    faith.textContent = "";
    faith.classList.remove("as-error");
    if (this.method !== "raw") {
      // what is explained follows the clicked token (null: nothing clicked, the method's default target)
      const want = this.target;
      const local = this.doc.explanations.filter((e) => e.stream === this.s.name && e.method === this.method);
      const exact = local.find((e) => (e.clicked ?? e.target) === want) ?? (want === null ? local.find((e) => e.target === null) : undefined);
      try {
        if (this.source.explain && !exact) {
          faith.textContent = `computing ${this.method}…`;
          this.expl = await this.source.explain(this.s, this.method, this.q, want);
        } else if (exact) {
          this.expl = exact;
        } else {
          const have = local.map((e) => (e.target === null ? "the default target" : this.tokLabel(e.target))).join(", ");
          this.explError = `this file holds no ${this.method} map for ${this.tokLabel(want!)}; it has maps for ${have || "no token"} (run attnscope serve to explain any token)`;
        }
      } catch (err) {
        this.explError = `${this.method} failed: ${(err as Error).message}`;
      }
    }
    faith.textContent = this.faithText();
    if (render) this.render();
    void this.fetchFaithfulness(this.expl);
  }

  tokLabel(i: number): string {
    const s = this.s;
    return i < s.length ? `‘${s.tokens[i]}’ #${i}` : `‘${s.tail[i - s.length] ?? "?"}’ #${i}`;
  }

  private async fetchFaithfulness(expl: ExplEntry | null): Promise<void> {
    const faith = this.els.faith;
    if (expl && expl.fid && expl.faithfulness == null && this.source.faithfulness) {
      faith.textContent = "faithfulness: computing (deletion/insertion curves)…";
      try {
        expl.faithfulness = await this.source.faithfulness(expl.fid);
        if (this.expl === expl) faith.textContent = this.faithText();
      } catch (err) {
        if (this.expl === expl) { faith.textContent = `faithfulness: ${(err as Error).message}`; faith.classList.add("as-error"); }
      }
    }
  }

  private faithText(): string {
    if (this.method === "raw") return "faithfulness: n/a for raw attention";
    if (!this.expl) return "";
    const f = this.expl.faithfulness;
    if (f === null || f === undefined) return "faithfulness: not reported";
    if (typeof f === "number") return `faithfulness: ${fmt(f)}`;
    if (typeof f === "object") {
      return "faithfulness: " + Object.entries(f as Record<string, unknown>)
        .map(([k, v]) => `${k} ${typeof v === "number" ? fmt(v) : String(v)}`).join(", ");
    }
    return `faithfulness: ${String(f)}`;
  }

  // --- values --------------------------------------------------------------------------------------------
  private row(block: Block, li: number, hi: number): Float32Array {
    const H = this.s.heads.length, K = this.s.length;
    const out = new Float32Array(K);
    const heads = hi < 0 ? [...Array(H).keys()] : [hi];
    for (const h of heads) {
      const off = (li * H + h) * K;
      const sc = block.scale[li * H + h] / 255 / heads.length;
      for (let k = 0; k < K; k++) out[k] += block.u8[off + k] * sc;
    }
    return out;
  }

  /** The map of the current method over the stream's positions. */
  private current(): Float32Array | null {
    if (this.method !== "raw") {
      if (!this.expl) return null;
      const u = bytes(this.expl.b64);
      const out = new Float32Array(this.s.length);
      for (let i = 0; i < Math.min(u.length, out.length); i++) out[i] = (u[i] / 255) * this.expl.scale;
      return out; // above the entry's floor (0, or flow's minimum): shown numbers add it back (`shown`)
    }
    return this.block ? this.row(this.block, this.li, this.hi) : null;
  }

  /** A drawn value as the method's own number (explanations are stored above their floor). */
  private shown(v: number): number {
    return this.method !== "raw" && this.expl ? v + (this.expl.floor ?? 0) : v;
  }

  private gridValues(values: Float32Array, ov: { image: number; rows: number; cols: number }): Float32Array {
    const out = new Float32Array(ov.rows * ov.cols);
    for (const [pos, img, r, c] of this.s.patch) if (img === ov.image) out[r * ov.cols + c] = values[pos];
    return out;
  }

  // --- drawing -------------------------------------------------------------------------------------------
  render(): void {
    const t0 = performance.now();
    const values = this.current();
    this.renderStrip(values);
    this.drawOverlays(values);
    this.renderGrid();
    this.renderDetail(values);
    this.renderCaption();
    this.root.dataset.q = String(this.q);
    // a padding row is drawn greyed, and said so in the caption, the detail title and the token's tooltip
    const pad = this.s.queries.length > 0 && this.method === "raw" && this.isPad(this.q);
    this.root.classList.toggle("as-padrow", pad);
    this.root.dataset.pad = pad ? "1" : "0";
    this.root.dataset.layer = String(this.s.layers[this.li] ?? "");
    this.root.dataset.head = String(this.hi < 0 ? "mean" : this.s.heads[this.hi]);
    this.root.dataset.drawMs = (performance.now() - t0).toFixed(1);
    this.opts.onRender?.(this);
  }

  /** The drawn map with its label, or null when nothing is drawn (an error, no rows). */
  drawn(): Drawn | null {
    const v = this.current();
    if (!v) return null;
    const floor = this.method !== "raw" && this.expl ? this.expl.floor ?? 0 : 0;
    const values = floor ? v.map((x) => x + floor) : v;
    const what = this.method === "raw"
      ? `raw attention of query ${this.tokLabel(this.q)}${this.isPad(this.q) ? " (pad: not a token's attention)" : ""}, layer ${this.s.layers[this.li]}, ${this.hi < 0 ? "mean of heads" : `head ${this.s.heads[this.hi]}`}`
      : `${this.method} explaining ${this.expl?.explains ?? "the default target"}`;
    return { stream: this.s.name, method: this.method, q: this.q, layer: this.s.layers[this.li] ?? 0, head: this.hi < 0 ? -1 : this.s.heads[this.hi], values, what };
  }

  get stream(): StreamMeta {
    return this.s;
  }

  private renderCaption(): void {
    const s = this.s, layer = s.layers[this.li];
    const head = this.hi < 0 ? "mean of heads" : `head ${s.heads[this.hi]}`;
    const tok = (i: number) => this.tokLabel(i);
    const caption = this.els.caption, units = this.els.units;
    caption.classList.remove("as-error");
    units.textContent = "";
    this.root.dataset.explains = "";
    if (this.method !== "raw") {
      if (this.explError) {
        caption.textContent = this.explError;
        caption.classList.add("as-error");
        return;
      }
      const e = this.expl;
      if (!e) { caption.textContent = `${this.method}: no map`; return; }
      const params = Object.entries(e.params ?? {}).filter(([k]) => k !== "target")
        .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
      let text = `${this.method}${params ? ` (${params})` : ""} explains ${e.explains ?? "the default target"}`;
      if (e.readout?.length) text += ` · read at row${e.readout.length > 1 ? "s" : ""} ${e.readout.slice(0, 3).map(tok).join(", ")}${e.readout.length > 3 ? ", …" : ""}`;
      if (e.note) text += ` · ${e.note}`;
      caption.textContent = text;
      this.root.dataset.explains = e.target === null ? "default" : String(e.target);
      const lo = e.floor ?? 0, hi = lo + e.scale;
      units.textContent = `${e.units ?? "scores"} · colours from ${fmt(lo)} (dark) to ${fmt(hi)} (bright)`;
      return;
    }
    if (!s.layers.length) { caption.textContent = "raw"; return; }
    let text = `raw attention of query ${tok(this.q)} (${this.role(this.q)}) · layer ${layer} · ${head}`;
    if (this.target !== null && this.target !== this.q) {
      const gen = this.target >= s.length || this.role(this.target) === "generated";
      text = gen ? `while generating ${tok(this.target)}: ` + text
        : `clicked ${tok(this.target)}, nearest stored row: ` + text;
    }
    if (s.queries.length < s.length) text += ` · rows stored for ${s.queries.length} of ${s.length} positions`;
    caption.textContent = text;
    if (this.isPad(this.q)) caption.append(el("span", { class: "as-padnote", text: ` · ${PAD_ROW}` }));
    units.textContent = "attention weights: the row's share of attention on each key (rows sum to 1)";
  }

  private renderStrip(values: Float32Array | null): void {
    const norm = values ? normalize(values, this.gamma) : null;
    for (let i = 0; i < this.tokenEls.length; i++) {
      const t = this.tokenEls[i];
      const v = norm ? norm[i] : 0;
      if (this.patchOf[i]) t.style.backgroundColor = rgb(INFERNO, v);
      else t.style.backgroundColor = v > 0.02 ? `rgba(235,110,20,${(0.1 + 0.85 * v).toFixed(3)})` : "";
      t.classList.toggle("as-q", i === this.q);
      t.classList.toggle("as-target", i === this.target);
    }
  }

  private drawOverlays(values: Float32Array | null = this.current()): void {
    for (const ov of this.overlays) {
      const ctx = ov.canvas.getContext("2d")!;
      const W = ov.canvas.width, H = ov.canvas.height;
      ctx.clearRect(0, 0, W, H);
      if (ov.img && ov.img.complete && ov.img.naturalWidth) ctx.drawImage(ov.img, 0, 0, W, H);
      else { ctx.fillStyle = "#222"; ctx.fillRect(0, 0, W, H); }
      if (values) drawHeat(ctx, normalize(this.gridValues(values, ov), this.gamma), ov.rows, ov.cols, 0, 0, W, H, { alpha: true });
      const mark = (pos: number | null, colour: string) => {
        const p = pos !== null ? this.patchOf[pos] : null;
        if (!p || p[0] !== ov.image) return;
        ctx.strokeStyle = colour;
        ctx.lineWidth = 2;
        ctx.strokeRect((p[2] * W) / ov.cols + 1, (p[1] * H) / ov.rows + 1, W / ov.cols - 2, H / ov.rows - 2);
      };
      mark(this.q, "#00e5ff");
      if (this.target !== this.q) mark(this.target, "#ffffff");
    }
  }

  private metricGrid(): number[][] | null {
    const s = this.s;
    if (s.metrics[this.metric]) return s.metrics[this.metric];
    for (const t of this.doc.tables) {
      for (const [k, v] of Object.entries(t.metrics)) {
        if (`${t.title}: ${k}` === this.metric) return s.layers.map((layer) => v[t.layers.indexOf(layer)] ?? []);
      }
    }
    return null;
  }

  private renderGrid(): void {
    const s = this.s;
    if (!s.layers.length) return;
    const metric = this.metricGrid();
    let lo = Infinity, hi = -Infinity;
    for (const r of metric ?? []) for (const v of r) if (typeof v === "number" && isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    const span = hi - lo || 1;
    // every stored row is padding (a right-padded row captured with queries="last"): no head metric or thumbnail
    const onlyPad = !metric && s.queries.length > 0 && s.queries.every((q) => this.isPad(q));
    this.els.metricLegend.textContent = metric ? ` ${fmt(lo)} ` : onlyPad ? ONLY_PAD : "";
    if (metric) {
      const bar = el("span", { class: "as-mbar" });
      this.els.metricLegend.append(bar, ` ${fmt(hi)}`);
    }
    const image = s.grids.length > 0 && this.block !== null;
    const pattern = s.pattern ? bytes(s.pattern.b64) : null;
    const P = s.pattern?.size ?? 0;
    const ov = image ? { image: 0, rows: s.grids[0][0], cols: s.grids[0][1] } : null;
    const draw = (cell: HTMLElement, li: number, hi: number) => {
      const c = cell.firstElementChild as HTMLCanvasElement;
      const ctx = c.getContext("2d")!;
      if (ov && this.block) {
        drawHeat(ctx, normalize(this.gridValues(this.row(this.block, li, hi), ov), this.gamma), ov.rows, ov.cols, 0, 0, c.width, c.height, { smooth: false });
      } else if (pattern && P) {
        const vals = new Float32Array(P * P);
        const heads = hi < 0 ? [...s.heads.keys()] : [hi];
        for (const h of heads) {
          const off = (li * s.heads.length + h) * P * P;
          for (let i = 0; i < P * P; i++) vals[i] += pattern[off + i] / 255 / heads.length;
        }
        drawHeat(ctx, normalize(vals, this.gamma), P, P, 0, 0, c.width, c.height, { smooth: false });
      }
    };
    // pattern thumbnails do not depend on the query: draw them once per stream and contrast
    const redraw = image || this.patternDrawn !== `${s.name}:${this.gamma}`;
    if (!image) this.patternDrawn = `${s.name}:${this.gamma}`;
    s.layers.forEach((layer, li) => {
      s.heads.forEach((head, hi) => {
        const cell = this.cells[li][hi];
        if (redraw) draw(cell, li, hi);
        const v = metric?.[li]?.[hi];
        const known = typeof v === "number" && isFinite(v);
        cell.style.borderColor = known ? rgb(VIRIDIS, (v - lo) / span) : "#ccc";
        cell.title = `layer ${layer} head ${head}${known ? ` · ${this.metric} ${fmt(v)}` : ""}`;
        cell.setAttribute("aria-label", `layer ${layer}, head ${head}${known ? `, ${this.metric} ${fmt(v)}` : ""}`);
        const picked = li === this.li && hi === this.hi;
        cell.classList.toggle("as-selected", picked);
        cell.setAttribute("aria-selected", String(picked));
      });
      if (redraw) draw(this.meanCells[li], li, -1);
      this.meanCells[li].classList.toggle("as-selected", li === this.li && this.hi < 0);
      this.meanCells[li].setAttribute("aria-selected", String(li === this.li && this.hi < 0));
    });
  }

  private renderDetail(values: Float32Array | null): void {
    const s = this.s, layer = s.layers[this.li];
    const headLabel = this.hi < 0 ? "mean of heads" : `head ${s.heads[this.hi]}`;
    const explaining = this.method !== "raw";
    this.els.detailTitle.textContent = explaining
      ? `${this.method}: ${this.expl?.explains ?? "no map"}`
      : s.layers.length ? `raw attention · layer ${layer} · ${headLabel} · query ${this.tokLabel(this.q)}${this.isPad(this.q) ? " (pad: not a token's attention)" : ""}` : this.method;
    this.els.topLabel.textContent = explaining ? `highest-scoring tokens (${this.method} scores)` : "most attended keys (attention weight)";
    const stats = this.els.stats;
    stats.replaceChildren();
    if (!explaining) {
      for (const [name, grid] of Object.entries(s.metrics)) {
        const row = grid[this.li] ?? [];
        const v = this.hi < 0 ? row.reduce((a, b) => a + b, 0) / Math.max(1, row.length) : row[this.hi];
        if (v !== undefined) stats.append(el("span", { class: "as-stat", text: `${name} ${fmt(v)}` }));
      }
    }
    const top = this.els.top;
    top.replaceChildren();
    if (values) {
      const order = [...values.keys()].sort((a, b) => values[b] - values[a]).slice(0, 8);
      const max = values[order[0]] || 1;
      for (const k of order) {
        if (values[k] <= 0) break;
        const bar = el("span", { class: "as-topbar" });
        bar.style.width = `${Math.round((values[k] / max) * 100)}%`;
        top.append(el("li", { title: `#${k} ${this.role(k)}`, "data-k": String(k) }, el("span", { class: "as-toptok", text: `${s.tokens[k] || "·"} #${k}` }), bar, el("span", { text: fmt(this.shown(values[k])) })));
      }
    }
    (this.els.lines as HTMLCanvasElement).classList.toggle("as-hidden", explaining);
    if (!explaining) void this.drawLines(values);
  }

  private full(): boolean {
    return this.s.length <= LINES_FULL && this.s.queries.length === this.s.length && this.method === "raw";
  }

  private async drawLines(values: Float32Array | null): Promise<void> {
    const canvas = this.els.lines as HTMLCanvasElement;
    const s = this.s;
    if (s.grids.length && s.pattern && !s.roles.some((r, i) => !this.patchOf[i] && ["text", "generated"].includes(this.doc.roles[r]))) {
      // an image stream: the head's pooled query x key pattern instead of lines
      const P = s.pattern.size;
      canvas.width = 240;
      canvas.height = 240;
      const pat = bytes(s.pattern.b64);
      const vals = new Float32Array(P * P);
      const heads = this.hi < 0 ? [...s.heads.keys()] : [this.hi];
      for (const h of heads) {
        const off = (this.li * s.heads.length + h) * P * P;
        for (let i = 0; i < P * P; i++) vals[i] += pat[off + i] / 255 / heads.length;
      }
      const ctx = canvas.getContext("2d")!;
      drawHeat(ctx, normalize(vals, this.gamma), P, P, 0, 0, 240, 240, { smooth: false });
      canvas.title = "pooled attention pattern of this head: query bins (down) x key bins (across)";
      return;
    }
    canvas.title = "lines from queries (left) to keys (right); opacity = attention weight";
    const ctx = canvas.getContext("2d")!;
    const rowH = 15, x0 = 120, x1 = 250, W = 370;
    const colour = this.hi < 0 ? "#3a6ea5" : HEAD_COLOURS[this.hi % HEAD_COLOURS.length];
    const label = (i: number) => (s.tokens[i] || "·").slice(0, 16);
    if (this.full() && s.layers.length) {
      const layer = s.layers[this.li];
      let lb = this.layerCache;
      if (!lb || lb.layer !== layer) {
        try { lb = this.layerCache = await this.source.layer(s, layer); } catch { lb = null; }
      }
      if (!lb) return;
      const n = s.length, H = s.heads.length, K = s.length;
      canvas.width = W;
      canvas.height = n * rowH + 10;
      ctx.clearRect(0, 0, W, canvas.height);
      ctx.font = "11px sans-serif";
      ctx.textBaseline = "middle";
      const heads = this.hi < 0 ? [...Array(H).keys()] : [this.hi];
      for (let qi = 0; qi < lb.queries.length; qi++) {
        const q = lb.queries[qi];
        const sel = q === this.q;
        if (!sel && this.isPad(q)) continue; // a padding row is no token's attention: drawn only when picked (greyed)
        for (let k = 0; k < K; k++) {
          let w = 0;
          for (const h of heads) w += (lb.u8[(qi * H + h) * K + k] / 255) * lb.scale[qi * H + h];
          w /= heads.length;
          if (w < 0.02) continue;
          ctx.strokeStyle = this.isPad(q) ? "#999" : colour;
          ctx.globalAlpha = Math.min(1, w * (sel ? 1 : 0.35));
          ctx.lineWidth = sel ? 2 : 1;
          ctx.beginPath();
          ctx.moveTo(x0, 5 + q * rowH + rowH / 2);
          ctx.lineTo(x1, 5 + k * rowH + rowH / 2);
          ctx.stroke();
        }
      }
      ctx.globalAlpha = 1;
      for (let i = 0; i < n; i++) {
        const y = 5 + i * rowH + rowH / 2;
        ctx.fillStyle = this.isPad(i) ? "#aaa" : i === this.q ? "#000" : "#444";
        ctx.font = i === this.q ? "bold 11px sans-serif" : "11px sans-serif";
        ctx.textAlign = "right";
        ctx.fillText(label(i), x0 - 6, y);
        ctx.textAlign = "left";
        ctx.fillStyle = ROLE_COLOURS[this.role(i)] ?? "#444";
        ctx.fillText(label(i), x1 + 6, y);
      }
      canvas.dataset.mode = "full";
      return;
    }
    // long sequences: the selected query to its most attended keys, in position order
    if (!values) return;
    const keys = [...values.keys()].sort((a, b) => values[b] - values[a]).slice(0, TOP_KEYS).filter((k) => values[k] > 0).sort((a, b) => a - b);
    const max = Math.max(...keys.map((k) => values[k]), 1e-12);
    canvas.width = W;
    canvas.height = Math.max(keys.length, 1) * rowH + 10;
    ctx.clearRect(0, 0, W, canvas.height);
    ctx.font = "11px sans-serif";
    ctx.textBaseline = "middle";
    const yq = canvas.height / 2;
    keys.forEach((k, i) => {
      const y = 5 + i * rowH + rowH / 2;
      ctx.strokeStyle = colour;
      ctx.globalAlpha = Math.max(0.05, values[k] / max);
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      ctx.moveTo(x0, yq);
      ctx.lineTo(x1, y);
      ctx.stroke();
      ctx.globalAlpha = 1;
      ctx.textAlign = "left";
      ctx.fillStyle = ROLE_COLOURS[this.role(k)] ?? "#444";
      ctx.fillText(`${label(k)} #${k}`, x1 + 6, y);
    });
    ctx.textAlign = "right";
    ctx.fillStyle = this.isPad(this.q) ? "#999" : "#000";
    ctx.font = "bold 11px sans-serif";
    ctx.fillText(`${label(this.q)} #${this.q}${this.isPad(this.q) ? " (pad)" : ""}`, x0 - 6, yq);
    canvas.dataset.mode = "top";
  }

  private clickLines(ev: MouseEvent, canvas: HTMLCanvasElement): void {
    if (canvas.dataset.mode !== "full") return;
    const rect = canvas.getBoundingClientRect();
    const y = ((ev.clientY - rect.top) / rect.height) * canvas.height;
    const i = Math.floor((y - 5) / 15);
    if (i >= 0 && i < this.s.length) void this.select(this.nearest(i), i);
  }
}
