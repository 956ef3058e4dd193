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
