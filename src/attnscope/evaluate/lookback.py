"""Lookback Lens: a hallucination detector from attention maps alone (Chuang et al., "Lookback Lens: Detecting
and Mitigating Contextual Hallucinations in Large Language Models Using Only Attention Maps", EMNLP 2024),
applied to a VLM's own captions with exact labels.

For every generated token t and every language-model head (l, h) the *lookback ratio* is

    LR[t, l, h] = A_ctx / (A_ctx + A_new)

with A_ctx the mean attention from token t's query to the context (the prompt: image tokens and text, or the
image tokens alone with `context="image"`) and A_new the mean attention to the tokens generated before t
(LR = 1 for the first generated token, which has none). A span's feature vector is the mean of LR over the
span's tokens: L*H numbers (30*9 = 270 for scene-vlm). A logistic regression on these vectors is the detector.

Here a span is the tokens of one object word in a generated caption and its label is exact: hallucinated
if the scene does not hold that class (`object_spans`). `evaluate_detector` trains on some captions and tests
on others (split by image), and reports the test AUROC of the detector, of the single best head (picked on the
training spans) and of two random baselines (random scores; the detector trained on shuffled labels).

The attention is reduced inside each attention call during `generate` (`attnscope.capture(model,
streams="language", queries="last", summaries=["role_mass"])`: mass and key count per token role, no rows kept),
so a steering method can be active at the same time. Each call is one capture block, whose end reads the weights
fingerprint; a loop over a dataset runs inside `with model.frozen_weights():`, so that read skips its sampled bytes
(bench/summaries.py, on the CPU: the harness's captures cost 1.04-1.06x the uncaptured generation with the full check
per item, 1.035-1.046x frozen; bench/results/summaries.md)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (the probability that a random positive outscores a random negative; ties 1/2)."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(values):  # average ranks over ties
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@dataclass
class TracedGeneration:
    """A generated answer with, per generated token t and head (layer, head): the mean attention to the prompt,
    to the image tokens, to earlier generated tokens, and the attention mass on the image tokens."""

    text: str
    token_ids: list[int]
    offsets: list[tuple[int, int]]  # char span of each generated token in `text`
    ctx_mean: np.ndarray  # [T, L, H]
    image_mean: np.ndarray  # [T, L, H]
    new_mean: np.ndarray  # [T, L, H] (0 for t = 0)
    image_mass: np.ndarray  # [T, L, H]
    image_share: np.ndarray = field(default=None, repr=False)  # [T, L, H, n_image]: attention over image tokens, normalised
    prompt_len: int = 0
    graph: np.ndarray = field(default=None, repr=False)  # [L, H, N, N]: LapEigvals' graph (lapeigvals.py)

    def lookback_ratio(self, context: str = "prompt") -> np.ndarray:
        """[T, L, H] lookback ratios with the prompt (or the image tokens only) as context."""
        if context not in ("prompt", "image"):
            raise ValueError(f"context is 'prompt' or 'image'; got {context!r}")
        ctx = self.ctx_mean if context == "prompt" else self.image_mean
        denom = ctx + self.new_mean
        return np.where(denom > 0, ctx / np.where(denom > 0, denom, 1), 1.0)

    def span_steps(self, start: int, end: int) -> list[int]:
        """Generated-token indices whose characters overlap [start, end)."""
        return [t for t, (a, b) in enumerate(self.offsets) if a < end and b > start and b > a]


@torch.no_grad()
def generate_traced(model, image, text: str, max_new_tokens: int = 64, steer=None, keep_image_share: bool = False,
                    keep_graph: bool | str = False) -> TracedGeneration:
    """Greedy generation with per-step language attention summarised per head (see `TracedGeneration`).

    The means and masses are reduced inside each attention call (`capture(..., summaries=["role_mass"])`: mass and
    key count per token role), so no attention row is kept. `keep_image_share=True` needs the distribution over the
    image tokens and `keep_graph` LapEigvals' graph, so both record rows instead: the last query's, or with
    `keep_graph="all"` (the attention among every position) every prefill row; `keep_graph=True` or "generated" is
    the attention among the generating positions."""
    import attnscope

    from .pope import Generator

    gen = Generator(model, max_new_tokens=max_new_tokens, steer=steer)
    inputs = model.encode(gen.prompt(text), image)
    prompt_len = inputs["input_ids"].shape[1]
    if keep_graph not in (False, True, "generated", "all"):
        raise ValueError(f"keep_graph is False, True (= 'generated') or 'all'; got {keep_graph!r}")
    rows = keep_image_share or bool(keep_graph)
    summaries = None if rows else ["role_mass"]
    queries = None if keep_graph == "all" else "last"  # the whole-sequence graph needs every prefill row
    with gen._steer_context(), attnscope.capture(model, streams="language", queries=queries,
                                                 summaries=summaries) as trace:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, prompt_len:].tolist()
    tok = model.tokenizer
    eos = set(np.atleast_1d(model.hf.generation_config.eos_token_id or []).tolist())
    while new and new[-1] in eos:
        new = new[:-1]
    tmap = trace.tokens("language")
    image_pos = torch.tensor(tmap.positions("image"))
    if not len(image_pos):
        raise ValueError("the captured prompt has no image tokens; Lookback Lens on a VLM needs them")
    if tmap.roles[:prompt_len].count("generated") or set(tmap.roles[prompt_len:]) - {"generated"}:
        raise ValueError("the language token map does not split into the prompt and generated tokens")
    run = trace.run()
    layers = sorted(layer for (s, layer) in run.records if s == "language")
    steps = len(new)
    if not rows:
        return _from_summaries(trace, layers, steps, new, tok, prompt_len)
    from ..capture.summaries import _one_per_step

    for layer in layers:  # a contrastive branch's forward of the same step would overwrite the main one's rows
        _one_per_step(run.records[("language", layer)], "language", layer)
    shape = (steps, len(layers), run.records[("language", layers[0])][0].probs.shape[1])
    ctx, img, newm, mass = (np.zeros(shape, np.float32) for _ in range(4))
    share = np.zeros(shape + (len(image_pos),), np.float32) if keep_image_share else None
    for li, layer in enumerate(layers):
        for rec in run.records[("language", layer)][:steps]:
            t = rec.step
            p = rec.probs[0, :, -1].float()  # [H, keys]: the last query row (the only one unless keep_graph="all")
            keys = p.shape[-1]
            ctx[t, li] = p[:, :prompt_len].mean(-1).numpy()
            img_p = p[:, image_pos]
            img[t, li] = img_p.mean(-1).numpy()
            mass[t, li] = img_p.sum(-1).numpy()
            if keys > prompt_len:
                newm[t, li] = p[:, prompt_len:].mean(-1).numpy()
            if share is not None:
                share[t, li] = (img_p / img_p.sum(-1, keepdim=True).clamp_min(1e-12)).numpy()
    text_out, offsets = decode_offsets(tok, new)
    graph = None
    if keep_graph:
        from .lapeigvals import graph_from_run

        graph = graph_from_run(run, prompt_len, steps, "all" if keep_graph == "all" else "generated")
    return TracedGeneration(text_out, new, offsets, ctx, img, newm, mass, share, prompt_len, graph)


def decode_offsets(tokenizer, token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text and the character span each token adds to it."""
    text, offsets = "", []
    for k in range(len(token_ids)):
        decoded = tokenizer.decode(token_ids[:k + 1], skip_special_tokens=True)
        offsets.append((len(text), len(decoded)))
        text = decoded
    return text, offsets


