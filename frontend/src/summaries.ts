// The view of a summaries file (`capture(..., summaries=...)`): for a stream, a step and one of its query rows, a
// layers x heads heat map of one summary, and the top-k keys of the clicked head as tokens. The numbers are the
// Python side's (attnscope/viz/summary_view.py); this file only draws them.
import type { SummaryBlock, SummarySource, SummaryStreamMeta, ViewDoc } from "./types";
import { GridKeys, PAD_ROW, VIRIDIS, el, fmt, rgb } from "./util";

export class SummaryViewer {
  readonly root: HTMLElement;
  private s!: SummaryStreamMeta;
  private metric = "";
  private steps: number[] = [];
  private rowsOf = new Map<number, number[]>(); // step -> query positions with numbers
  private step = 0;
  private q = 0;
  private li = -1; // the clicked head (layer index, head index); -1: none
  private hi = -1;
  private block: SummaryBlock | null = null;
  private ticket = 0;
  private dropped = 0; // answers that came after a later request's (not drawn; counted for tests)
  private els!: Record<string, HTMLElement>;

  constructor(host: HTMLElement, readonly doc: ViewDoc, readonly source: SummarySource) {
    this.root = el("div", { class: "as-viewer as-sumview" });
    host.append(this.root);
    const streams = doc.summaries ?? [];
    const lang = streams.findIndex((s) => s.name === "language");
    void this.setStream(Math.max(0, lang));
  }

  /** The tokens labelling `step`'s rows and keys: under beam search a batch row changes hypothesis between steps
   * (`token_eras`, as Python's `Run.maps_at`), else the sequence's own. */
  private tokensAt(step: number): string[] {
    for (const [last, first, tail] of this.s.token_eras ?? []) {
      if (step <= last) return this.s.tokens.slice(0, first).concat(tail);
    }
    return this.s.tokens;
  }

  private tok(p: number, step: number): string {
    return `‘${this.tokensAt(step)[p] ?? "?"}’ #${p}${this.isPad(p) ? " (pad)" : ""}`;
  }

  /** Whether position `p` is padding: its row's summaries are no token's attention. */
  private isPad(p: number): boolean {
    return this.doc.roles[this.s.roles[p]] === "pad";
  }

  async setStream(i: number): Promise<void> {
    const s = (this.s = this.doc.summaries![i]);
    this.rowsOf.clear();
    for (const [step, q] of s.rows) {
      if (!this.rowsOf.has(step)) this.rowsOf.set(step, []);
      this.rowsOf.get(step)!.push(q);
    }
    this.steps = [...this.rowsOf.keys()];
    const names = s.metrics.map((m) => m.name);
    this.metric = names.includes(this.metric) ? this.metric : names[0] ?? "";
    this.li = this.hi = -1;
    this.block = null; // the other stream's numbers: not to be drawn in this one's layers and heads meanwhile
    this.build(i);
    const last = this.steps[this.steps.length - 1] ?? 0;
    await this.show(last, this.lastRow(last));
  }

  /** The step's last row of a token (a right-padded sequence ends in padding), else its last row. */
  private lastRow(step: number): number {
    const qs = this.rowsOf.get(step) ?? [0];
    for (let i = qs.length - 1; i >= 0; i--) if (!this.isPad(qs[i])) return qs[i];
    return qs[qs.length - 1];
  }

