"""A trace (file, streamed directory) or summaries file written before metadata checksums loads with an
UncheckedMetadataWarning, and the viewer says so on the page: the payload of the server's upload (`/api/trace`) and
of `serve --trace` carries the note (`notes`, `labels_checked`), and the self-contained page (`html_of`, the
server's export) shows its text as markup. A trace with a checksum (or one in memory) shows no note."""
from __future__ import annotations

import html as _html
import json
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import attnscope
from attnscope.capture import stream, summaries_file_v1
from attnscope.capture.checksums import METADATA_FIELD
from attnscope.capture.trace import Trace, UncheckedMetadataWarning
from attnscope.viz.data import UNCHECKED_LABELS
from attnscope.viz.html import html_of

NOTE = UNCHECKED_LABELS


def _unseal_file(path, out):
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["attnscope"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta[METADATA_FIELD]
    save_file(tensors, str(out), metadata={"attnscope": json.dumps(meta)})
    return out


@pytest.fixture(scope="module")
def written(minilm, tmp_path_factory):
    """A sealed trace file, summaries file and streamed directory of one minilm forward, and unsealed copies of each
    (what an attnscope before metadata checksums wrote)."""
    root = tmp_path_factory.mktemp("unchecked")
    x = minilm.encode("the cat sat on the mat")
    with torch.no_grad(), attnscope.capture(minilm, layers=[0, 1]) as trace:
        minilm(**x)
    with torch.no_grad(), attnscope.capture(minilm, layers=[0, 1], summaries="all", topk=3) as summaries:
        minilm(**x)
    with torch.no_grad(), attnscope.capture(minilm, layers=[0, 1], out=root / "dir"):
        minilm(**x)
    files = {"file": trace.save(root / "t.safetensors"), "summaries": summaries.save(root / "s.safetensors"),
             "dir": root / "dir"}
    old = {"file": _unseal_file(files["file"], root / "old.safetensors"),
           # summaries files written before metadata checksums were of format /1 (a /2 file is always sealed)
           "summaries": _unseal_file(summaries_file_v1.save(summaries, root / "s1.safetensors"),
                                     root / "old-s.safetensors")}
    shutil.copytree(files["dir"], root / "old-dir")
    meta = json.loads((root / "old-dir" / stream.META).read_text())
    del meta[METADATA_FIELD]
    (root / "old-dir" / stream.META).write_text(json.dumps(meta))
    old["dir"] = root / "old-dir"
    return {"memory": trace, "new": files, "old": old}


def _load(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = Trace.load(path)
    return trace, [w for w in caught if issubclass(w.category, UncheckedMetadataWarning)]


def test_a_trace_says_whether_its_labels_were_checked(written):
    assert NOTE == UNCHECKED_LABELS and written["memory"].labels_checked
    for kind in ("file", "summaries", "dir"):
        new, warned = _load(written["new"][kind])
        assert new.labels_checked and not warned, kind
        old, warned = _load(written["old"][kind])
        assert not old.labels_checked and len(warned) == 1, kind
        assert old.provenance == new.provenance and [sorted(r.records) for r in old.runs] == \
            [sorted(r.records) for r in new.runs]  # the same trace, only the flag differs


def test_the_self_contained_page_shows_the_note_for_an_old_trace_only(written):
    old, _ = _load(written["old"]["file"])
    page = html_of(old)
    marked = f'<p class="as-warn" role="note">{_html.escape(NOTE)}</p>'
    assert marked in page and page.index(marked) < page.index('id="attnscope-root"')  # above the viewer
    doc = json.loads(page.split('id="attnscope-data">', 1)[1].split("</script>", 1)[0])
    assert doc["notes"] == [NOTE] and doc["labels_checked"] is False
    new, _ = _load(written["new"]["file"])
    for checked in (new, written["memory"]):
        page = html_of(checked)
        assert 'class="as-warn"' not in page and NOTE not in page
    old_dir, _ = _load(written["old"]["dir"])
    assert f'<p class="as-warn" role="note">{_html.escape(NOTE)}</p>' in html_of(old_dir)


def test_the_upload_payload_carries_the_note_and_the_export_shows_it(written):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from attnscope.viz.server import create_app

    client = TestClient(create_app(), base_url="http://127.0.0.1", raise_server_exceptions=False)
    docs = {}
    for age in ("old", "new"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncheckedMetadataWarning)
            r = client.post("/api/trace", files={"trace": ("t.safetensors", written[age]["file"].read_bytes(),
                                                           "application/octet-stream")})
        assert r.status_code == 200, r.text
        docs[age] = r.json()
    assert docs["old"]["doc"]["notes"] == [NOTE] and docs["old"]["doc"]["labels_checked"] is False
    assert docs["new"]["doc"]["notes"] == [] and docs["new"]["doc"]["labels_checked"] is True
    again = client.get(f"/api/runs/{docs['old']['rid']}").json()  # the run asked for again (?run=...)
    assert again["doc"]["notes"] == [NOTE]
    exported = client.get(f"/api/runs/{docs['old']['rid']}/export").text
    assert f'<p class="as-warn" role="note">{_html.escape(NOTE)}</p>' in exported
    assert 'class="as-warn"' not in client.get(f"/api/runs/{docs['new']['rid']}/export").text


def test_serve_trace_payload_of_an_old_directory_carries_the_note(written):
    from attnscope.viz.server import create_app

    app = create_app()
    with pytest.warns(UncheckedMetadataWarning):
        old = app.state.viewer.open_trace(written["old"]["dir"])
    new = app.state.viewer.open_trace(written["new"]["dir"])
    entry = app.state.viewer.entry
    assert app.state.viewer.describe(old, entry(old).result, None)["doc"]["notes"] == [NOTE]
    assert app.state.viewer.describe(new, entry(new).result, None)["doc"]["notes"] == []


def test_the_served_app_renders_the_note():
    """The served page builds its results from the payload: its script puts each note above the viewer."""
    from attnscope.viz.html import asset

    script = asset("viewer.js")
    assert "as-warn" in script and "notes" in script
    assert ".as-warn" in asset("viewer.css")


def test_the_note_says_what_the_labels_are_and_its_advice_adds_a_checksum(written, tmp_path):
    """The note names the labels nothing checked and the call that adds a checksum; that call, run on the old file,
    gives a trace that loads checked, without a warning, and whose page has no note."""
    assert "token roles" in UNCHECKED_LABELS and "heads" in UNCHECKED_LABELS
    advice = "attnscope.Trace.load(path).save(new_path)"
    assert advice in UNCHECKED_LABELS
    path, new_path = written["old"]["file"], tmp_path / "resaved.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedMetadataWarning)
        eval(advice, {"attnscope": attnscope, "path": path, "new_path": new_path})  # noqa: S307 (the note's own words)
    again, warned = _load(new_path)
    assert again.labels_checked and not warned and 'class="as-warn"' not in html_of(again)