def _from_summaries(summaries, layers, steps: int, new: list[int], tok, prompt_len: int) -> TracedGeneration:
    """The per-step means from role masses and key counts: prompt = every non-generated key (the map was checked
    to hold the prompt first), new = the generated keys, image = the image keys."""
    from ..core.tokens import ROLES

    gen_i, img_i = ROLES.index("generated"), ROLES.index("image")
    per = {"ctx": [], "img": [], "new": [], "mass": []}
    for layer in layers:
        mass = summaries.role_mass("language", layer, step=None)[:steps, 0].float()  # [T, H, R]
        count = summaries.key_count("language", layer, step=None)[:steps, 0][:, None, :]  # [T, 1, R]
        ctx_mass = mass.sum(-1) - mass[..., gen_i]
        per["ctx"].append(ctx_mass / (count.sum(-1) - count[..., gen_i]).clamp_min(1))
        per["img"].append(mass[..., img_i] / count[..., img_i].clamp_min(1))
        per["new"].append(mass[..., gen_i] / count[..., gen_i].clamp_min(1))
        per["mass"].append(mass[..., img_i])
    ctx, img, newm, imass = (torch.stack(per[k], 1).numpy().astype(np.float32) for k in ("ctx", "img", "new", "mass"))
    text_out, offsets = decode_offsets(tok, new)
    return TracedGeneration(text_out, new, offsets, ctx, img, newm, imass, None, prompt_len)


