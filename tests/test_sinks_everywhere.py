"""One sink definition on every surface: `explain`'s report, the head table's `sink_mass` and the viewer's sink
chips name the same positions for the same input; entropy is in nats in the head table and in the viewer."""
import numpy as np

from attnscope.explain import detect_sinks, sinks as sinklib
from attnscope.heads import table
from attnscope.viz import data, runner


def test_dinov2_sinks_agree_across_explain_heads_and_viewer(dinov2):
    x = dinov2.encode(image="chelsea")
    found = detect_sinks(dinov2, x).positions
    assert found, "DINOv2 on chelsea has attention sinks (its artifact patches)"
    result = runner.run(dinov2, image="chelsea")
    (view,) = result.views
    assert view.sinks == found and view.sink_rule == sinklib.DEFINITION
    doc = result.document(embed_rows=False)
    assert doc["sink_definition"] == sinklib.DEFINITION and doc["streams"][0]["sinks"] == found
    t = table(dinov2, x, metrics=["entropy", "sink_mass"])
    sink_mass = np.asarray(t.column("sink_mass"))
    assert (sink_mass > 0).all(), "every head gives the sinks some attention"  # was 0 for all 72 heads
    # the viewer's sink mass is the same quantity over the same positions (mean of heads per layer)
    np.testing.assert_allclose(sink_mass.reshape(12, 6), view.metrics["sink mass"], atol=2e-2)
    # entropy: nats in both
    np.testing.assert_allclose(np.asarray(t.column("entropy")).reshape(12, 6), view.metrics[data.ENTROPY], atol=2e-2)
    assert float(view.metrics[data.ENTROPY].max()) > 1.0  # nats, not a 0-1 fraction


def test_smollm_first_token_is_the_sink_everywhere(smollm):
    x = smollm.encode("The capital of France is Paris, and the capital of Italy is")
    found = detect_sinks(smollm, x).positions
    assert 0 in found
    (view,) = runner.run(smollm, text="The capital of France is Paris, and the capital of Italy is").views
    assert view.sinks == found
    t = table(smollm, x, metrics=["sink_mass"])
    assert float(np.median(t.column("sink_mass"))) > 0.3  # most heads park most of their attention on it
