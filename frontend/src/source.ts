// Where query rows come from: the document itself (exported HTML) or the server (lazily, per query / layer).
import type {
  Block, ExplEntry, LayerBlock, Source, StreamMeta, SummaryBlock, SummaryBlockJson, SummarySource, SummaryStreamMeta,
} from "./types";
import { bytes, floats, inflate, ints } from "./util";

function summaryBlock(j: SummaryBlockJson): SummaryBlock {
  const metrics: Record<string, Float32Array> = {};
  for (const [name, b64] of Object.entries(j.metrics)) metrics[name] = floats(b64);
  return { step: j.step, q: j.q, k: j.k, metrics, index: ints(j.topk_index), value: floats(j.topk_value), undefined: j.undefined ?? {} };
}

/** Summaries embedded in an exported page: the rows it carries, decoded when first shown. */
export class EmbeddedSummarySource implements SummarySource {
  async summary(s: SummaryStreamMeta, step: number, q: number): Promise<SummaryBlock> {
    const j = s.blocks?.[`${step}:${q}`];
    if (!j) throw new Error(`this page holds no numbers for step ${step}, query ${q}`);
    return summaryBlock(j);
  }
}

/** Rows embedded in the document: decoded once per stream on first use, then sliced without copies. */
export class EmbeddedSource implements Source {
  methods: string[] = ["raw"];
  private decoded = new Map<string, Promise<{ u8: Uint8Array; scale: Float32Array }>>();

  private rows(s: StreamMeta) {
    let p = this.decoded.get(s.name);
    if (!p) {
      const rows = s.rows;
      if (!rows) throw new Error(`stream ${s.name} has no embedded rows`);
      p = (async () => ({
        u8: rows.encoding === "u8-deflate" ? await inflate(rows.b64) : bytes(rows.b64),
        scale: floats(rows.scale),
      }))();
      this.decoded.set(s.name, p);
    }
    return p;
  }

  async block(s: StreamMeta, q: number): Promise<Block> {
    const { u8, scale } = await this.rows(s);
    const i = s.queries.indexOf(q);
    if (i < 0) throw new Error(`no stored row for position ${q}`);
    const per = s.layers.length * s.heads.length;
    return { q, u8: u8.subarray(i * per * s.length, (i + 1) * per * s.length), scale: scale.subarray(i * per, (i + 1) * per) };
  }

  async layer(s: StreamMeta, layer: number): Promise<LayerBlock> {
    const { u8, scale } = await this.rows(s);
    const li = s.layers.indexOf(layer);
    const H = s.heads.length, K = s.length, L = s.layers.length, n = s.queries.length;
    const out = new Uint8Array(n * H * K), sc = new Float32Array(n * H);
    for (let i = 0; i < n; i++) {
      const src = (i * L + li) * H;
      out.set(u8.subarray(src * K, (src + H) * K), i * H * K);
      sc.set(scale.subarray(src, src + H), i * H);
    }
    return { layer, queries: s.queries, u8: out, scale: sc };
  }
}

export class ApiError extends Error {
  constructor(public status: number, message: string) {
    super(message);
  }
}

export async function api<T>(url: string, init?: RequestInit): Promise<T> {
  const res = await fetch(url, init);
  let body: unknown = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  if (!res.ok) {
    const msg = (body as { error?: string } | null)?.error ?? `${res.status} ${res.statusText}`;
    throw new ApiError(res.status, msg);
  }
  return body as T;
}

/** Rows (or a summaries file's blocks) fetched from `attnscope serve` on demand; the last 64 answers are kept. */
export class ServerSource implements Source, SummarySource {
  private cache = new Map<string, Promise<unknown>>();
  exportUrl: string;

  constructor(private base: string, private rid: string, public methods: string[]) {
    this.exportUrl = `${base}/runs/${rid}/export`;
  }

  private cached<T>(key: string, make: () => Promise<T>): Promise<T> {
    let p = this.cache.get(key) as Promise<T> | undefined;
    if (!p) {
      p = make();
      p.catch(() => this.cache.delete(key));
      this.cache.set(key, p);
      if (this.cache.size > 64) this.cache.delete(this.cache.keys().next().value as string);
    }
    return p;
  }

  block(s: StreamMeta, q: number): Promise<Block> {
    return this.cached(`q:${s.name}:${q}`, async () => {
      const r = await api<{ q: number; b64: string; scale: string }>(
        `${this.base}/runs/${this.rid}/${encodeURIComponent(s.name)}/query/${q}`);
      return { q: r.q, u8: bytes(r.b64), scale: floats(r.scale) };
    });
  }

  layer(s: StreamMeta, layer: number): Promise<LayerBlock> {
    return this.cached(`l:${s.name}:${layer}`, async () => {
      const r = await api<{ layer: number; queries: number[]; b64: string; scale: string }>(
        `${this.base}/runs/${this.rid}/${encodeURIComponent(s.name)}/layer/${layer}`);
      return { layer: r.layer, queries: r.queries, u8: bytes(r.b64), scale: floats(r.scale) };
    });
  }

  summary(s: SummaryStreamMeta, step: number, q: number): Promise<SummaryBlock> {
    return this.cached(`s:${s.name}:${step}:${q}`, async () => summaryBlock(await api<SummaryBlockJson>(
      `${this.base}/runs/${this.rid}/${encodeURIComponent(s.name)}/summary/${step}/${q}`)));
  }

  explain(s: StreamMeta, method: string, q: number, target: number | null): Promise<ExplEntry> {
    return this.cached(`e:${s.name}:${method}:${q}:${target}`, () =>
      api<ExplEntry>(`${this.base}/runs/${this.rid}/explain`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ method, stream: s.name, query: q, target }),
      }));
  }

  faithfulness(fid: string): Promise<unknown> {
    return this.cached(`f:${fid}`, async () =>
      (await api<{ faithfulness: unknown }>(`${this.base}/runs/${this.rid}/faithfulness/${fid}`, { method: "POST" })).faithfulness);
  }
}
