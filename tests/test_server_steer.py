"""Generation with steering: the unsteered and the steered answers come back together, each with its own rows,
and the browser shows them side by side with linked selection. The steering method here is a stand-in (a logit
bias) registered the way the viewer discovers `attnscope.steer` methods; no steering package is needed."""
import contextlib
import os

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from attnscope.viz import integrations  # noqa: E402
from attnscope.viz.server import create_app  # noqa: E402
from attnscope.viz.testing import chromium_path, running_server  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, smollm):
    """A 2-layer Llama with random weights and SmolLM2's tokenizer: generates in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gen-models")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=smollm.tokenizer.bos_token_id, eos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(root / "tiny-llama")
    smollm.tokenizer.save_pretrained(root / "tiny-llama")
    return root


class Boost:
    """Stand-in steering method: adds `alpha` to one token's logit (so greedy decoding changes)."""

    def __init__(self, alpha: float = 50.0, token: int = 42):
        self.alpha, self.token = alpha, token


def fake_steer_methods():
    def apply(model, alpha=50.0, token=42):
        @contextlib.contextmanager
        def ctx():
            head = model.hf.get_output_embeddings()

            def hook(module, args, out):
                out = out.clone()
                out[..., token] += alpha
                return out

            handle = head.register_forward_hook(hook)
            try:
                yield
            finally:
                handle.remove()

        return ctx()

    params = {"alpha": {"default": "50.0", "required": False}, "token": {"default": "42", "required": False}}
    return {"Boost": {"doc": "adds alpha to one token's logit", "help": "adds alpha to one token's logit",
                      "syntax": "numbers", "params": params, "apply": apply}}


@pytest.fixture
def app(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(integrations, "steer_methods", fake_steer_methods)
    return create_app(model_dirs=[tiny_llama_dir])


def test_steered_and_unsteered_side_by_side(app, tiny_llama_dir):
    c = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    assert "Boost" in c.get("/api/info").json()["steer"]
    mid = f"local:{tiny_llama_dir.name}/tiny-llama"
    form = {"model": mid, "text": "The capital of France is", "max_new_tokens": "5", "steer": "Boost",
            "steer_params": '{"alpha": "80"}'}
    r = c.post("/api/run", data=form)
    assert r.status_code == 200, r.text
    body = r.json()
    base, steered = body["doc"], body["steered"]["doc"]
    assert base["generation"]["new_tokens"] == steered["generation"]["new_tokens"] == 5
    assert steered["steer"] == {"method": "Boost", "params": {"alpha": "80"}}
    assert base["generation"]["answer"] != steered["generation"]["answer"]
    s = base["streams"][0]
    gen = [i for i, role in enumerate(s["roles"]) if base["roles"][role] == "generated"]
    assert gen and set(gen) <= set(s["queries"]) and len(s["tail"]) == 1  # every fed token has its row
    # bad steering requests: clear 400s, and the model stays usable
    assert c.post("/api/run", data=form | {"steer": "Nope"}).status_code == 400
    assert c.post("/api/run", data=form | {"steer_params": '{"beta": 1}'}).status_code == 400
    assert c.post("/api/run", data=form | {"steer_params": "[1"}).status_code == 400
    assert c.post("/api/run", data={"model": mid, "text": "ok", "max_new_tokens": "2"}).status_code == 200


@pytest.mark.skipif(chromium_path() is None and not os.environ.get("CI"), reason="no Chromium")
def test_compare_view_in_the_browser(app, tiny_llama_dir):
    from playwright.sync_api import expect

    from attnscope.viz.testing import browser

    with running_server(app) as url, browser() as b:
        page = b.new_page(viewport={"width": 1500, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.select_option("select[name=model]", f"local:{tiny_llama_dir.name}/tiny-llama")
        page.wait_for_selector(".as-gen:not(.as-hidden)")
        page.fill("textarea[name=text]", "The capital of France is")
        page.fill("input[name=max_new_tokens]", "5")
        page.select_option("select[name=steer]", "Boost")
        page.click("button.as-run")
        expect(page.locator(".as-viewer[data-ready='1']")).to_have_count(2, timeout=60_000)
        left, right = page.locator(".as-side").nth(0), page.locator(".as-side").nth(1)
        assert "Boost" in right.inner_text() and "unsteered" in left.inner_text()
        tok = left.locator(".as-tok[data-i='4']")
        tok.click()
        expect(right.locator(".as-viewer")).to_have_attribute("data-q", "4")  # the other side follows
        left.locator(".as-cell[data-l='1'][data-h='3']").click()
        expect(right.locator(".as-viewer")).to_have_attribute("data-head", "3")
        # steered minus unsteered: the difference of the two maps, for the same row, layer and head
        diff = page.locator(".as-diff")
        expect(diff).to_have_attribute("data-ready", "1")
        expect(diff.locator(".as-caption")).to_contain_text("head 3")
        assert float(diff.get_attribute("data-l1")) >= 0
        # the form for Boost came from its parameters, with help
        assert page.locator("input[name='steer.alpha']").count() == 1 and page.locator(".as-steerhelp summary").count() == 1
        assert not errors, errors
