"""Summaries files of format /2 (packed: one tensor per stream, layer and summary over every step and run): every
selection form reads back bit for bit, the same as the /1 file the kept writer makes of it; the tensor count does not
grow with steps or runs; a reader of one layer reads and checksums that layer's packs only; a flipped byte in any
pack, a cut file, an edited or unsealed metadata each raise `TraceFileError`."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

import attnscope
from attnscope.capture import summaries_file, summaries_file_v1
from attnscope.capture.checksums import METADATA_FIELD, sealed, tensor_checksum
from attnscope.capture.summaries import TENSORS, Summaries
from attnscope.capture.trace import TraceFileError

PROMPT = "The capital of France is"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: Summaries, b: Summaries) -> None:
    """Every field of every run and record equal, every tensor of the same dtype, shape and bytes."""
    assert a.provenance == b.provenance and len(a.runs) == len(b.runs) > 0
    for ra, rb in zip(a.runs, b.runs):
        assert (ra.steps, ra.prefix, ra.lengths) == (rb.steps, rb.prefix, rb.lengths)
        assert {s: [t.to_dict() for t in m] for s, m in ra.tokens.items()} == \
               {s: [t.to_dict() for t in m] for s, m in rb.tokens.items()}
        assert [(last, {s: [t.to_dict() for t in m] for s, m in maps.items()}) for last, maps in ra.eras] == \
               [(last, {s: [t.to_dict() for t in m] for s, m in maps.items()}) for last, maps in rb.eras]
        assert list(ra.records) == list(rb.records)  # the same layers, in the same order
        for key in ra.records:
            assert len(ra.records[key]) == len(rb.records[key])
            for x, y in zip(ra.records[key], rb.records[key]):
                assert x.meta() == y.meta()
                tx, ty = x.tensors(), y.tensors()
                assert list(tx) == list(ty), key
                for name in tx:
                    assert (tx[name].dtype, tx[name].shape) == (ty[name].dtype, ty[name].shape), (key, name)
                    assert torch.equal(_bits(tx[name]), _bits(ty[name])), (key, name)


def _capture(model, x, generate: dict | None = None, runs: int = 1, **kw) -> Summaries:
    with torch.no_grad(), attnscope.capture(model, **kw) as s:
        for _ in range(runs):
            if generate is None:
                model(**x)
            else:
                model.generate(**x, do_sample=False, **generate)
    return s


FORMS = {  # selection form: (prompt(s), generate keywords, capture keywords, runs)
    "every row": (PROMPT, {"max_new_tokens": 3}, {"summaries": "all"}, 1),
    "last row": (PROMPT, {"max_new_tokens": 3}, {"queries": "last", "summaries": "all"}, 1),
    "chunks of rows": (PROMPT, {"max_new_tokens": 2}, {"summaries": "all", "chunk": 2, "heads": [0, 4]}, 1),
    "beams": (PROMPT, {"max_new_tokens": 3, "num_beams": 3}, {"queries": "last", "summaries": "all"}, 1),
    "padded batch": (["Hi", PROMPT], {"max_new_tokens": 3}, {"queries": [1, "last"], "summaries": "all"}, 1),
    "two runs": (PROMPT, {"max_new_tokens": 2}, {"queries": "last", "summaries": "all"}, 2),
    "k grows with the keys": ("Hi", {"max_new_tokens": 4}, {"summaries": "all", "topk": 5}, 1),
    "some summaries": (PROMPT, {"max_new_tokens": 2}, {"queries": "last", "summaries": ["lookback", "entropy"]}, 1),
    "one forward": (PROMPT, None, {"queries": [0, 2, 3], "summaries": "all", "topk": 2}, 1),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_selection_form_reads_back_bit_for_bit(smollm, tmp_path, form):
    prompt, generate, kw, runs = FORMS[form]
    s = _capture(smollm, smollm.encode(prompt), generate, runs, layers=[0, 13, -1], **kw)
    path = s.save(tmp_path / "s.safetensors")
    old = summaries_file_v1.save(s, tmp_path / "s1.safetensors")
    loaded, loaded_v1 = attnscope.Trace.load(path), Summaries.load(old)
    assert isinstance(loaded, Summaries) and loaded.labels_checked
    assert_same(s, loaded)
    assert_same(loaded_v1, loaded)  # the /1 reader, unchanged, reads the same trace
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["attnscope"])["format"] == summaries_file.FORMAT
        assert len(list(f.keys())) <= 3 * len(TENSORS)  # per layer and summary, whatever the steps and runs
    if form == "beams":
        assert loaded.run().eras
    if form == "k grows with the keys":
        n = smollm.encode(prompt)["input_ids"].shape[1]
        ks = [rec.topk_index.shape[-1] for rec in loaded.run().records[("text", 0)]]
        assert ks == [min(5, n + step) for step in range(4)] and ks[0] < 5
    if form == "last row":  # the readers work on loaded records as on captured ones
        assert torch.equal(loaded.lookback("text", 29, step=None), s.lookback("text", 29, step=None))
    resaved = Summaries.load(loaded.save(tmp_path / "again.safetensors"))
    assert_same(s, resaved)


def test_records_and_runs_holding_different_summaries_read_back_bit_for_bit(smollm, tmp_path):
    """A layer's records need not hold the same summaries (runs joined from two captures, a summary dropped from one
    record): each record's `has` says which, and its slices follow."""
    x = smollm.encode(PROMPT)
    s = _capture(smollm, x, {"max_new_tokens": 2}, layers=[0, 5], queries="last", summaries="all")
    other = _capture(smollm, x, {"max_new_tokens": 3}, layers=[5], queries="last", summaries=["lookback"])
    s.runs.append(other.runs[0])
    s.runs[0].records[("text", 0)][1].entropy = None
    loaded = Summaries.load(s.save(tmp_path / "mixed.safetensors"))
    assert_same(s, loaded)
    assert loaded.run(0).records[("text", 0)][1].entropy is None
    assert loaded.run(1).records[("text", 5)][0].topk_index is None


