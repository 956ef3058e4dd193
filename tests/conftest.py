import os

import pytest
import torch

import attnscope
from attnscope.data import fashion_mnist


def _train_images_missing() -> str | None:
    try:
        fashion_mnist.locate("train", "images")
    except FileNotFoundError as err:
        if os.environ.get("CI"):  # CI installs the full set (scripts/system_deps.sh): never skip silently there
            raise RuntimeError(f"tests that render training scenes cannot run in CI: {err}") from err
        return str(err)
    return None


_missing_train = _train_images_missing()
needs_train_images = pytest.mark.skipif(_missing_train is not None, reason=str(_missing_train))


@pytest.fixture(scope="session")
def minilm():
    return attnscope.load("minilm")


@pytest.fixture(scope="session")
def dinov2():
    return attnscope.load("dinov2-small")


@pytest.fixture(scope="session")
def smollm():
    return attnscope.load("smollm2-135m")


@pytest.fixture(scope="session")
def scene_vlm():
    """The trained scene-vlm, shared by the tests that leave it as they found it (skipped without its weights)."""
    try:
        return attnscope.load("scene-vlm")
    except FileNotFoundError as err:
        pytest.skip(str(err))


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
