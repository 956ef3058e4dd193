"""Properties of each method that could fail: raw/rollout equal what capture records, flow equals an independent
max-flow solver, gradattn is causal on a causal LM, LRP conserves relevance on a real model, IG is complete,
the baselines are what they say, and the sink-aware maps move off the sink patches."""
import copy

import networkx as nx
import numpy as np
import pytest
import torch

import attnscope
from attnscope.explain import explain, targets
from attnscope.explain.flow import FlowTooLargeError
from attnscope.explain.rollout import mixed
from attnscope.explain.sinks import detect_sinks


def captured(model, x):
    with torch.no_grad(), attnscope.capture(model) as trace:
        model(**x)
    stream = next(iter(model.streams))
    return [trace.attention(stream, layer)[0] for layer in trace.layers(stream)]


def test_raw_and_rollout_equal_capture(minilm):
    x = minilm.encode("The cat sat on the mat because it was warm.")
    probs = captured(minilm, x)
    raw = explain(minilm, x, method="raw", layer=-2, head_fusion="max", target=targets.ClassLogit(head=lambda h: h[:, 0], queries=(0,)))
    torch.testing.assert_close(raw.scores, probs[-2].max(0).values[0], atol=1e-5, rtol=0)
    rolled = torch.eye(probs[0].shape[-1])
    for a in probs:
        rolled = mixed(a.mean(0), 0.5) @ rolled
    e = explain(minilm, x, method="rollout", target=targets.ClassLogit(head=lambda h: h[:, 0], queries=(0,)))
    torch.testing.assert_close(e.scores, rolled[0], atol=1e-5, rtol=0)
    assert abs(float(e.scores.sum()) - 1) < 1e-4  # rollout rows stay distributions
    ident = explain(minilm, x, method="rollout", residual=1.0, target=targets.ClassLogit(head=lambda h: h[:, 0], queries=(0,)))
    assert torch.equal(ident.scores, torch.eye(len(ident.tokens))[0])  # no attention mixing: the query alone


def test_flow_matches_networkx_and_refuses_large_graphs(minilm, dinov2):
    x = minilm.encode("Flow through pipes.")
    e = explain(minilm, x, method="flow")
    probs = captured(minilm, x)
    mats = [mixed(a.mean(0), 0.5).double().numpy() for a in probs]
    n, levels = mats[0].shape[0], len(mats)
    graph = nx.DiGraph()
    for level, a in enumerate(mats):
        for i in range(n):
            for j in range(n):
                if a[i, j] > 0:
                    graph.add_edge((level + 1, i), (level, j), capacity=float(a[i, j]))
    query = e.extras["queries"]
    for q in query:
        graph.add_edge("s", (levels, q), capacity=1.0 / len(query))
    for j in (0, 2, n - 1):
        assert e.scores[j] == pytest.approx(nx.maximum_flow_value(graph, "s", (0, j)), abs=1e-4)
    assert (e.scores <= 1 + 1e-6).all() and (e.scores >= 0).all()
    big = dinov2.encode(image="camera", size={"height": 308, "width": 308})  # 485 tokens
    with pytest.raises(FlowTooLargeError, match="485 tokens x 12 layers.*max_tokens=300.*rollout"):
        explain(dinov2, big, method="flow")


def test_gradattn_and_rollout_are_causal_on_a_causal_lm(smollm):
    x = smollm.encode("One two three four five six")
    target = targets.NextToken(position=3)
    for method in ("gradattn", "rollout", "lrp"):
        e = explain(smollm, x, method=method, target=target)
        assert e.target["position"] == 3
        assert torch.all(e.scores[4:] == 0), method  # tokens after the query cannot matter
        assert e.scores[:4].abs().sum() > 0
    g = explain(smollm, x, method="gradattn")
    assert (g.scores >= 0).all() and g.scores[-1] >= 1  # R = I + nonnegative terms
    assert g.extras["readout_weights"] == {len(g.tokens) - 1: 1.0}