def object_spans(traced: TracedGeneration, gold: Sequence[str], vocabulary=None) -> list[dict]:
    """One entry per object word in the generated text: class, hallucinated (not in `gold`), generated-token steps."""
    from .chair import ObjectVocabulary

    vocabulary = vocabulary or ObjectVocabulary.scenes()
    out = []
    for cls, start, end in vocabulary.mentions(traced.text):
        steps = traced.span_steps(start, end)
        if steps:
            out.append({"class": cls, "hallucinated": cls not in gold, "steps": steps, "chars": (start, end)})
    return out


def span_features(traced: TracedGeneration, spans: Sequence[dict], context: str = "prompt") -> np.ndarray:
    """[n_spans, L*H]: the lookback ratio averaged over each span's tokens."""
    lr = traced.lookback_ratio(context)
    if not spans:
        return np.zeros((0, lr.shape[1] * lr.shape[2]), np.float32)
    return np.stack([lr[s["steps"]].mean(0).reshape(-1) for s in spans])


class LookbackLens:
    """Logistic regression on standardised lookback-ratio features (scikit-learn)."""

    def __init__(self, C: float = 0.1, seed: int = 0):
        self.C, self.seed = C, seed
        self.model = None

    def fit(self, x: np.ndarray, y: Sequence[bool]) -> LookbackLens:
        try:
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler
        except ImportError as err:
            raise ImportError("LookbackLens needs scikit-learn: pip install scikit-learn") from err
        y = np.asarray(y, bool)
        if y.all() or not y.any():
            raise ValueError("training spans must include both hallucinated and grounded ones")
        self.model = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=2000, class_weight="balanced",
                                                                         random_state=self.seed))
        self.model.fit(x, y)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        """Probability of hallucination per span."""
        if self.model is None:
            raise RuntimeError("fit the detector first")
        return self.model.predict_proba(x)[:, 1]


def evaluate_detector(x_train: np.ndarray, y_train: Sequence[bool], x_test: np.ndarray, y_test: Sequence[bool],
                      groups_test: Sequence | None = None, C: float = 0.1, seed: int = 0, boot: int = 1000) -> dict:
    """Test AUROC (95% bootstrap interval over test groups, e.g. images) of: the Lookback Lens detector; the
    single head whose lookback ratio best separates the training spans (sign fitted on training data); random
    scores; and the detector refitted on shuffled training labels."""
    from .bootstrap import bootstrap

    y_train, y_test = np.asarray(y_train, bool), np.asarray(y_test, bool)
    rng = np.random.default_rng(seed)
    lens = LookbackLens(C, seed).fit(x_train, y_train)
    head_auc = np.array([auroc(x_train[:, j], y_train) for j in range(x_train.shape[1])])
    best = int(np.nanargmax(np.abs(head_auc - 0.5)))
    sign = 1.0 if head_auc[best] >= 0.5 else -1.0
    shuffled = LookbackLens(C, seed).fit(x_train, rng.permutation(y_train))
    scores = {"lookback_lens": lens.score(x_test), "best_single_head": sign * x_test[:, best],
              "random_scores": rng.random(len(y_test)), "shuffled_labels": shuffled.score(x_test)}
    items = list(range(len(y_test)))
    groups = list(groups_test) if groups_test is not None else None
    out = {"n_train": int(len(y_train)), "n_test": int(len(y_test)), "hallucinated_train": int(y_train.sum()),
           "hallucinated_test": int(y_test.sum()), "best_head": {"index": best, "train_auroc": float(head_auc[best]),
                                                                  "sign": sign}}
    for name, s in scores.items():
        out[name] = bootstrap(items, lambda idx, s=s: auroc(s[list(idx)], y_test[list(idx)]), groups=groups, n=boot,
                              seed=seed)["value"]
    return out
