"""`attnscope.check` / `attnscope check MODEL`: passes on the real zoo models, and reports FAIL (never crashes) when the
recomputation, the positions or the restore are deliberately broken; attnscope's own refusals become REFUSED rows;
the command's exit codes (0 pass, 1 FAIL, 2 bad input)."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import attnscope
from attnscope.check import FAIL, PASS, REFUSED
from attnscope.cli import main
from attnscope.core import dispatch, ledger
from attnscope.models import zoo
from attnscope.models.wrapped import Model


def _tiny(cls=LlamaForCausalLM, config=LlamaConfig, **kw):
    torch.manual_seed(0)
    cfg = config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=128, max_position_embeddings=64, bos_token_id=1, eos_token_id=None, pad_token_id=0, **kw)
    return attnscope.wrap(cls(cfg).eval(), name=cls.__name__)


def _rows(result, prefix: str) -> list:
    return [r for r in result.rows if r.check.startswith(prefix)]


def _assert_all_pass(result, model):
    assert result.ok and result.passed, str(result)
    for stream in model.streams:  # one compared row per stream, every layer of it compared
        row = next(r for r in result.rows if r.check == f"forward: {stream} rows = eager")
        assert row.status == PASS and row.max_diff is not None and row.max_diff <= result.atol
        assert row.detail.startswith(f"{model.streams[stream]} layers")
    assert result.rows[-1].check == "model restored exactly" and result.rows[-1].status == PASS
    assert dispatch.registered_names() == []


# --- the real models ---------------------------------------------------------------------------------------------
def test_smollm2_passes_forward_decode_identity_and_restore(smollm):
    result = attnscope.check(smollm)
    _assert_all_pass(result, smollm)
    decode = next(r for r in result.rows if r.check == "decode (3 steps): text rows = eager")
    assert decode.status == PASS and "30 layers, steps 0..3" in decode.detail
    assert {r.check for r in result.rows} >= {"decode (3 steps): token map lengths = keys",
                                             "steer PAI(alpha=0, keys=[0]) = identity",
                                             "steer HeadScale(1.0), every head = identity"}


@pytest.mark.parametrize("name", ["minilm", "dinov2"])
def test_encoder_and_vision_zoo_models_pass(name, request):
    model = request.getfixturevalue(name)
    result = attnscope.check(model)
    _assert_all_pass(result, model)
    assert not _rows(result, "decode")  # not generative: no decode rows
    table = result.to_markdown()
    assert table.count("\n| ") == len(result.rows) + 1 and "| pass |" in table and "FAIL" not in table


# --- it notices what is wrong ------------------------------------------------------------------------------------
def test_perturbed_recomputation_is_a_fail_with_its_size(minilm, monkeypatch):
    original = dispatch.attention_probs

    def off_by(*args, **kwargs):
        return original(*args, **kwargs) + 3e-3

    monkeypatch.setattr(dispatch, "attention_probs", off_by)
    result = attnscope.check(minilm)
    row = next(r for r in result.rows if r.check == "forward: text rows = eager")
    assert row.status == FAIL and 2.9e-3 < row.max_diff < 3.1e-3
    assert not result.ok and result.status == FAIL
    assert result.rows[-1].status == PASS  # the model still came back exactly


def test_decode_rows_at_the_wrong_position_fail_while_the_forward_passes(monkeypatch):
    model = _tiny(MistralForCausalLM, MistralConfig, sliding_window=4)
    placed = ledger.Ledger.placed

    def one_early(self, q_len, kv_len, where=""):
        q_start, base = placed(self, q_len, kv_len, where)
        return (q_start - 1, base - 1) if q_len == 1 else (q_start, base)

    monkeypatch.setattr(ledger.Ledger, "placed", one_early)
    result = attnscope.check(model)
    assert next(r for r in result.rows if r.check == "forward: text rows = eager").status == PASS
    decode = next(r for r in result.rows if r.check == "decode (3 steps): text rows = eager")
    assert decode.status == FAIL and not result.ok
    assert "query rows" in decode.detail or decode.max_diff > result.atol


def test_a_model_left_routed_through_attnscope_fails_the_restore_row(minilm, monkeypatch):
    detach = dispatch.Attachment.detach
    monkeypatch.setattr(dispatch.Attachment, "detach", lambda self: None)
    try:
        result = attnscope.check(minilm)
    finally:
        monkeypatch.setattr(dispatch.Attachment, "detach", detach)
        for attachment in list(dispatch._sessions):  # what the broken detach left behind
            attachment.detach()
    row = result.rows[-1]
    assert row.check == "model restored exactly" and row.status == FAIL
    assert "attention implementation not restored" in row.detail and "attnscope_" in row.detail
    assert dispatch.registered_names() == []


def test_attnscope_refusals_are_refused_rows_and_crashes_are_fail_rows(monkeypatch):
    model = _tiny()
    token_maps = Model.token_maps

    def short(self, inputs):  # a map one entry shorter than the keys: capture refuses it by name
        return {s: [attnscope.TokenMap(t.roles[1:], t.tokens[1:]) for t in maps]
                for s, maps in token_maps(self, inputs).items()}

    monkeypatch.setattr(Model, "token_maps", short)
    result = attnscope.check(model)
    refused = next(r for r in result.rows if r.check == "forward: capture every stream and layer")
    assert refused.status == REFUSED and "TokenMapError" in refused.detail and "shifted map" in refused.detail
    assert result.ok and result.status == REFUSED  # refused by name: nothing silently wrong
    monkeypatch.setattr(Model, "token_maps", token_maps)

    def broken(*args, **kwargs):
        raise IndexError("not attnscope's refusal")

    monkeypatch.setattr(dispatch, "attention_probs", broken)
    crashed = attnscope.check(model)
    row = next(r for r in crashed.rows if r.check == "forward: capture every stream and layer")
    assert row.status == FAIL and row.detail.startswith("crashed: IndexError")
    assert crashed.rows[-1].status == PASS and dispatch.registered_names() == []


# --- probes --------------------------------------------------------------------------------------------------------
def test_probes_are_built_from_the_config_without_a_tokenizer():
    from transformers import ViTConfig, ViTModel

    from attnscope.check import probe

    text = _tiny()
    inputs, about = probe.build(text)
    assert "random token ids" in about and inputs["input_ids"].max() < 128 and inputs["input_ids"].min() >= 3
    torch.manual_seed(0)
    vit = attnscope.wrap(ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=24, patch_size=8)).eval())
    inputs, about = probe.build(vit)
    assert inputs["pixel_values"].shape == (1, 3, 24, 24)
    result = attnscope.check(vit.hf)  # a bare transformers model is wrapped
    assert result.passed, str(result)


def test_a_vlm_without_a_processor_needs_inputs():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from tiny_families import _llava

    torch.manual_seed(0)
    vlm = attnscope.wrap(_llava().eval())
    with pytest.raises(ValueError, match="pass inputs="):
        attnscope.check(vlm)


# --- the command line ----------------------------------------------------------------------------------------------
@pytest.fixture
def use(monkeypatch):
    def put(name, model):
        monkeypatch.setitem(zoo.LOADERS, name, lambda: model)
    return put


def test_cli_exit_codes(minilm, use, monkeypatch, capsys, tmp_path):
    use("minilm", minilm)
    out = tmp_path / "check.md"
    assert main(["check", "minilm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "forward: text rows = eager" in printed and "pass: 6 pass, 0 FAIL, 0 REFUSED" in printed
    assert out.read_text().startswith("attnscope check minilm")
    original = dispatch.attention_probs
    monkeypatch.setattr(dispatch, "attention_probs", lambda *a, **k: original(*a, **k) * 0.5)
    assert main(["check", "minilm", "--markdown"]) == 1
    assert "| FAIL |" in capsys.readouterr().out
    monkeypatch.setattr(dispatch, "attention_probs", original)
    assert main(["check", "no-such-model"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown model 'no-such-model'")
    assert main(["check", "minilm", "--steps", "-1"]) == 2
    assert "error: --steps" in capsys.readouterr().err


def test_cli_checks_a_model_split_with_disk_offload(monkeypatch, capsys, tmp_path):
    """`attnscope check` takes the placement options `capture`, `generate`, `explain` and `eval` take, so the model
    whose numbers are to be trusted (split over devices, the CPU and disk) is the one checked."""
    loaded = []
    original = zoo.load
    monkeypatch.setattr(zoo, "load", lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1])
    assert main(["check", "smollm2-135m", "--steps", "1", "--device-map", "auto", "--max-memory", "cpu=200MB",
                 "--offload-folder", str(tmp_path / "offload")]) == 0
    assert "disk" in loaded[0].hf.hf_device_map.values()
    assert "pass: " in capsys.readouterr().out
