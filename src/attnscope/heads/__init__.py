"""`attnscope.heads`: per-head metrics and importance scores, as one table over (stream, layer, head).

    t = attnscope.heads.table(model, inputs, metrics=["entropy", "role_mass", "sink_mass", "ablation", "shapley"])
    t.top("ablation", 10)          # [(stream, layer, head), ...]
    t.grid("entropy", "text")      # tensor [layers, heads]

Metrics: entropy, role_mass (attention mass to each token role; image_ratio), sink_mass (massive-activation sinks),
vhd (vision-aware head divergence), ablation (Sixteen Heads: the target's drop when one head is masked),
ablation_grad (its first-order estimate, one backward pass), shapley (sampled Shapley value with its standard
error). Ablation and Shapley use steer's head edits. `qk_vectors` / `joint_embedding`: one head's queries and keys
in one 2-D map (AttentionViz; `viz.qk_figure` draws it)."""
from __future__ import annotations

from .importance import ablation, ablation_grad, shapley
from .qk_embedding import QKVectors, joint_embedding, qk_vectors
from .table import METRICS, HeadTable, table
from .target import Target, make_target
from .vhd import vhd

__all__ = ["table", "HeadTable", "METRICS", "ablation", "ablation_grad", "shapley", "Target", "make_target", "vhd",
           "qk_vectors", "joint_embedding", "QKVectors"]
