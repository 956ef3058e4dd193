"""Rollout's two `discard_ratio` conventions on DINOv2-S (chelsea): "matrix" reproduces vit-explain's rollout (with its
row normalisation as intended) from the model's own eager attentions, "row" is attnscope's per-row rule with the
diagonal kept, and the two give different maps at the same ratio."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import eager_attentions

from attnscope.explain import MethodError, explain, targets
from attnscope.explain.rollout import discard_lowest

CLS = targets.ClassLogit(head=lambda h: h[:, 0], queries=(0,))


def vit_explain_rollout(attentions, discard_ratio: float, head_fusion: str) -> torch.Tensor:
    """vit-explain's `rollout` (jacobgil/vit-explain), written out: fuse heads, zero the lowest `discard_ratio` of the
    whole flattened matrix except index 0, add I, halve, normalise rows, multiply; the CLS query's row."""
    result = torch.eye(attentions[0].shape[-1], dtype=torch.float64)
    for attention in attentions:
        fused = getattr(attention[0].double(), head_fusion)(0)
        fused = fused.values if head_fusion != "mean" else fused
        flat = fused.reshape(-1).clone()
        _, indices = flat.topk(int(flat.numel() * discard_ratio), largest=False)
        indices = indices[indices != 0]
        flat[indices] = 0
        a = (flat.view_as(fused) + torch.eye(fused.shape[-1], dtype=torch.float64)) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result[0]


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("fusion", ["min", "max"])
def test_matrix_convention_reproduces_vit_explain(dinov2, fusion):
    x = dinov2.encode(image="chelsea")
    reference = vit_explain_rollout(eager_attentions(dinov2, x), 0.9, fusion)
    e = explain(dinov2, x, method="rollout", head_fusion=fusion, discard_ratio=0.9, discard_over="matrix", target=CLS)
    assert e.params["discard_over"] == "matrix"
    torch.testing.assert_close(e.scores.double(), reference, atol=1e-5, rtol=1e-4)


def test_row_and_matrix_conventions_give_different_maps(dinov2):
    x = dinov2.encode(image="chelsea")
    row = explain(dinov2, x, method="rollout", head_fusion="min", discard_ratio=0.9, target=CLS)
    matrix = explain(dinov2, x, method="rollout", head_fusion="min", discard_ratio=0.9, discard_over="matrix", target=CLS)
    assert row.params["discard_over"] == "row"
    rho = spearman(row.scores[1:].numpy(), matrix.scores[1:].numpy())
    assert rho < 0.95  # the same ratio, a different map
    # with nothing discarded the conventions agree exactly
    a = explain(dinov2, x, method="rollout", discard_ratio=0.0, target=CLS)
    b = explain(dinov2, x, method="rollout", discard_ratio=0.0, discard_over="matrix", target=CLS)
    assert torch.equal(a.scores, b.scores)


def test_discard_rules_on_a_small_matrix():
    a = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.05, 0.9, 0.05]])
    row = discard_lowest(a, 0.34, "row")  # one entry per row, the diagonal kept
    assert torch.equal(row, torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.0], [0.0, 0.9, 0.05]]))
    matrix = discard_lowest(a, 0.34, "matrix")  # int(9 * 0.34) = 3 lowest of all entries, [0, 0] spared
    assert torch.equal(matrix, torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.0, 0.9, 0.0]]))
    spared = discard_lowest(a, 0.45, "matrix")  # the 4 lowest include [0, 0] = 0.1, which vit-explain keeps
    assert spared[0, 0] == 0.1 and int((spared == 0).sum()) == 3
    with pytest.raises(MethodError, match="discard_over"):
        discard_lowest(a, 0.5, "column")