def test_both_streams_of_scene_vlm_read_back_bit_for_bit(scene_vlm, tmp_path):
    x = scene_vlm.encode(scene_vlm.prompt("Is there a cat?"), "chelsea")
    s = _capture(scene_vlm, x, {"max_new_tokens": 2}, streams=["vision", "language"],
                 layers={"vision": [0, 11], "language": [0, 29]}, queries="last", summaries="all")
    loaded = attnscope.Trace.load(s.save(tmp_path / "vlm.safetensors"))
    assert sorted(loaded.run().records) == [("language", 0), ("language", 29), ("vision", 0), ("vision", 11)]
    assert_same(s, loaded)
    assert torch.equal(loaded.image_ratio("language", 29, step=None), s.image_ratio("language", 29, step=None))


@pytest.fixture(scope="module")
def packed(smollm, tmp_path_factory):
    """Two runs of a prefill and 3 decode steps at layers 0 and 29, saved as /2."""
    with torch.no_grad(), attnscope.capture(smollm, layers=[0, 29], heads=[1, 5], queries="last", summaries="all",
                                            topk=3) as s:
        for _ in range(2):
            smollm.generate(**smollm.encode(PROMPT), max_new_tokens=4, do_sample=False)
    return s, s.save(tmp_path_factory.mktemp("packed") / "s.safetensors")


def _parts(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["attnscope"]), {k: f.get_tensor(k) for k in f.keys()}


def _write(path, meta, tensors, seal=True):
    path.write_bytes(safetensors_bytes(tensors, metadata={"attnscope": json.dumps(sealed(meta) if seal else meta)}))
    return path


def _layer(trace: Summaries, stream: str, layer: int):
    return trace.run().records[(stream, layer)][0].source[0]


def test_a_reader_of_one_layer_reads_and_checks_that_layer_only(packed, monkeypatch):
    s, path = packed
    summed = []
    real = summaries_file.tensor_checksum
    monkeypatch.setattr(summaries_file, "tensor_checksum", lambda t, *a: summed.append(t.numel()) or real(t, *a))
    loaded = Summaries.load(path)
    assert summed == [] and not _layer(loaded, "text", 0)._read  # nothing read at load
    assert torch.equal(loaded.lookback("text", 29, step=None), s.lookback("text", 29, step=None))
    assert len(summed) == 1 and list(_layer(loaded, "text", 29)._read) == ["lookback"]
    assert not _layer(loaded, "text", 0)._read
    loaded.entropy("text", 29, step=2, run=0)
    assert len(summed) == 2  # each pack checked once, however many records read it
    loaded.verify()
    assert len(summed) == 12


def test_the_repr_and_size_of_a_loaded_file_read_no_pack(packed):
    """`repr` (a notebook shows it after `s = Trace.load(path)`) and `nbytes` count the bytes without reading (and
    checksumming) every pack."""
    s, path = packed
    loaded = Summaries.load(path)
    assert repr(loaded) == repr(s) and loaded.nbytes == s.nbytes
    assert not any(_layer(loaded, "text", layer)._read for layer in (0, 29))
    loaded.verify()
    assert repr(loaded) == repr(s)


