"""A saved explanation (.json or .safetensors) carries the checksum of its metadata (method, parameters, target,
token maps, sizes; in .json the scores too) and a .safetensors file one per tensor: a label or score edited after
writing is refused on load, an untouched file loads bit for bit without a warning, and a file written before the
checksums (simulated by removing them) still loads, with a warning."""
import json
import math
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import attnscope
from attnscope.capture.checksums import METADATA_FIELD
from attnscope.capture.trace import UncheckedMetadataWarning
from attnscope.explain import Explanation, ExplanationFileError

EDITED = "explanation metadata does not match its checksum: it was edited or damaged after it was written"


@pytest.fixture(scope="module")
def explanations(dinov2, minilm):
    """A pixel-level image explanation (pixel_scores kept) and a text one whose tokens are not ASCII, with a NaN
    and an infinity among its extras and a non-ASCII parameter."""
    image = attnscope.explain(dinov2, image="chelsea", method="gradinput")
    text = attnscope.explain(minilm, text="naïve café 中文 Ωmega", method="rollout")
    text.extras.update({"nan": float("nan"), "inf": float("inf"), "note": "😀 猫"})
    assert image.pixel_scores is not None and any(ord(c) > 127 for t in text.tokens.tokens for c in t)
    return {"image": image, "text": text}


def _same(a: Explanation, b: Explanation):
    assert (a.method, a.params, a.stream, a.target, a.target_value, a.model, a.pixel_size, a.patch) == \
           (b.method, b.params, b.stream, b.target, b.target_value, b.model, b.pixel_size, b.patch)
    assert a.tokens.to_dict() == b.tokens.to_dict() and torch.equal(a.scores, b.scores)
    assert (a.pixel_scores is None) == (b.pixel_scores is None)
    assert a.pixel_scores is None or torch.equal(a.pixel_scores, b.pixel_scores)
    assert json.dumps(a.extras, sort_keys=True) == json.dumps(b.extras, sort_keys=True)  # NaN == NaN as text


def _edit(path, out, edit):
    """A copy of the explanation file at `path` with its metadata (and tensors) changed by `edit(meta, tensors)`."""
    if path.suffix == ".json":
        meta = json.loads(path.read_text())
        edit(meta, None)
        out.write_text(json.dumps(meta))
        return out
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["attnscope"]), {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    save_file(tensors, str(out), metadata={"attnscope": json.dumps(meta)})
    return out


def _relabel_role(meta, _):
    roles = meta["tokens"]["roles"]
    roles[1] = "special" if roles[1] != "special" else "text"


def _rename_token(meta, _):
    meta["tokens"]["tokens"][1] = "dog"


def _change_method(meta, _):
    meta["method"] = "gradattn"


def _change_param(meta, _):
    meta["params"]["shifted"] = 1


def _change_target(meta, _):
    meta["target"] = {"name": "another target"}


def _change_patch(meta, _):
    meta["patch"] = [7, 7] if meta["patch"] != [7, 7] else [14, 14]


def _change_score(meta, tensors):
    if tensors is None:
        meta["scores"][1] += 1.0
    else:
        tensors["scores"][1] += 1.0


EDITS = [_relabel_role, _rename_token, _change_method, _change_param, _change_target, _change_patch]


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_untouched_files_load_bit_for_bit_without_a_warning(explanations, tmp_path, suffix):
    for name, e in explanations.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            back = Explanation.load(e.save(tmp_path / f"{name}{suffix}"))
        _same(e, back)
    assert math.isnan(back.extras["nan"]) and back.extras["note"] == "😀 猫"


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
@pytest.mark.parametrize("edit", EDITS)
def test_edited_labels_are_refused(explanations, tmp_path, edit, suffix):
    path = explanations["image"].save(tmp_path / f"e{suffix}")
    bad = _edit(path, tmp_path / f"bad{suffix}", edit)
    with pytest.raises(ExplanationFileError, match=EDITED) as err:
        Explanation.load(bad)
    assert str(bad) in str(err.value)


def test_an_edited_score_is_refused(explanations, tmp_path):
    e = explanations["text"]
    bad = _edit(e.save(tmp_path / "e.json"), tmp_path / "bad.json", _change_score)
    with pytest.raises(ExplanationFileError, match=EDITED):
        Explanation.load(bad)
    bad = _edit(e.save(tmp_path / "e.safetensors"), tmp_path / "bad.safetensors", _change_score)
    with pytest.raises(ExplanationFileError, match="tensor 'scores' does not match its checksum"):
        Explanation.load(bad)


def test_a_tensor_added_or_taken_out_is_refused(explanations, tmp_path):
    path = explanations["image"].save(tmp_path / "e.safetensors")
    for edit in (lambda m, t: t.pop("pixel_scores"), lambda m, t: t.update(extra=torch.zeros(2))):
        with pytest.raises(ExplanationFileError, match="its metadata lists"):
            Explanation.load(_edit(path, tmp_path / "bad.safetensors", edit))


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_files_without_the_checksums_still_load_with_a_warning(explanations, tmp_path, suffix):
    e = explanations["image"]

    def old(meta, _):
        del meta[METADATA_FIELD]
        meta.pop("tensors", None)

    path = _edit(e.save(tmp_path / f"e{suffix}"), tmp_path / f"old{suffix}", old)
    with pytest.warns(UncheckedMetadataWarning, match="explanation metadata had no checksum") as caught:
        back = Explanation.load(path)
    assert [w.filename for w in caught] == [__file__]
    _same(e, back)


def test_a_checksum_field_set_to_null_is_refused(explanations, tmp_path):
    path = explanations["text"].save(tmp_path / "e.json")
    bad = _edit(path, tmp_path / "bad.json", lambda m, _: m.update({METADATA_FIELD: None}))
    with pytest.raises(ExplanationFileError, match="malformed metadata_checksum"):
        Explanation.load(bad)


def test_a_pixel_level_map_survives_a_json_file(explanations, tmp_path):
    """gradinput keeps a map per pixel; a .json file that dropped it would load as the patch-grid map instead."""
    e = explanations["image"]
    back = Explanation.load(e.save(tmp_path / "e.json"))
    assert back.pixel_scores is not None and torch.equal(back.pixel_scores, e.pixel_scores)
    assert (back.image_map() == e.image_map()).all()