  private build(si: number): void {
    const s = this.s, streams = this.doc.summaries!;
    this.root.replaceChildren();
    this.root.dataset.ready = "0";
    const bar = el("div", { class: "as-bar" });
    if (streams.length > 1) {
      const sel = el("select", { class: "as-stream", "aria-label": "stream" });
      streams.forEach((st, i) => sel.append(el("option", { value: String(i), text: st.name })));
      sel.value = String(si);
      sel.onchange = () => void this.setStream(Number(sel.value));
      bar.append(el("label", {}, "stream ", sel));
    }
    const metric = el("select", { class: "as-summetric", "aria-label": "summary" });
    for (const m of s.metrics) metric.append(el("option", { value: m.name, text: m.name }));
    metric.value = this.metric;
    metric.onchange = () => { this.metric = metric.value; this.render(); };
    bar.append(el("label", {}, "summary ", metric));
    const slider = el("input", { type: "range", class: "as-step", min: "0", max: String(Math.max(0, this.steps.length - 1)), step: "1", "aria-label": "step" });
    slider.oninput = () => {
      const step = this.steps[Number(slider.value)];
      void this.show(step, this.lastRow(step));
    };
    const stepLabel = el("span", { class: "as-steplabel" });
    if (this.steps.length > 1) bar.append(el("label", {}, "step ", slider), stepLabel);
    const query = el("select", { class: "as-sumquery", "aria-label": "query row" });
    query.onchange = () => void this.show(this.step, Number(query.value));
    const queryRow = el("label", {}, "query ", query);
    bar.append(queryRow);
    if (this.source.exportUrl) bar.append(el("a", { class: "as-export", href: this.source.exportUrl, download: "", text: "export HTML" }));
    const caption = el("div", { class: "as-caption" });
    const legend = el("span", { class: "as-mlegend" });
    const grid = el("div", { class: "as-panel as-gridpanel" });
    const detailTitle = el("div", { class: "as-dtitle" });
    const stats = el("div", { class: "as-stats" });
    const topLabel = el("div", { class: "as-k" });
    const top = el("ol", { class: "as-top" });
    const detail = el("div", { class: "as-panel as-detail" }, detailTitle, stats, topLabel, top);
    const note = el("div", { class: "as-note", text: s.rows.length < s.all_rows
      ? `this page holds ${s.rows.length} of the ${s.all_rows} (step, query) rows of the summaries`
      : "summaries reduced in the attention call: no attention rows are stored, so there is no token heat map" });
    const said = (s.notes ?? []).map((n) => el("div", { class: "as-note as-streamnote", role: "note", text: n }));
    const rowNote = el("div", { class: "as-padnote as-rownote", role: "status" });
    this.root.append(bar, note, ...said, el("div", { class: "as-gridhead" }, caption, legend), rowNote, el("div", { class: "as-main" }, grid, detail));
    this.els = { slider, stepLabel, query, queryRow, caption, legend, rowNote, grid, detailTitle, stats, topLabel, top };
  }

  /** Ask for (step, q)'s numbers; only the latest request's answer is drawn (a slider dragged fast asks many). */
  async show(step: number, q: number): Promise<void> {
    const ticket = ++this.ticket;
    this.step = step;
    this.q = q;
    this.syncControls();
    try {
      const block = await this.source.summary(this.s, step, q);
      if (ticket !== this.ticket) return this.drop();
      this.block = block;
    } catch (err) {
      if (ticket !== this.ticket) return this.drop();
      this.block = null;
      this.els.caption.textContent = `could not load the summaries of step ${step}, query ${q}: ${(err as Error).message}`;
      this.els.caption.classList.add("as-error");
      // nothing of another row stays beside the error: the grid, its scale and the picked head's numbers go
      const { grid, legend, detailTitle, stats, topLabel, top, rowNote } = this.els;
      grid.replaceChildren();
      rowNote.textContent = "";
      legend.replaceChildren();
      stats.replaceChildren();
      top.replaceChildren();
      detailTitle.textContent = "no numbers";
      topLabel.textContent = "";
      Object.assign(this.root.dataset, { step: String(step), q: String(q), head: "", ready: "1" });
      return;
    }
    this.els.caption.classList.remove("as-error");
    this.render();
  }

  private drop(): void {
    this.root.dataset.dropped = String(++this.dropped);
  }

  private syncControls(): void {
    const { slider, stepLabel, query, queryRow } = this.els as { slider: HTMLInputElement; query: HTMLSelectElement } & Record<string, HTMLElement>;
    slider.value = String(this.steps.indexOf(this.step));
    stepLabel.textContent = `${this.step === 0 ? "prefill" : `decode step ${this.step}`} (${this.steps.indexOf(this.step) + 1} of ${this.steps.length})`;
    const qs = this.rowsOf.get(this.step) ?? [];
    query.replaceChildren(...qs.map((p) => el("option", { value: String(p), text: this.tok(p, this.step), class: this.isPad(p) ? "as-pad" : "" })));
    query.value = String(this.q);
    query.disabled = qs.length < 2;
    queryRow.title = qs.length < 2 ? "this step holds one query row" : `${qs.length} query rows at this step`;
  }