def test_a_flipped_byte_in_any_pack_is_a_trace_file_error(packed, tmp_path):
    s, path = packed
    raw = path.read_bytes()
    located = summaries_file._locate(path)
    assert len(located) == 12
    for key, (start, end) in located.items():
        bad = bytearray(raw)
        bad[(start + end) // 2] ^= 0x01
        out = tmp_path / "bad.safetensors"
        out.write_bytes(bytes(bad))
        loaded = Summaries.load(out)  # lazily: the pack is checked when first read
        stream, layer, name = key.split("/")
        other = 0 if layer == "29" else 29
        assert torch.equal(loaded.key_count("text", other, step=None), s.key_count("text", other, step=None))
        with pytest.raises(TraceFileError, match=f"pack {key} does not match its checksum"):
            getattr(loaded.record(stream, int(layer), step=1), name)
        with pytest.raises(TraceFileError, match="does not match its checksum"):
            Summaries.load(out).verify()


def test_a_cut_file_is_a_trace_file_error_at_load_or_at_first_read(packed, tmp_path):
    _, path = packed
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(TraceFileError, match="not a readable attnscope trace"):
        attnscope.Trace.load(cut)
    later = tmp_path / "later.safetensors"
    later.write_bytes(path.read_bytes())
    loaded = attnscope.Trace.load(later)
    later.write_bytes(path.read_bytes()[:-50])  # cut after it was loaded
    with pytest.raises(TraceFileError, match="shorter than when it was loaded"):
        loaded.verify()


def test_edited_or_unsealed_metadata_is_a_trace_file_error(packed, tmp_path):
    _, path = packed
    meta, tensors = _parts(path)
    meta["runs"][0]["layers"][0]["records"][1]["step"] = 7  # a label, the seal left as written
    with pytest.raises(TraceFileError, match="metadata does not match its checksum"):
        attnscope.Trace.load(_write(tmp_path / "edited.safetensors", meta, tensors, seal=False))
    meta, _ = _parts(path)
    del meta[METADATA_FIELD]
    with pytest.raises(TraceFileError, match="without its metadata_checksum"):
        attnscope.Trace.load(_write(tmp_path / "unsealed.safetensors", meta, tensors, seal=False))
    meta, _ = _parts(path)
    meta["format"] = "attnscope.summaries/3"
    with pytest.raises(TraceFileError, match="unsupported summaries format 'attnscope.summaries/3'"):
        Summaries.load(_write(tmp_path / "later.safetensors", meta, tensors))


def _resealed(path, tmp_path, edit_meta=None, edit_tensors=None):
    """The file with its metadata and tensors edited, each pack's checksum and size made to agree, sealed again:
    what only the structural checks can catch."""
    meta, tensors = _parts(path)
    if edit_tensors:
        edit_tensors(tensors)
    for key, t in tensors.items():
        if key in meta["packs"]:
            meta["packs"][key].update(numel=t.numel(), dtype=str(t.dtype).removeprefix("torch."),
                                      checksum=tensor_checksum(t))
    if edit_meta:
        edit_meta(meta)
    return _write(tmp_path / "resealed.safetensors", meta, tensors)


def _drop_last_record(meta):
    meta["runs"][1]["layers"][1]["records"].pop()


def _drop_entropy_of_a_record(meta):
    rm = meta["runs"][0]["layers"][0]["records"][0]
    rm["has"] = [n for n in TENSORS if n != "entropy"]


def _relabel_layer(meta):
    meta["runs"][0]["layers"][0]["layer"] = 3


def _duplicate_layer(meta):
    meta["runs"][0]["layers"][1] = meta["runs"][0]["layers"][0]


def _unlisted_pack(meta):
    del meta["packs"]["text/0/entropy"]


def _short_pack(tensors):
    tensors["text/29/role_mass"] = tensors["text/29/role_mass"][:-1].clone()


def _nan(tensors):
    tensors["text/0/entropy"] = torch.full_like(tensors["text/0/entropy"], float("nan"))


def _float64_values(tensors):
    tensors["text/0/topk_value"] = tensors["text/0/topk_value"].double()


def _two_records_swapped(meta):  # same dims: every pack's size still fits, each record would read the other's values
    records = meta["runs"][0]["layers"][0]["records"]
    records[1], records[2] = records[2], records[1]


def _batch_moved(meta):  # one record's batch row given to the next: the sums fit, the slices would not
    records = meta["runs"][0]["layers"][0]["records"]
    records[1]["batch"], records[2]["batch"] = 2, 0


def _k_moved(meta):
    records = meta["runs"][1]["layers"][1]["records"]
    records[0]["k"], records[1]["k"] = records[0]["k"] + 1, records[1]["k"] - 1


def _steps_swapped(meta):  # dims alike: each record reads its own values, labelled with the other's step
    records = meta["runs"][1]["layers"][1]["records"]
    records[1]["step"], records[2]["step"] = records[2]["step"], records[1]["step"]


def _step_beyond_the_run(meta):
    meta["runs"][0]["layers"][0]["records"][-1]["step"] = 9


def _query_row_beyond_the_tokens(meta):
    meta["runs"][1]["layers"][0]["records"][1]["queries"] = [99]


def _start_taken_out(meta):
    del meta["runs"][1]["layers"][0]["records"][2]["at"]


def _query_row_moved(meta):
    records = meta["runs"][0]["layers"][1]["records"]
    records[1]["queries"], records[2]["queries"] = records[1]["queries"] * 2, []


STRUCTURE = {  # edit: (metadata edit, tensors edit, what the error says)
    "a record taken out": (_drop_last_record, None, "its records"),
    "a summary taken out of a record": (_drop_entropy_of_a_record, None, "its records"),
    "a layer relabelled": (_relabel_layer, None, "not a record|has no key counts|belong to no record"),
    "a layer twice in a run": (_duplicate_layer, None, "not a new"),
    "a pack not listed": (_unlisted_pack, None, "not its metadata's packs"),
    "a pack cut short": (None, _short_pack, "its records"),
    "NaN values": (None, _nan, "NaN"),
    "top-k values of another dtype": (None, _float64_values, "not a summary this attnscope writes"),
    "two records swapped": (_two_records_swapped, None, "starts at"),
    "a batch row moved to the next record": (_batch_moved, None, "starts at"),
    "a top-k key moved to the next record": (_k_moved, None, "starts at"),
    "a query row moved to the next record": (_query_row_moved, None, "starts at"),
    "a record's start taken out": (_start_taken_out, None, "does not say where its slices start"),
    "two records' steps swapped": (_steps_swapped, None, "not in the order a capture makes them"),
    "a step beyond the run's": (_step_beyond_the_run, None, r"not within the run's steps 0\.\.3"),
    "a query row beyond the tokens": (_query_row_beyond_the_tokens, None, r"query rows \[99\] outside the stream's"),
}


@pytest.mark.parametrize("edit", list(STRUCTURE))
def test_a_resealed_file_whose_packs_do_not_fit_its_records_is_refused(packed, tmp_path, edit):
    edit_meta, edit_tensors, says = STRUCTURE[edit]
    bad = _resealed(packed[1], tmp_path, edit_meta, edit_tensors)
    with pytest.raises(TraceFileError, match=says):
        Summaries.load(bad).verify()


def test_summaries_the_packed_format_cannot_hold_are_refused_at_save(packed, tmp_path):
    s, _ = packed
    rec = s.run().records[("text", 0)][1]
    kept = rec.entropy
    try:
        rec.entropy = kept[:, :1]  # not [batch, heads, rows]: a file that could not be read back
        with pytest.raises(ValueError, match="entropy is"):
            s.save(tmp_path / "x.safetensors")
        rec.entropy = kept.double()
        with pytest.raises(ValueError, match="several dtypes"):
            s.save(tmp_path / "x.safetensors")
    finally:
        rec.entropy = kept


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_summaries_the_loaders_would_refuse_are_refused_at_save(packed, tmp_path, bad):
    """Both loaders refuse NaN or infinite summaries (as damage): `save` must not write a file it cannot read back."""
    s, _ = packed
    rec = s.run().records[("text", 29)][2]
    kept = rec.role_mass
    try:
        rec.role_mass = kept.clone()
        rec.role_mass[0, 1, 0, 2] = bad
        with pytest.raises(ValueError, match=r"\('text', layer 29\) step 2 of run 1: role_mass holds NaN or infinite"):
            s.save(tmp_path / "x.safetensors")
        assert not (tmp_path / "x.safetensors").exists()
    finally:
        rec.role_mass = kept


def test_a_file_loaded_by_a_relative_path_reads_after_a_change_of_directory(packed, tmp_path, monkeypatch):
    s, path = packed
    (tmp_path / "s.safetensors").write_bytes(path.read_bytes())
    monkeypatch.chdir(tmp_path)
    loaded = Summaries.load("s.safetensors")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # as a notebook's cell may
    assert_same(s, loaded.verify())


def test_records_out_of_step_order_are_refused_at_save(packed, tmp_path):
    """The loader refuses a layer's records out of (step, part) order, or beyond the run's steps: `save` does not
    write such a file."""
    s, _ = packed
    records = s.run(0).records[("text", 0)]
    records[1].step, records[2].step = 2, 1
    try:
        with pytest.raises(ValueError, match=r"\('text', layer 0\) of run 0: .* not in the order a capture makes"):
            s.save(tmp_path / "x.safetensors")
        assert not (tmp_path / "x.safetensors").exists()
    finally:
        records[1].step, records[2].step = 1, 2
