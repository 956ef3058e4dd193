// Entry: an exported page carries its document in <script id="attnscope-data">; the served page says
// {"mode": "server"} there and the app asks the server for everything.
import "./style.css";
import { startApp } from "./app";
import { EmbeddedSource, EmbeddedSummarySource } from "./source";
import { SummaryViewer } from "./summaries";
import type { HeadTable, ViewDoc } from "./types";
import { VIRIDIS, el, fmt, rgb } from "./util";
import { Viewer } from "./viewer";

declare global {
  interface Window {
    attnscope?: { viewers: Viewer[]; started: number; readyMs?: number };
  }
}

function renderTables(host: HTMLElement, tables: HeadTable[]): void {
  for (const t of tables) {
    const box = el("div", { class: "as-panel as-table" }, el("h2", { text: t.title }));
    const pick = el("select", { "aria-label": "metric" });
    for (const k of Object.keys(t.metrics)) pick.append(el("option", { value: k, text: k }));
    const holder = el("div");
    const draw = () => {
      const grid = t.metrics[pick.value] ?? [];
      const ok = (v: unknown): v is number => typeof v === "number" && isFinite(v);
      const flat = grid.flat().filter(ok);
      const lo = Math.min(...flat), hi = Math.max(...flat), span = hi - lo || 1;
      const table = el("table", { class: "as-htable" });
      const head = el("tr", {}, el("th", { text: "" }));
      (grid[0] ?? []).forEach((_, h) => head.append(el("th", { text: `H${h}` })));
      table.append(head);
      grid.forEach((row, li) => {
        const tr = el("tr", {}, el("th", { text: `L${t.layers[li] ?? li}` }));
        for (const v of row) {
          const td = el("td", { text: ok(v) ? fmt(v, 2) : "–", title: String(v) });
          if (ok(v)) {
            const x = (v - lo) / span;
            td.style.background = rgb(VIRIDIS, x);
            td.style.color = x > 0.6 ? "#000" : "#fff";
          }
          tr.append(td);
        }
        table.append(tr);
      });
      holder.replaceChildren(table);
    };
    pick.onchange = draw;
    box.append(el("label", {}, "metric ", pick), holder);
    host.append(box);
    draw();
  }
}

function boot(): void {
  const root = document.getElementById("attnscope-root");
  const data = document.getElementById("attnscope-data");
  if (!root || !data) return;
  window.attnscope = { viewers: [], started: performance.now() };
  let doc: ViewDoc & { api?: string };
  try {
    doc = JSON.parse(data.textContent || "{}");
  } catch (err) {
    root.textContent = `attnscope: unreadable view data (${(err as Error).message})`;
    return;
  }
  if (doc.mode === "server") {
    void startApp(root, doc.api ?? "api");
    return;
  }
  if (doc.title) root.append(el("h1", { class: "as-title", text: doc.title }));
  if (doc.streams.length) {
    const v = new Viewer(root, doc, new EmbeddedSource());
    window.attnscope.viewers.push(v);
  }
  if (doc.summaries?.length) new SummaryViewer(root, doc, new EmbeddedSummarySource());
  if (doc.tables.length) renderTables(root, doc.tables);
  const prov = doc.provenance ?? {};
  if (Object.keys(prov).length) {
    const details = el("details", { class: "as-prov" }, el("summary", { text: "provenance" }));
    details.append(el("pre", { text: JSON.stringify(prov, null, 1) }));
    root.append(details);
  }
  window.attnscope.readyMs = performance.now() - window.attnscope.started;
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
else boot();
