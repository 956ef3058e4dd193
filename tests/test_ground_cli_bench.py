"""`attnscope ground` (thin: one `error:` line per bad input) and `bench/grounding.py --small` (what CI runs), on the
real scene-vlm loaded once for the module."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from attnscope.cli import main
from attnscope.models import zoo

BENCH = Path(__file__).resolve().parents[1] / "bench" / "grounding.py"
Q = "Is there a bag in the image?"


@pytest.fixture
def use(monkeypatch, scene_vlm, minilm):
    monkeypatch.setitem(zoo.LOADERS, "scene-vlm", lambda: scene_vlm)
    monkeypatch.setitem(zoo.LOADERS, "minilm", lambda: minilm)


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    from attnscope.scenes import SceneWorld

    path = tmp_path_factory.mktemp("scene") / "scene.png"
    SceneWorld(seed=0).scene("test", 0).image.save(path)
    return str(path)


def test_bad_ground_requests_give_one_error_line(use, capsys, tmp_path, scene_png):
    cases = {
        "text-only model": (["ground", "minilm", "--image", scene_png, "--question", Q], "without image tokens"),
        "word not in the question": (["ground", "scene-vlm", "--image", scene_png, "--question", Q, "--target", "hat"],
                                     "target word 'hat' is not in the question"),
        "bad suffix": (["ground", "scene-vlm", "--image", scene_png, "--question", Q, "--out", str(tmp_path / "g.gif")],
                       ".png or .json"),
        "missing image": (["ground", "scene-vlm", "--image", "nope.png", "--question", Q], "no image file"),
    }
    for name, (argv, needle) in cases.items():
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (name, err)


def test_ground_writes_the_box_points_and_figure(use, capsys, tmp_path, scene_png):
    out = tmp_path / "g.json"
    assert main(["ground", "scene-vlm", "--image", scene_png, "--question", Q, "--target", "bag", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    saved = json.loads(out.read_text())
    assert printed["box"] == saved["box"] and printed["points"] == saved["points"] and saved["target"] == "bag"
    assert abs(sum(map(sum, saved["map"])) - 1) < 1e-4


def test_bench_small_writes_its_tables(use, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_grounding", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--small", "--out", str(tmp_path)])
    text = (tmp_path / "grounding-small.md").read_text()
    assert "| random |" in text and "| small (2 q) | both |" in text
    for v in result["localisation"].values():
        assert 0 <= v["pointing"]["value"] <= 1 and 0 <= v["energy"]["value"] <= 1
    assert json.loads((tmp_path / "grounding-small.json").read_text())["small"] is True


def test_ground_reask_crops_the_box_it_printed_from_a_scene_name(use, capsys):
    """`--image scene:...` as in `attnscope flow`; --reask crops the region just grounded (one grounding pass, which
    its cost reports) and labels which pixels each line's coordinates are in."""
    from attnscope.cli import image_input
    from attnscope.ground import crop_box

    name = "scene:test-000002"
    assert main(["ground", "scene-vlm", "--image", name, "--question", Q, "--target", "bag", "--reask", "crop"]) == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[:2])
    assert first["pixels"] == "model input" and second["pixels"] == "photo"
    photo = image_input(name)
    (h, w), (x0, y0, x1, y1) = first["pixel_size"], first["box"]
    scaled = (x0 * photo.size[0] // w, y0 * photo.size[1] // h, -(-x1 * photo.size[0] // w), -(-y1 * photo.size[1] // h))
    assert tuple(second["crop"]) == tuple(crop_box(scaled, photo.size))
    assert second["cost"]["grounding_forwards"] == first["cost"]["forwards"]


def test_a_center_cropping_processor_keeps_the_map_off_the_photo(use, monkeypatch):
    """A processor that center-crops a photo of another size: the map covers the crop, so it is never drawn over the
    photo and its box does not scale back to it (an error naming the fix); the model is not changed."""
    from PIL import Image

    from attnscope import ground
    from attnscope.models.zoo import load

    model = load("scene-vlm")
    proc = model.image_processor or model.processor.image_processor
    monkeypatch.setattr(proc, "do_center_crop", True, raising=False)
    monkeypatch.setattr(proc, "crop_size", {"height": 224, "width": 224}, raising=False)
    g = ground(model, Image.new("RGB", (300, 200), "white"), Q)
    assert g.extras["center_cropped"] and g.photo is None
    with pytest.raises(ValueError, match="center-cropped"):
        g.scale((300, 200))
