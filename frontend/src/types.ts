// The view document written by attnscope/viz/data.py (format "attnscope.view/1").

export interface StreamMeta {
  name: string;
  length: number;
  layers: number[];
  heads: number[];
  tokens: string[];
  roles: number[]; // index into ViewDoc.roles
  patch: [number, number, number, number][]; // [position, image, row, col]
  grids: [number, number][];
  queries: number[]; // positions with stored rows, ascending
  sinks: number[];
  tail: string[]; // generated tokens that never got a forward of their own
  metrics: Record<string, number[][]>; // [layers][heads]
  received: number[] | null;
  pattern: { size: number; b64: string } | null; // uint8 [layers, heads, P, P]
  rows?: { encoding: "u8-deflate" | "u8"; b64: string; scale: string }; // [queries, layers, heads, keys]
}

export interface ExplEntry {
  method: string;
  stream: string;
  target: number | null;
  params: Record<string, unknown>;
  faithfulness: unknown;
  length: number;
  b64: string;
  scale: number;
  min: number;
  grid: number[] | null;
  floor?: number; // the value drawn as the darkest colour (0, or the minimum for flow)
  max?: number;
  explains?: string | null; // what the map explains, in words
  note?: string | null; // why a click could not be followed
  units?: string | null; // what the numbers are
  readout?: number[]; // rows the explained target reads
  clicked?: number | null;
  fid?: string; // server: ask /faithfulness/{fid} for the score afterwards
}

export interface HeadTable {
  title: string;
  metrics: Record<string, number[][]>;
  layers: number[];
}

export interface Generation {
  prompt_length: number;
  answer: string;
  new_tokens: number;
  stream: string;
}

export interface ViewDoc {
  format: string;
  title: string;
  roles: string[];
  streams: StreamMeta[];
  images: string[];
  provenance: Record<string, unknown>;
  generation: Generation | null;
  explanations: ExplEntry[];
  tables: HeadTable[];
  rid?: string;
  seconds?: number;
  steer?: { method: string; params: Record<string, unknown> } | null;
  mode?: string;
  sink_definition?: string;
  /** Lines shown above the viewer, e.g. that a trace's labels were not checked (written before checksums). */
  notes?: string[];
  labels_checked?: boolean;
  /** A summaries file (`capture(..., summaries=...)`): per-head summaries instead of rows (streams is empty). */
  summaries?: SummaryStreamMeta[];
}

/** One stream of a `Summaries` (attnscope/viz/summary_view.py): what the summaries view needs besides the numbers. */
export interface SummaryStreamMeta {
  name: string;
  layers: number[];
  heads: number[];
  tokens: string[];
  roles: number[]; // index into ViewDoc.roles
  metrics: { name: string; range: [number, number] | null }[]; // range: the colour scale (null: the grid's own)
  k: number; // top-k keys per head (0: not summarised)
  rows: [number, number][]; // (step, query position) with numbers, in order
  all_rows: number; // rows the summaries hold (more than `rows` when an exported page thinned them)
  token_eras?: [number, number, string[]][]; // beam search: (last step, first, tail): the row's tokens up to that step are tokens[:first] + tail
  blocks?: Record<string, SummaryBlockJson>; // "step:query" -> numbers, in an exported page
  notes?: string[]; // what the view says about this stream (a summary not offered, and why)
}

export interface SummaryBlockJson {
  step: number;
  q: number;
  k: number;
  metrics: Record<string, string>; // float32 [layers, heads], NaN where not captured
  topk_index: string; // int32 [layers, heads, k], -1 where none
  topk_value: string; // float32 [layers, heads, k]
  undefined?: Record<string, string>; // summary -> why its grid says nothing at this row (lookback without generated keys)
}

/** The numbers of one (step, query row): each summary per layer and head, and each head's top-k keys. */
export interface SummaryBlock {
  step: number;
  q: number;
  k: number;
  metrics: Record<string, Float32Array>;
  index: Int32Array;
  value: Float32Array;
  undefined: Record<string, string>;
}

export interface SummarySource {
  summary(stream: SummaryStreamMeta, step: number, q: number): Promise<SummaryBlock>;
  exportUrl?: string;
}

/** One stored query row for every layer and head: u8 [layers, heads, keys], scale [layers, heads]. */
export interface Block {
  q: number;
  u8: Uint8Array;
  scale: Float32Array;
}

/** Every stored query row of one layer: u8 [queries, heads, keys], scale [queries, heads]. */
export interface LayerBlock {
  layer: number;
  queries: number[];
  u8: Uint8Array;
  scale: Float32Array;
}

export interface Source {
  block(stream: StreamMeta, q: number): Promise<Block>;
  layer(stream: StreamMeta, layer: number): Promise<LayerBlock>;
  explain?(stream: StreamMeta, method: string, q: number, target: number | null): Promise<ExplEntry>;
  faithfulness?(fid: string): Promise<unknown>;
  methods: string[];
  exportUrl?: string;
}
