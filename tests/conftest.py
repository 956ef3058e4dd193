import pytest
import torch

import attnscope


@pytest.fixture(scope="session")
def minilm():
    return attnscope.load("minilm")


@pytest.fixture(scope="session")
def dinov2():
    return attnscope.load("dinov2-small")


@pytest.fixture(scope="session")
def smollm():
    return attnscope.load("smollm2-135m")


def eager_attentions(model, inputs):
    """Reference probabilities from the eager path with output_attentions, backend restored after."""
    hf = model.hf
    before = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return hf(**inputs, output_attentions=True).attentions
    finally:
        hf.set_attn_implementation(before)