  private render(): void {
    const s = this.s, b = this.block;
    if (!b) return;
    const values = b.metrics[this.metric];
    const meta = s.metrics.find((m) => m.name === this.metric);
    const H = s.heads.length;
    // a summary that says nothing at this row (lookback without a generated key: 1 by definition) is drawn "n/a"
    const none = b.undefined[this.metric];
    let lo = Infinity, hi = -Infinity;
    for (const v of values ?? []) if (isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    if (meta?.range) [lo, hi] = meta.range;
    const span = hi - lo || 1;
    this.els.caption.textContent = `${this.metric} of query ${this.tok(b.q, b.step)} at ${b.step === 0 ? "the prefill" : `decode step ${b.step}`}, per layer (rows) and head (columns); click a head (or Enter on it) for its top keys`;
    if (none) this.els.legend.replaceChildren(`n/a: ${this.metric} is 1 by definition here`);
    else this.els.legend.replaceChildren(` ${fmt(lo)} `, el("span", { class: "as-mbar" }), ` ${fmt(hi)}`);
    const pad = this.isPad(b.q);
    this.els.rowNote.textContent = [pad ? `query ${this.tok(b.q, b.step)}: ${PAD_ROW}` : "", none ? `${this.metric}: ${none}` : ""].filter((x) => x).join(" · ");
    this.root.classList.toggle("as-padrow", pad);
    const refocus = this.els.grid.contains(document.activeElement) ? (document.activeElement as HTMLElement).dataset : null;
    const table = el("table", { class: "as-htable as-sumgrid", role: "grid", "aria-label": `${this.metric} per layer and head`,
      "data-layers": String(s.layers.length), "data-heads": String(H) });
    const head = el("tr", {}, el("th", { text: "" }));
    for (const h of s.heads) head.append(el("th", { text: `H${h}`, scope: "col" }));
    table.append(head);
    const cells: HTMLElement[][] = [];
    s.layers.forEach((layer, li) => {
      const tr = el("tr", {}, el("th", { text: `L${layer}`, scope: "row" }));
      cells.push([]);
      s.heads.forEach((h, hi) => {
        const v = values ? values[li * H + hi] : NaN;
        const known = isFinite(v);
        const said = !known ? "not captured at this row" : none ? `${this.metric} n/a (1 by definition: no generated key)` : `${this.metric} ${fmt(v)}`;
        const picked = li === this.li && hi === this.hi;
        const td = el("td", { class: "as-sumcell", role: "gridcell", "data-l": String(layer), "data-h": String(h),
          "data-value": known ? String(v) : "", text: !known ? "–" : none ? "n/a" : fmt(v, 2),
          title: known && !none ? `layer ${layer} head ${h}: ${this.metric} ${v}` : `layer ${layer} head ${h}: ${said}`,
          "aria-label": `layer ${layer}, head ${h}: ${said}`, "aria-selected": String(picked) });
        if (known && !none) {
          const x = Math.max(0, Math.min(1, (v - lo) / span));
          td.style.background = rgb(VIRIDIS, x);
          td.style.color = x > 0.6 ? "#000" : "#fff";
        } else if (none) td.classList.add("as-na");
        if (known) td.onclick = () => this.pick(li, hi);
        td.classList.toggle("as-selected", picked);
        tr.append(td);
        cells[li].push(td);
      });
      table.append(tr);
    });
    this.els.grid.replaceChildren(table);
    // Enter or Space picks a head as a click does; the focus stays on that head after the grid is redrawn
    const keys = new GridKeys(cells, (li, hi) => { if (isFinite(values?.[li * H + hi] ?? NaN)) this.pick(li, hi); });
    if (this.li >= 0) keys.current(this.li, this.hi);
    if (refocus?.l !== undefined) keys.focus(s.layers.indexOf(Number(refocus.l)), s.heads.indexOf(Number(refocus.h)));
    this.renderDetail();
    Object.assign(this.root.dataset, { stream: s.name, step: String(b.step), q: String(b.q), metric: this.metric, ready: "1" });
  }

  private pick(li: number, hi: number): void {
    this.li = li;
    this.hi = hi;
    this.render();
  }

  private renderDetail(): void {
    const s = this.s, b = this.block!, { detailTitle, stats, topLabel, top } = this.els;
    stats.replaceChildren();
    top.replaceChildren();
    if (this.li < 0) {
      detailTitle.textContent = "no head picked";
      topLabel.textContent = "click a cell for that head's summaries and top keys";
      this.root.dataset.head = "";
      return;
    }
    const layer = s.layers[this.li], h = s.heads[this.hi], cell = this.li * s.heads.length + this.hi;
    const tokens = this.tokensAt(b.step);
    detailTitle.textContent = `layer ${layer} · head ${h} · query ${this.tok(b.q, b.step)}`;
    for (const m of s.metrics) stats.append(el("span", { text: `${m.name} ${b.undefined[m.name] ? "n/a" : fmt(b.metrics[m.name][cell])}` }));
    topLabel.textContent = b.k ? `top ${b.k} keys (attention weight; keys given none are left out)` : "top-k keys were not summarised (capture with summaries including \"topk\")";
    for (let j = 0; j < b.k; j++) {
      const p = b.index[cell * b.k + j], v = b.value[cell * b.k + j];
      if (p < 0 || !(v > 0)) continue; // none, or a key the row gave no weight (e.g. a future one)
      const bar = el("span", { class: "as-topbar" });
      bar.style.width = `${Math.round(Math.max(0, Math.min(1, v)) * 100)}%`;
      top.append(el("li", { title: `#${p} ${this.doc.roles[s.roles[p]] ?? "unknown"}`, "data-k": String(p), "data-value": String(v) },
        el("span", { class: "as-toptok", text: `${tokens[p] || "·"} #${p}` }), bar, el("span", { text: fmt(v) })));
    }
    this.root.dataset.head = `${layer}:${h}`;
  }
}
