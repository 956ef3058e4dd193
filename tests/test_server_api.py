"""The viewer server's API: runs, lazy rows, export, and every kind of bad input answered with a clear 4xx."""
import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from attnscope.models.images import load_image  # noqa: E402
from attnscope.viz.server import Limits, check_safetensors, create_app, read_image  # noqa: E402
from attnscope.viz.testing import assert_self_contained  # noqa: E402


LIMITS = Limits(max_upload=400_000, max_trace=2_000_000, max_pixels=4_000_000)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (a decompression-bomb header), with a valid CRC."""
    raw = bytearray(png_bytes(Image.new("RGB", (1, 1))))
    ihdr = 8 + 4  # signature, then length; the chunk type starts here
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])) & 0xFFFFFFFF)
    return bytes(raw)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, minilm):
    """models/tiny: a 2-layer BERT with random weights and MiniLM's tokenizer; models/escape -> a dir outside."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("models")
    cfg = BertConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(root / "tiny")
    minilm.tokenizer.save_pretrained(root / "tiny")
    outside = tmp_path_factory.mktemp("outside")
    BertModel(cfg).save_pretrained(outside / "secret")
    (root / "escape").symlink_to(outside / "secret")
    return root


@pytest.fixture(scope="module")
def client(tiny_model_dir, dinov2):
    app = create_app(model_dirs=[tiny_model_dir], limits=LIMITS)
    app.state.viewer.slot("dinov2-small").model = dinov2  # share the session's loaded model
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)


@pytest.fixture(scope="module")
def chelsea_png():
    return png_bytes(load_image("chelsea"))


def run_image(client, data: bytes, name="x.png", model="dinov2-small"):
    return client.post("/api/run", data={"model": model}, files={"image": (name, data, "application/octet-stream")})


def test_info_lists_zoo_local_models_and_photos(client, tiny_model_dir):
    info = client.get("/api/info").json()
    ids = [m["id"] for m in info["models"]]
    assert {"dinov2-small", "minilm", "smollm2-135m"} <= set(ids)
    assert f"local:{tiny_model_dir.name}/tiny" in ids
    assert not any("escape" in i or "secret" in i for i in ids)  # a symlink out of the folder is not offered
    assert "chelsea" in info["photos"] and info["explain"][0] == "raw"
    assert client.get("/").text.count("<script") == 2 and client.get("/static/viewer.js").status_code == 200


def test_image_run_lazy_rows_and_export(client, chelsea_png):
    r = run_image(client, chelsea_png, "chelsea.png")
    assert r.status_code == 200, r.text
    body = r.json()
    (s,) = body["doc"]["streams"]
    assert s["name"] == "vision" and s["length"] == 257 and len(s["layers"]) == 12 and len(s["heads"]) == 6
    assert "rows" not in s and body["doc"]["images"][0].startswith("data:image/")
    q = client.get(f"/api/runs/{body['rid']}/vision/query/37").json()
    assert q["q"] == 37
    u8 = np.frombuffer(__import__("base64").b64decode(q["b64"]), np.uint8).reshape(12, 6, 257)
    scale = np.frombuffer(__import__("base64").b64decode(q["scale"]), np.float32).reshape(12, 6)
    sums = (u8 / 255 * scale[..., None]).sum(-1)
    np.testing.assert_allclose(sums, 1, atol=0.15)  # each row is a distribution (up to quantization)
    assert client.get(f"/api/runs/{body['rid']}/vision/query/999").status_code == 400
    assert client.get(f"/api/runs/{body['rid']}/vision/layer/3").status_code == 200
    assert client.get(f"/api/runs/{body['rid']}/vision/layer/99").status_code == 404
    assert client.get("/api/runs/nope/vision/query/1").status_code == 404
    page = client.get(f"/api/runs/{body['rid']}/export")
    assert page.status_code == 200 and "attachment" in page.headers["content-disposition"]
    assert_self_contained(page.text)


def test_local_model_directory_runs(client, tiny_model_dir):
    mid = f"local:{tiny_model_dir.name}/tiny"
    r = client.post("/api/run", data={"model": mid, "text": "attention is all you need"})
    assert r.status_code == 200, r.text
    s = r.json()["doc"]["streams"][0]
    assert len(s["layers"]) == 2 and len(s["heads"]) == 4 and s["tokens"][0] == "[CLS]"


