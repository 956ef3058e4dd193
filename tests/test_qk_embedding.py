"""AttentionViz's query/key joint embedding (heads/qk_embedding.py, viz/qk_figure.py) on SmolLM2: the vectors read
at the attention function reproduce the model's eager attention for that head (grouped-query heads included),
AttentionViz's translation and scaling leave every attention row unchanged, bad selections are refused, the model
is restored even when the forward raises, and the figure is written."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attnscope.core import dispatch
from attnscope.heads.qk_embedding import joint_embedding, qk_vectors
from attnscope.viz.qk_figure import qk_embedding_figure
from conftest import eager_attentions

TEXTS = ["The cat sat on the mat because it was tired.", "Paris is the capital of France."]


def _rows(q: np.ndarray, k: np.ndarray, scaling: float) -> np.ndarray:
    scores = scaling * torch.from_numpy(q).double() @ torch.from_numpy(k).double().T
    n = scores.shape[0]
    return scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -float("inf")).softmax(-1).numpy()


@pytest.mark.parametrize("layer,head", [(3, 4), (-1, 8)])  # 9 query heads share 3 key/value heads
def test_vectors_reproduce_eager_attention_before_and_after_normalizing(smollm, layer, head):
    inputs = [smollm.encode(t) for t in TEXTS]
    qk = qk_vectors(smollm, inputs, layer, head)
    assert qk.queries.shape == qk.keys.shape == (len(qk.tokens), 64) and qk.layer == layer % 30
    qn, kn = qk.normalized()
    np.testing.assert_allclose(kn.mean(0), qn.mean(0), atol=1e-9)
    scale = np.linalg.norm(qn, axis=1).mean() / np.linalg.norm(qk.queries, axis=1).mean()  # s; keys got 1/s
    np.testing.assert_allclose(scale ** 2 * np.linalg.norm(qk.queries, axis=1).mean(),
                               np.linalg.norm(qk.keys, axis=1).mean(), rtol=1e-6)  # equal mean norms before translating
    sample = np.array(qk.sample)
    for i, x in enumerate(inputs):
        ref = eager_attentions(smollm, x)[layer][0, head].double().numpy()
        m = sample == i
        np.testing.assert_allclose(_rows(qk.queries[m], qk.keys[m], qk.scaling), ref, atol=1e-5)
        np.testing.assert_allclose(_rows(qn[m], kn[m], qk.scaling), ref, atol=1e-5)
    q2, k2 = joint_embedding(qk)
    assert q2.shape == k2.shape == (len(qk.tokens), 2) and np.isfinite(q2).all()


def test_bad_selections_are_refused_and_the_model_is_restored(smollm):
    x = smollm.encode(TEXTS[0])
    before = smollm.hf.config._attn_implementation
    with pytest.raises(IndexError, match="30 layers"):
        qk_vectors(smollm, x, 30, 0)
    with pytest.raises(IndexError, match="9 heads"):
        qk_vectors(smollm, x, 0, 9)
    with pytest.raises(ValueError, match="unknown stream"):
        qk_vectors(smollm, x, 0, 0, stream="vision")
    batch = smollm.encode(TEXTS)  # two rows in one forward: refused from inside the forward
    with pytest.raises(ValueError, match="one sequence per forward"):
        qk_vectors(smollm, batch, 0, 0)
    assert smollm.hf.config._attn_implementation == before and dispatch.registered_names() == []
    with torch.no_grad():
        out = smollm.hf(**x).logits
    assert torch.isfinite(out).all()


def test_figure_is_written(smollm, tmp_path):
    qk = qk_vectors(smollm, [smollm.encode(t) for t in TEXTS], 5, 3)
    for color, method in (("kind", "pca"), ("position", "tsne"), ("role", "pca")):
        path = qk_embedding_figure(qk, tmp_path / f"{color}.png", method=method, color=color)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="'kind', 'role' or 'position'"):
        qk_embedding_figure(qk, tmp_path / "x.png", color="layer")
    with pytest.raises(ValueError, match="'pca' or 'tsne'"):
        joint_embedding(qk, method="umap")


def test_padded_input_is_refused(smollm):
    """A row sliced from a padded batch carries masked positions: their queries and keys take part in no attention
    row, so placing them in the joint map (as tokens like any other) would show points the head never used."""
    batch = smollm.encode(["The cat sat on the mat because it was tired.", "Hi"])
    row = {k: v[1:2] for k, v in batch.items()}
    assert (row["attention_mask"] == 0).any()
    with pytest.raises(ValueError, match="padding"):
        qk_vectors(smollm, [smollm.encode(TEXTS[0]), row], 0, 0)