def test_lrp_conserves_relevance_on_real_models(smollm, dinov2):
    """SmolLM2 has no biases and RoPE only touches q/k: with the rules, the logit is linear in the token
    embeddings and the token relevances sum to it exactly."""
    x = smollm.encode("The capital of France is")
    token = int(smollm(**x).logits[0, -1].argmax())
    e = explain(smollm, x, method="lrp", target=lambda out, inputs: out.logits[:, -1, token])
    assert float(e.scores.sum()) == pytest.approx(e.target_value, rel=1e-3, abs=1e-3)
    assert abs(e.extras["bias_relevance"]) < 1e-3 * max(1.0, abs(e.target_value))
    # DINOv2 with every bias zeroed: total relevance equals a linear target of the CLS embedding
    hf = copy.deepcopy(dinov2.hf)
    with torch.no_grad():
        for module in hf.modules():
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    model = attnscope.wrap(hf, image_processor=dinov2.image_processor, name="dinov2-no-bias")
    direction = torch.randn(384, generator=torch.Generator().manual_seed(0))
    y = explain(model, image="astronaut", method="lrp", target=lambda out, inputs: out.last_hidden_state[:, 0] @ direction)
    assert float(y.scores.sum()) == pytest.approx(y.target_value, rel=1e-3)
    # with biases the remainder is reported, and the normal model is not trivially conserved
    real = explain(dinov2, image="astronaut", method="lrp")
    assert real.extras["total_relevance"] + real.extras["bias_relevance"] == pytest.approx(real.target_value, rel=1e-5)


def test_integrated_gradients_completeness_and_gradinput(minilm):
    x = minilm.encode("Completeness is an axiom.")
    ig = explain(minilm, x, method="ig", steps=48)
    with torch.no_grad():
        embeds = torch.zeros_like(minilm.hf.get_input_embeddings()(x["input_ids"]))
        rest = {k: v for k, v in x.items() if k != "input_ids"}
        empty = float(ig._target(minilm.hf(inputs_embeds=embeds, **rest), x)[0])
    assert float(ig.scores.sum()) == pytest.approx(ig.target_value - empty, abs=0.02 * abs(ig.target_value - empty) + 1e-3)
    gi = explain(minilm, x, method="gradinput")
    emb = minilm.hf.get_input_embeddings()(x["input_ids"]).detach().requires_grad_()
    value = gi._target(minilm.hf(inputs_embeds=emb, **rest), x)
    (grad,) = torch.autograd.grad(value.sum(), emb)
    torch.testing.assert_close(gi.scores, (emb * grad).sum(-1)[0].detach(), atol=1e-5, rtol=1e-4)


def test_pixel_baselines_and_gradcam_on_vit(dinov2):
    x = dinov2.encode(image="coffee")
    gi = explain(dinov2, x, method="gradinput")
    assert gi.pixel_scores.shape == (224, 224)
    assert float(gi.scores.sum()) == pytest.approx(float(gi.pixel_scores.sum()), rel=1e-4)
    cam = explain(dinov2, x, method="gradcam")
    assert (cam.scores >= 0).all() and cam.scores[1:].max() > 0
    r1, r2 = explain(dinov2, x, method="random"), explain(dinov2, x, method="random", seed=1)
    assert torch.equal(r1.scores, explain(dinov2, x, method="random").scores) and not torch.equal(r1.scores, r2.scores)


def test_sinks_detected_and_discounted_on_dinov2(dinov2):
    """DINOv2-S on chelsea: one patch takes >20x the uniform attention share in layer 0; plain rollout's top patch is
    that sink; the sink-aware rollout moves its maximum elsewhere and the sink's score collapses."""
    x = dinov2.encode(image="chelsea")
    report = detect_sinks(dinov2, x)
    patches = [p for p in report.positions if report.tokens.roles[p] == "image"]
    assert patches, report.to_dict()
    assert all(report.mass_ratio[p] >= 20 for p in patches)
    plain = explain(dinov2, x, method="rollout")
    aware = explain(dinov2, x, method="rollout", sinks="discount")
    assert plain.tokens.sinks == report.positions
    top_plain = plain.top(1, roles=("image",))[0][0]
    top_aware = aware.top(1, roles=("image",))[0][0]
    assert top_plain in patches and top_aware not in patches
    for p in patches:
        assert aware.scores[p] < 0.2 * plain.scores[p]
    g = explain(dinov2, x, method="gradattn", sinks="discount")
    assert g.params["sinks"] == "discount"


def test_first_token_of_smollm_is_a_massive_activation_sink(smollm):
    report = detect_sinks(smollm, smollm.encode("The Eiffel Tower is in the city of"))
    assert 0 in report.positions
    assert report.massive_ratio[0] >= 100 and any("massive" in r for r in report.reasons[0])
    typical = float(np.median(report.massive_ratio[1:]))
    assert report.massive_ratio[0] > 20 * typical
