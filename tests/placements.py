"""Placements the split-model tests run on: CPU + disk everywhere; two GPUs, the CPU and disk where a machine has
two or more CUDA devices (skipped otherwise)."""
from __future__ import annotations

import pytest
import torch

GPUS = torch.cuda.device_count()
PLACEMENTS = [pytest.param("cpu-disk", id="cpu-disk"),
              pytest.param("gpus", id="two-gpus", marks=pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA devices"))]


def lm_map(where: str, n: int, prefix: str) -> dict:
    """Decoder layers of a language model: on CPU + disk alternately, or over two GPUs, the CPU and disk."""
    out = {}
    for i in range(n):
        if where == "cpu-disk":
            out[f"{prefix}.layers.{i}"] = "disk" if i % 3 == 1 else "cpu"
        else:
            out[f"{prefix}.layers.{i}"] = 0 if i < n // 3 else 1 if i < 2 * n // 3 else "cpu" if i % 2 else "disk"
    return out


def vlm_map(where: str) -> dict:
    main = "cpu" if where == "cpu-disk" else 0
    lm = "model.language_model"
    out = {"model.vision_tower.embeddings": main, "model.vision_tower.layernorm": "disk",
           "model.multi_modal_projector": "disk", f"{lm}.embed_tokens": main, f"{lm}.rotary_emb": main,
           f"{lm}.norm": "disk" if where == "cpu-disk" else 1, "lm_head": main}
    for i in range(12):
        out[f"model.vision_tower.encoder.layer.{i}"] = "disk" if i % 4 == 1 else main if i < 6 else ("cpu" if where == "cpu-disk" else 1)
    return out | lm_map(where, 30, lm)




def same(a, b) -> None:
    """Bit for bit on the CPU (the same kernels run); to 1e-5 on GPUs, whose kernels may differ by device."""
    a, b = torch.as_tensor(a).detach().cpu(), torch.as_tensor(b).detach().cpu()
    if GPUS < 2:
        assert torch.equal(a, b), float((a - b).abs().nan_to_num().max())
    else:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
