"""`heads.table`: shapes, bounds and bookkeeping of every metric on SmolLM2 and DINOv2, and Shapley's efficiency:
the values of one permutation add up exactly to v(all players) - v(no players)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import Llava, get

import attnscope
from attnscope import heads
from attnscope.heads.importance import _gated
from attnscope.heads.target import make_target
from attnscope.steer import SteerError


@pytest.fixture(scope="module")
def text(smollm):
    return smollm.encode("The capital of France is Paris. The capital of Italy is")


def test_attention_metrics_on_smollm2(smollm, text, tmp_path):
    t = heads.table(smollm, text)
    assert len(t) == 270 and t.rows[0] == ("text", 0, 0)
    n = text["input_ids"].shape[1]
    ent = torch.tensor(t.column("entropy"))
    assert (ent >= 0).all() and (ent <= math.log(n) + 1e-4).all()
    mass = sum(torch.tensor(v) for k, v in t.columns.items() if k.startswith("mass_"))
    torch.testing.assert_close(mass, torch.ones(270), atol=1e-4, rtol=0)
    sink = torch.tensor(t.column("sink_mass"))
    assert sink[:18].max() < 0.5 < sink[90:].median()  # the first-token sink forms after the first layers
    assert t.grid("entropy").shape == (30, 9)
    t.save(tmp_path / "h.csv")
    t.save(tmp_path / "h.json")
    assert json.loads((tmp_path / "h.json").read_text())["rows"][5]["layer"] == 0
    assert (tmp_path / "h.csv").read_text().splitlines()[0].startswith("stream,layer,head,entropy")
    assert "<table" in t.to_html() and "entropy" in t.to_text(sort="entropy", k=3)


def test_attention_metrics_on_dinov2(dinov2):
    x = dinov2.encode(image="astronaut", size={"height": 112, "width": 112})
    t = heads.table(dinov2, x, metrics=["entropy", "role_mass"], queries="cls")
    assert len(t) == 72
    torch.testing.assert_close(torch.tensor(t.column("mass_cls")) + torch.tensor(t.column("image_ratio")),
                               torch.ones(72), atol=1e-4, rtol=0)
    assert t.top("image_ratio", 1)[0][0] == "vision"


def test_importance_columns_agree(smollm, text):
    t = heads.table(smollm, text, metrics=["ablation", "ablation_grad", "shapley", "vhd"], layers=[21], samples=4,
                    drop=[5, 6])
    abl, grad = torch.tensor(t.column("ablation")), torch.tensor(t.column("ablation_grad"))
    assert torch.corrcoef(torch.stack([abl, grad]))[0, 1] > 0.7  # the first-order proxy tracks the real ablation
    assert (torch.tensor(t.column("vhd")) > 0).all()
    assert set(t.columns) >= {"ablation", "ablation_grad", "shapley", "shapley_se", "vhd"}


def test_shapley_values_add_up_to_the_grand_coalition(smollm, text):
    phi, _ = heads.shapley(smollm, text, layers=[20], samples=2)
    target = make_target(smollm, text, None)
    players = [("text", 20, h) for h in range(9)]
    v_all, v_none = _gated(smollm, target, [{}, {p: 0.0 for p in players}])
    assert sum(phi.values()) == pytest.approx(float(v_all - v_none), abs=1e-3)


def test_vhd_on_a_vlm_and_errors():
    arch = get(Llava)
    t = heads.table(arch.m, arch.inputs, metrics=["vhd", "role_mass"], streams="language")
    assert len(t) == 8 and "image_ratio" in t.columns
    with pytest.raises(SteerError, match="unknown metrics"):
        heads.table(arch.m, arch.inputs, metrics=["entropyy"])
    with pytest.raises(SteerError, match="out of range"):
        heads.table(arch.m, arch.inputs, layers=[9])
    two = {k: torch.cat([v, v]) for k, v in arch.inputs.items()}
    with pytest.raises(SteerError, match="batch 1"):
        heads.table(arch.m, two, metrics=["ablation"])
    with pytest.raises(SteerError, match="no language stream"):
        heads.vhd(attnscope.wrap(arch.hf.model.vision_tower), {"pixel_values": arch.inputs["pixel_values"]})


def test_streams_as_a_list_equal_the_single_stream(smollm, text):
    a = heads.table(smollm, text, metrics=["entropy"], streams=["text"], layers=[0, 1])
    b = heads.table(smollm, text, metrics=["entropy"], streams="text", layers=[0, 1])
    assert a.rows == b.rows and len(a) == 18 and a.column("entropy") == b.column("entropy")
