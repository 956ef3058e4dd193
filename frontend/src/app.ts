// The served app around the viewer: pick a model, give an image and/or a prompt, run, compare steering.
import { ApiError, ServerSource, api } from "./source";
import type { ViewDoc } from "./types";
import { el } from "./util";
import { DiffView } from "./diff";
import { knockoutPanel } from "./knockout";
import { groundingPanel } from "./grounding";
import { SummaryViewer } from "./summaries";
import { Viewer } from "./viewer";

interface Info {
  models: { id: string; label: string; about: string; installed: boolean }[];
  photos: string[];
  explain: string[];
  ground?: string[];
  steer: Record<string, SteerMethod>;
  limits: { max_upload: number; max_pixels: number; max_text: number; max_tokens: number; max_new_tokens: number };
}

interface SteerMethod {
  doc: string;
  help: string;
  syntax: string;
  params: Record<string, { default: string | null; required: boolean }>;
}

interface Takes { text: boolean; image: boolean; generate: boolean; vlm?: boolean; image_token?: string | null }

interface RunAnswer {
  rid: string;
  model: string | null;
  doc: ViewDoc;
  steered?: RunAnswer;
}

export async function startApp(root: HTMLElement, base: string): Promise<void> {
  const status = el("div", { class: "as-status", role: "status", "aria-live": "polite" });
  const results = el("div", { class: "as-results" });
  const put = (text: string, error: boolean) => {
    status.textContent = text;
    status.classList.toggle("as-error", error);
  };
  // the status line apart from a model's "loading …" note, which goes when that answer comes (`adapt`)
  let kept: [string, boolean] = ["", false];
  const say = (text: string, error = false) => {
    kept = [text, error];
    put(text, error);
  };
  // a run, a trace upload and a linked run each take a ticket: only the latest one's answer (or error) is shown,
  // so a request answering after a later one neither replaces its results nor misnames them
  let latest = 0;
  let info: Info;
  try {
    info = await api<Info>(`${base}/info`);
  } catch (err) {
    root.append(status);
    say(`cannot reach the attnscope server: ${(err as Error).message}`, true);
    return;
  }

  const model = el("select", { name: "model", "aria-label": "model" });
  for (const m of info.models) {
    model.append(el("option", { value: m.id, text: m.installed ? m.label : `${m.label} (not installed)` }));
  }
  const photo = el("select", { name: "photo", "aria-label": "photo" });
  photo.append(el("option", { value: "", text: "(no photo)" }));
  for (const p of info.photos) photo.append(el("option", { value: p, text: p }));
  const image = el("input", { type: "file", name: "image", accept: "image/png,image/jpeg,image/webp,image/gif,image/bmp", "aria-label": "image file" });
  const text = el("textarea", { name: "text", rows: "2", placeholder: "prompt (text models)", maxlength: String(info.limits.max_text), "aria-label": "prompt" });
  const newTokens = el("input", { type: "number", name: "max_new_tokens", min: "0", max: String(info.limits.max_new_tokens), value: "8", "aria-label": "new tokens" });
  const chat = el("input", { type: "checkbox", name: "chat", value: "1", "aria-label": "chat template" });
  const raw = el("input", { type: "checkbox", name: "raw", value: "1", "aria-label": "raw prompt" });
  const rawRow = el("label", { class: "as-raw", title: "use the prompt exactly as typed: write the image placeholder and chat markup yourself" }, raw, " raw prompt");
  const steer = el("select", { name: "steer", "aria-label": "steering" });
  steer.append(el("option", { value: "", text: "no steering" }));
  for (const [name, m] of Object.entries(info.steer)) steer.append(el("option", { value: name, text: name, title: m.doc }));
  const steerParams = el("span", { class: "as-steerparams" });
  const steerHelp = el("details", { class: "as-steerhelp as-hidden" });
  const run = el("button", { type: "submit", class: "as-run", text: "Run" });
  const traceFile = el("input", { type: "file", name: "trace", accept: ".safetensors", "aria-label": "trace or summaries file" });

  const chatRow = el("label", { class: "as-chat" }, chat, " chat template");
  const genRow = el("span", { class: "as-gen" }, el("label", {}, "new tokens ", newTokens), " ", chatRow, " ", rawRow);
  const steerRow = el("span", { class: "as-steer" },
    Object.keys(info.steer).length ? el("label", {}, "steer ", steer) : el("span", { class: "as-note", text: "steering: attnscope.steer is not installed in this version" }),
    steerParams, steerHelp);
  const form = el("form", { class: "as-form" },
    el("label", {}, "model ", model),
    el("label", { class: "as-img" }, "image ", image, " or photo ", photo),
    el("label", { class: "as-txt" }, "prompt ", text),
    genRow, steerRow, run,
    el("label", { class: "as-trace" }, "or open a trace or summaries file ", traceFile));
  root.append(el("header", { class: "as-header" }, el("h1", { text: "attnscope" }),
    el("span", { class: "as-note", text: `methods: ${info.explain.join(", ")}` })), form, status, results);

  // the steering form is generated from the method's signature (every parameter), with its docstring as help
  steer.onchange = () => {
    steerParams.replaceChildren();
    steerHelp.replaceChildren();
    steerHelp.classList.add("as-hidden");
    const m = info.steer[steer.value];
    if (!m) return;
    for (const [k, p] of Object.entries(m.params)) {
      const input = el("input", {
        name: `steer.${k}`, value: p.default ?? "", size: "7", "aria-label": k,
        placeholder: p.required ? "required" : p.default === null ? "default" : "",
        title: `${k}${p.required ? " (required)" : p.default === null ? " (blank: the method's default)" : ` (default ${p.default})`}; ${m.syntax}`,
      });
      if (p.required) input.required = true;
      steerParams.append(el("label", { class: p.required ? "as-required" : "" }, ` ${k} `, input));
    }
    steerHelp.append(el("summary", { text: `about ${steer.value}` }), el("pre", { text: `${m.help}\n\nparameters: ${m.syntax}` }));
    steerHelp.classList.remove("as-hidden");
  };

  const takes = new Map<string, Takes>();
  const adapt = async () => {
    const id = model.value;
    const loading = `loading ${id}…`;
    if (!takes.has(id)) {
      put(loading, false);
      try {
        const r = await api<{ takes: Takes }>(`${base}/models/${encodeURIComponent(id)}`);
        takes.set(id, r.takes);
      } catch (err) {
        if (model.value === id) say((err as Error).message, true);
        else if (status.textContent === loading) put(...kept);
        return;
      }
      // take back only this call's own note (a run or trace answered meanwhile has put its own line there), even
      // when another model was picked meanwhile (a model already known puts no note of its own)
      if (status.textContent === loading) put(...kept);
    }
    if (model.value !== id) return; // the user picked another model meanwhile: its own answer applies
    const t = takes.get(id)!;
    form.querySelector(".as-img")!.classList.toggle("as-hidden", !t.image);
    form.querySelector(".as-txt")!.classList.toggle("as-hidden", !t.text);
    genRow.classList.toggle("as-hidden", !t.generate);
    steerRow.classList.toggle("as-hidden", !t.generate);
    // a VLM builds its own chat prompt with the image placeholder; "raw prompt" types it by hand instead
    chatRow.classList.toggle("as-hidden", !!t.vlm);
    rawRow.classList.toggle("as-hidden", !t.vlm);
    text.placeholder = t.vlm
      ? `question about the image (the chat prompt and ${t.image_token ?? "image placeholder"} are added for you)`
      : t.image ? "prompt" : "prompt (text models)";
  };
  // until the chosen model's inputs are known, show none of the model-specific fields
  for (const node of [form.querySelector(".as-img")!, form.querySelector(".as-txt")!, genRow, steerRow]) node.classList.add("as-hidden");
  let adapting = adapt();
  model.onchange = () => { adapting = adapt(); };

  const fail = (message: string) => {
    // an error replaces what was on screen: a stale result under a new input would be read as its answer
    results.replaceChildren();
    results.dataset.state = "error";
    say(message, true);
  };

  const show = (answer: RunAnswer) => {
    results.replaceChildren();
    const t0 = performance.now();
    // e.g. a trace written before metadata checksums: its labels were not checked
    for (const note of answer.doc.notes ?? []) results.append(el("p", { class: "as-warn", role: "note", text: note }));
    const methods = info.explain;
    if (answer.doc.summaries?.length) {  // a summaries file: per-head summaries, no rows
      new SummaryViewer(results, answer.doc, new ServerSource(base, answer.rid, methods));
    } else if (answer.steered) {
      const pair = el("div", { class: "as-compare" });
      results.append(pair);
      const a = el("div", { class: "as-side" }), b = el("div", { class: "as-side" });
      pair.append(a, b);
      const s = answer.steered.doc.steer;
      const label = s ? `steered: ${s.method}(${Object.entries(s.params).map(([k, v]) => `${k}=${v}`).join(", ")})` : "steered";
      let diff: DiffView | null = null;
      const redraw = () => diff?.update();
      const va: Viewer = new Viewer(a, answer.doc, new ServerSource(base, answer.rid, methods), { label: "unsteered", onSelect: (sel) => void vb.follow(sel), onRender: redraw });
      const vb: Viewer = new Viewer(b, answer.steered.doc, new ServerSource(base, answer.steered.rid, methods), { label, onSelect: (sel) => void va.follow(sel), onRender: redraw });
      diff = new DiffView(results, va, vb);
      redraw();
      window.attnscope?.viewers.push(va, vb);
    } else {
      window.attnscope?.viewers.push(new Viewer(results, answer.doc, new ServerSource(base, answer.rid, methods)));
      if (info.ground?.length && answer.doc.images?.length && answer.model && takes.get(answer.model)?.vlm) {
        results.append(groundingPanel(base, answer.rid, answer.doc.images[0], info.ground));
      }
    }
    if (answer.model && takes.get(answer.model)?.generate) results.append(knockoutPanel(base, answer.rid));
    results.dataset.shownMs = (performance.now() - t0).toFixed(1);
  };

  form.onsubmit = async (ev) => {
    ev.preventDefault();
    await adapting;
    if (!takes.has(model.value)) await (adapting = adapt());
    const fd = new FormData();
    fd.set("model", model.value);
    if (image.files?.length) fd.set("image", image.files[0]);
    else if (photo.value) fd.set("photo", photo.value);
    if (text.value.trim()) fd.set("text", text.value);
    const t = takes.get(model.value);
    if (t?.vlm && raw.checked) fd.set("raw", "1");
    if (t?.generate) {
      fd.set("max_new_tokens", newTokens.value || "0");
      if (chat.checked && !t.vlm) fd.set("chat", "1");
      if (steer.value) {
        fd.set("steer", steer.value);
        const params: Record<string, string> = {};
        steerParams.querySelectorAll("input").forEach((i) => { params[i.name.slice(6)] = i.value; });
        fd.set("steer_params", JSON.stringify(params));
      }
    }
    run.disabled = true;
    results.dataset.state = "running";
    const t0 = performance.now();
    const ran = model.value; // the select may change while it runs: the line names the model that ran
    const ticket = ++latest;
    say(`running ${ran}…`);
    try {
      const answer = await api<RunAnswer>(`${base}/run`, { method: "POST", body: fd });
      if (ticket !== latest) return; // a trace or run asked for since is what is shown
      say(`${ran}: ran in ${(answer.doc.seconds ?? 0).toFixed(2)} s, answered in ${((performance.now() - t0) / 1000).toFixed(2)} s`);
      show(answer);
      results.dataset.state = "done";
    } catch (err) {
      if (ticket !== latest) return;
      const busy = err instanceof ApiError && err.status === 503;
      fail(busy ? `busy: ${(err as Error).message}` : `error: ${(err as Error).message}`);
    } finally {
      run.disabled = false;
    }
  };

  // /?run=ID shows a run this server still keeps (a link to a result)
  const linked = new URLSearchParams(location.search).get("run");
  if (linked) {
    const ticket = ++latest;
    say(`loading run ${linked}…`);
    api<RunAnswer>(`${base}/runs/${encodeURIComponent(linked)}`)
      .then((answer) => { if (ticket === latest) { say(`run ${linked}`); show(answer); results.dataset.state = "done"; } })
      .catch((err) => { if (ticket === latest) fail(`error: ${(err as Error).message}`); });
  }

  traceFile.onchange = async () => {
    if (!traceFile.files?.length) return;
    const file = traceFile.files[0]; // another may be chosen before this one's answer comes
    const fd = new FormData();
    fd.set("trace", file);
    const ticket = ++latest;
    say("reading trace…");
    try {
      const answer = await api<RunAnswer>(`${base}/trace`, { method: "POST", body: fd });
      if (ticket !== latest) return;
      say(`trace ${file.name}`);
      show(answer);
      results.dataset.state = "done";
    } catch (err) {
      if (ticket === latest) fail(`error: ${(err as Error).message}`);
    }
  };
}
