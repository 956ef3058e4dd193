// Decoding, colour maps and small DOM helpers.

export function bytes(b64: string): Uint8Array {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

export function floats(b64: string): Float32Array {
  const b = bytes(b64); // a fresh buffer, so its offset is aligned
  return new Float32Array(b.buffer, 0, b.length >> 2);
}

export function ints(b64: string): Int32Array {
  const b = bytes(b64);
  return new Int32Array(b.buffer, 0, b.length >> 2);
}

/** zlib-wrapped deflate (Python's zlib.compress), decoded with the browser's own DecompressionStream. */
export async function inflate(b64: string): Promise<Uint8Array> {
  const stream = new Blob([bytes(b64) as BlobPart]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

type RGB = [number, number, number];

function lut(stops: RGB[]): Uint8ClampedArray {
  const out = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (stops.length - 1);
    const a = Math.min(Math.floor(x), stops.length - 2);
    const t = x - a;
    for (let c = 0; c < 3; c++) out[i * 3 + c] = stops[a][c] + (stops[a + 1][c] - stops[a][c]) * t;
  }
  return out;
}

// matplotlib's inferno and viridis, sampled at 9 stops
export const INFERNO = lut([
  [0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
  [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164],
]);
export const VIRIDIS = lut([
  [68, 1, 84], [71, 45, 123], [59, 82, 139], [44, 114, 142], [33, 145, 140],
  [40, 174, 128], [94, 201, 98], [173, 220, 48], [253, 231, 37],
]);

export function rgb(map: Uint8ClampedArray, v: number): string {
  const i = Math.max(0, Math.min(255, Math.round(v * 255))) * 3;
  return `rgb(${map[i]},${map[i + 1]},${map[i + 2]})`;
}

export const ROLE_COLOURS: Record<string, string> = {
  cls: "#d62728", register: "#ff7f0e", image: "#2ca02c", special: "#7f7f7f", system: "#9467bd",
  text: "#1f77b4", generated: "#e377c2", pad: "#c7c7c7", unknown: "#bcbd22",
};

/** Said wherever a padding position's row is shown: the model computes one, but no token attends there. */
export const PAD_ROW = "padding: this position holds no token, so its row is not a token's attention (the model "
  + "fills padded query rows with an arbitrary or uniform row)";

export const HEAD_COLOURS = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
  "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
];

export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K, attrs: Record<string, string> = {}, ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

export function fmt(v: number, digits = 3): string {
  if (!isFinite(v)) return "–";
  if (v !== 0 && Math.abs(v) < 10 ** -digits) return v.toExponential(1);
  return v.toFixed(digits);
}

/** Scale to [0, 1] by the max, then apply a gamma (< 1 lifts faint structure next to a sink). */
export function normalize(values: Float32Array, gamma: number): Float32Array {
  let max = 0;
  for (const v of values) if (v > max) max = v;
  const out = new Float32Array(values.length);
  if (max <= 0) return out;
  for (let i = 0; i < values.length; i++) out[i] = Math.pow(Math.max(0, values[i]) / max, gamma);
  return out;
}

/** Draw a rows x cols grid of values in [0, 1] into `ctx` over (x, y, w, h), smoothed (bilinear) or not. */
export function drawHeat(
  ctx: CanvasRenderingContext2D, values: Float32Array, rows: number, cols: number,
  x: number, y: number, w: number, h: number, opts: { alpha?: boolean; smooth?: boolean; map?: Uint8ClampedArray } = {},
): void {
  const map = opts.map ?? INFERNO;
  const small = document.createElement("canvas");
  small.width = cols;
  small.height = rows;
  const sctx = small.getContext("2d")!;
  const img = sctx.createImageData(cols, rows);
  for (let i = 0; i < rows * cols; i++) {
    const v = Math.max(0, Math.min(1, values[i] || 0));
    const j = Math.round(v * 255) * 3;
    img.data[i * 4] = map[j];
    img.data[i * 4 + 1] = map[j + 1];
    img.data[i * 4 + 2] = map[j + 2];
    img.data[i * 4 + 3] = opts.alpha ? Math.round(255 * Math.min(1, 0.12 + 0.78 * v)) : 255;
  }
  sctx.putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = opts.smooth ?? true;
  ctx.drawImage(small, x, y, w, h);
}

/** Keyboard access to a grid of cells (`cells[row][col]`; null: no cell there): one cell is in the tab order (the
 * picked one, else the first), arrow keys, Home and End move the focus, Enter or Space picks the focused cell (WAI-ARIA
 * grid pattern). Each cell keeps its own accessible name (its aria-label). */
export class GridKeys {
  private at: [number, number] = [-1, -1];

  constructor(private readonly cells: (HTMLElement | null)[][], private readonly pick: (row: number, col: number) => void) {
    cells.forEach((row, r) => row.forEach((cell, c) => {
      if (!cell) return;
      cell.tabIndex = -1;
      cell.addEventListener("keydown", (ev) => this.key(ev, r, c));
      cell.addEventListener("focus", () => this.current(r, c));
    }));
    const first = cells.findIndex((row) => row.some((x) => x));
    if (first >= 0) this.current(first, cells[first].findIndex((x) => x));
  }

  /** Make (row, col) the cell the tab key reaches (the picked one, after a mouse click too). */
  current(r: number, c: number): void {
    const cell = this.cells[r]?.[c];
    if (!cell) return;
    const [pr, pc] = this.at;
    const prev = this.cells[pr]?.[pc];
    if (prev) prev.tabIndex = -1;
    cell.tabIndex = 0;
    this.at = [r, c];
  }

  focus(r: number, c: number): void {
    this.current(r, c);
    this.cells[r]?.[c]?.focus();
  }

  private key(ev: KeyboardEvent, r: number, c: number): void {
    if (ev.key === "Enter" || ev.key === " ") {
      ev.preventDefault();
      this.pick(r, c);
      return;
    }
    const move: Record<string, [number, number]> = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    let to: [number, number] | null = null;
    if (ev.key in move) {
      const [dr, dc] = move[ev.key];
      for (let i = r + dr, j = c + dc; this.cells[i]?.[j] !== undefined; i += dr, j += dc) {
        if (this.cells[i][j]) { to = [i, j]; break; }
      }
    } else if (ev.key === "Home" || ev.key === "End") {
      const row = this.cells[r];
      const j = ev.key === "Home" ? row.findIndex((x) => x) : row.length - 1 - [...row].reverse().findIndex((x) => x);
      to = [r, j];
    } else return;
    ev.preventDefault();
    if (to) this.focus(to[0], to[1]);
  }
}
