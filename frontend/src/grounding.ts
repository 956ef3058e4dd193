// Grounding panel of the served app: ask `attnscope.ground` where the run's question points, then draw its map
// over the image the model saw, the box (cyan) and the point prompts (numbered, lime). POST /api/runs/{rid}/ground.
import { api } from "./source";
import { drawHeat, el, normalize } from "./util";

export interface GroundAnswer {
  method: string;
  target: string | null;
  question: string;
  pixel_size: [number, number]; // [height, width] of the model input the box and points are in
  map: number[][];
  box: [number, number, number, number]; // x0, y0, x1, y1 (exclusive ends)
  points: [number, number][]; // (x, y)
  cost: { forwards: number; backwards: number };
}

const SIDE = 320;

/** Draw the image, the map (alpha-blended), the box and the points into a canvas; returns it. */
export function drawGrounding(canvas: HTMLCanvasElement, image: HTMLImageElement | null, g: GroundAnswer): void {
  const [h, w] = g.pixel_size;
  const scale = SIDE / Math.max(h, w);
  canvas.width = Math.round(w * scale);
  canvas.height = Math.round(h * scale);
  const ctx = canvas.getContext("2d")!;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (image) ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  const rows = g.map.length, cols = g.map[0]?.length ?? 0;
  drawHeat(ctx, normalize(Float32Array.from(g.map.flat()), 0.7), rows, cols, 0, 0, canvas.width, canvas.height,
    { alpha: true, smooth: false });
  const [x0, y0, x1, y1] = g.box;
  ctx.strokeStyle = "#00e5ff";
  ctx.lineWidth = 3;
  ctx.strokeRect(x0 * scale, y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale);
  ctx.font = "bold 12px sans-serif";
  g.points.forEach(([x, y], i) => {
    ctx.beginPath();
    ctx.arc(x * scale, y * scale, 7, 0, 2 * Math.PI);
    ctx.fillStyle = "#7CFC00";
    ctx.fill();
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 1.5;
    ctx.stroke();
    ctx.fillStyle = "#000";
    ctx.fillText(String(i + 1), x * scale - 3.5, y * scale + 4);
  });
}

/** The panel: method, target word, a button; the result drawn with its caption, errors in red. */
export function groundingPanel(base: string, rid: string, imageUrl: string, methods: string[]): HTMLElement {
  const method = el("select", { "aria-label": "grounding method" });
  for (const m of methods) method.append(el("option", { value: m, text: m }));
  const target = el("input", { type: "text", placeholder: "target word (optional)", "aria-label": "target word" });
  const go = el("button", { type: "button", text: "ground" });
  const canvas = el("canvas", { class: "as-ground-canvas" });
  const caption = el("div", { class: "as-note as-ground-caption" });
  const panel = el("div", { class: "as-panel as-ground" }, el("h2", { text: "grounding" }),
    el("div", {}, method, " ", target, " ", go), canvas, caption);
  const image = new Image();
  image.src = imageUrl;
  go.onclick = async () => {
    go.disabled = true;
    caption.classList.remove("as-error");
    caption.textContent = "grounding…";
    try {
      const g = await api<GroundAnswer>(`${base}/runs/${rid}/ground`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ method: method.value, target: target.value.trim() || null }),
      });
      if (!image.complete) await new Promise((ok) => { image.onload = ok; image.onerror = ok; });
      drawGrounding(canvas, image, g);
      panel.dataset.box = g.box.join(",");
      panel.dataset.points = g.points.map((p) => p.join(",")).join(";");
      caption.textContent = `${g.method}${g.target ? ` at "${g.target}"` : " at the answer position"}: box ` +
        `(${g.box.join(", ")}), points ${g.points.map((p) => `(${p.join(", ")})`).join(" ")} in ` +
        `${g.pixel_size[1]}x${g.pixel_size[0]} model-input pixels; ${g.cost.forwards} forward(s)` +
        (g.cost.backwards ? ` + ${g.cost.backwards} backward` : "");
    } catch (err) {
      canvas.getContext("2d")?.clearRect(0, 0, canvas.width, canvas.height); // no stale result under an error
      delete panel.dataset.box;
      caption.classList.add("as-error");
      caption.textContent = `error: ${(err as Error).message}`;
    } finally {
      go.disabled = false;
    }
  };
  return panel;
}