@pytest.mark.parametrize("model", ["../../etc/passwd", "/etc", "local:../../etc", "local:x/../../etc",
                                   "local:models/escape", "minilm/../../x"])
def test_no_path_outside_the_model_folders(client, model):
    r = client.post("/api/run", data={"model": model, "text": "hello"})
    assert r.status_code == 404 and "unknown model" in r.json()["error"]


def test_bad_images_get_clear_4xx(client, chelsea_png):
    cases = {
        "not an image": (b"just some text, definitely not pixels", 400, "not an image"),
        "tiff": (None, 415, "TIFF"),
        "svg": (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", 415, "SVG"),
        "truncated": (chelsea_png[:300], 400, "corrupt or truncated"),
        "bomb header": (bomb_png(40_000, 40_000), 413, "pixels"),
        "over the pixel limit": (bomb_png(3000, 3000), 413, "above this server's limit"),
        "empty": (b"", 400, "nothing to run"),
    }
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    cases["tiff"] = (tiff.getvalue(), 415, "TIFF")
    for name, (payload, status, words) in cases.items():
        r = run_image(client, payload)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words in r.json()["error"], (name, r.json())


def test_upload_size_limit_while_streaming(client):
    big = np.random.default_rng(0).integers(0, 255, 600_000, dtype=np.uint8).tobytes()
    r = run_image(client, b"\x89PNG\r\n\x1a\n" + big)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: counted as it streams
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = client.post("/api/run", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def test_greyscale_and_palette_images_are_converted():
    img = read_image(png_bytes(load_image("camera").convert("L").resize((64, 48))), 1_000_000)
    assert img.mode == "RGB" and img.size == (64, 48)
    assert read_image(png_bytes(Image.new("P", (5, 5))), 100).mode == "RGB"


def test_traces_load_as_safetensors_only(client, dinov2, tmp_path):
    import attnscope

    evil = pickle.dumps({"__reduce__": "os.system"})
    for payload in (evil, b"\x00" * 64, b"PK\x03\x04 zip"):
        r = client.post("/api/trace", files={"trace": ("t.safetensors", payload)})
        assert r.status_code == 400 and "safetensors" in r.json()["error"]
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    r = client.post("/api/trace", files={"trace": ("p.safetensors", (tmp_path / "plain.safetensors").read_bytes())})
    assert r.status_code == 400 and "not an attnscope trace" in r.json()["error"]
    x = dinov2.encode(image="coffee")
    with torch.no_grad(), attnscope.capture(dinov2, layers=-1, queries="cls") as trace:
        dinov2(**x)
    trace.save(tmp_path / "t.safetensors")
    r = client.post("/api/trace", files={"trace": ("t.safetensors", (tmp_path / "t.safetensors").read_bytes())})
    assert r.status_code == 200, r.text
    assert r.json()["doc"]["streams"][0]["queries"] == [0]
    with pytest.raises(Exception):
        check_safetensors(evil)


def test_hosts_other_than_loopback_are_refused(client):
    assert client.get("/api/info", headers={"host": "attacker.example"}).status_code == 400
    assert client.get("/api/info", headers={"host": "localhost:8765"}).status_code == 200


def test_server_keeps_working_after_failures(client, chelsea_png):
    for bad in (b"", b"nope", bomb_png(10**5, 10**5)):
        run_image(client, bad)
    assert client.post("/api/run", data={"model": "dinov2-small", "photo": "nope"}).status_code == 400
    assert client.post("/api/run", data={"model": "dinov2-small", "max_new_tokens": "x", "photo": "chelsea"}).status_code == 400
    assert client.post("/api/run", data={"model": "dinov2-small", "text": "a cat"}).status_code == 400  # takes no text
    assert client.post("/api/runs/x/explain", content=b"{").status_code == 400
    slot = client.app.state.viewer.slots["dinov2-small"]
    assert not slot.lock.locked() and slot.waiting == 0
    r = client.post("/api/run", data={"model": "dinov2-small", "photo": "chelsea"})
    assert r.status_code == 200
