"""Self-contained HTML: everything inline, no URL to any network, data readable back, safe against markup in tokens."""
import torch

import attnscope
from attnscope.core.tokens import TokenMap
from attnscope.viz import html
from attnscope.viz.testing import assert_self_contained, synthetic_trace


def test_trace_html_is_one_self_contained_file(dinov2, tmp_path):
    x = dinov2.encode(image="chelsea")
    with torch.no_grad(), attnscope.capture(dinov2, layers=[0, 11]) as trace:
        dinov2(**x)
    page = html.trace_html(trace, pixel_values=x["pixel_values"], image_processor=dinov2.image_processor)
    doc = assert_self_contained(page)
    (s,) = doc["streams"]
    assert s["layers"] == [0, 11] and s["length"] == 257 and len(s["heads"]) == 6
    assert doc["images"][0].startswith("data:image/")
    assert doc["provenance"]["model"] == "dinov2-small"
    assert len(page) < 2_500_000
    path = html.write_html(trace, tmp_path / "t.html")
    assert path.read_text(encoding="utf-8").startswith("<!doctype html>")


def test_markup_in_tokens_cannot_escape_the_data_script():
    trace = synthetic_trace(layers=1, heads=2, length=12, queries=list(range(12)))
    tmap = trace.run().tokens["text"][0]
    tmap.tokens[3] = "</script><script>alert(1)</script>"
    tmap.tokens[4] = "<!--"
    page = html.trace_html(trace)
    doc = assert_self_contained(page)
    assert doc["streams"][0]["tokens"][3] == "</script><script>alert(1)</script>"
    assert page.count("<script") == 2


class StandIn:
    """What the viewer reads from an Explanation (attnscope.explain's has these attributes)."""

    method, params, stream, target = "rollout", {"residual": 0.5}, "text", None

    def __init__(self, n):
        self.scores = torch.linspace(0, 1, n)
        self.tokens = TokenMap(["special"] + ["text"] * (n - 1), [f"t{i}" for i in range(n)])

    def faithfulness(self):
        return {"deletion": 0.25, "insertion": 0.75}


def test_explanation_and_head_table_pages():
    doc = assert_self_contained(html.explanation_html(StandIn(9)))
    (e,) = doc["explanations"]
    assert e["method"] == "rollout" and e["faithfulness"] == {"deletion": 0.25, "insertion": 0.75} and e["length"] == 9
    table = {"entropy": torch.rand(6, 12), "sink mass": [[0.1] * 12] * 6}
    doc = assert_self_contained(html.head_table_html(table, title="heads"))
    assert set(doc["tables"][0]["metrics"]) == {"entropy", "sink mass"}
    assert len(doc["tables"][0]["metrics"]["entropy"]) == 6


def test_notebook_html_is_a_sandboxed_iframe():
    out = html.notebook_html(synthetic_trace(layers=1, heads=1, length=8, queries=list(range(8))))
    assert out.startswith("<iframe sandbox=\"allow-scripts") and "srcdoc=" in out and "<script" not in out


def test_head_table_with_rows_and_columns_like_attnscope_heads():
    class Table:  # the shape of attnscope.heads.HeadTable: (stream, layer, head) rows, one list per metric
        rows = [("text", layer, head) for layer in range(3) for head in range(4)]
        columns = {"entropy": [0.1 * i for i in range(12)], "ablation": [None] * 11 + [2.0]}

    doc = assert_self_contained(html.head_table_html(Table()))
    grids = doc["tables"][0]["metrics"]
    assert grids["entropy"][2][3] == 1.1 or abs(grids["entropy"][2][3] - 1.1) < 1e-9
    assert grids["ablation"][0][0] is None and grids["ablation"][2][3] == 2.0  # missing values stay missing
