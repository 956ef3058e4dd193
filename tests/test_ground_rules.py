"""The rules that turn a grounding map into a box, points and scores, on hand-made maps (no model), and the probe
scenes that change one object only."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from attnscope.evaluate import grounding as metrics
from attnscope.ground import Grounding, GroundingError, crop_box, regions
from attnscope.scenes import SceneWorld, probe_questions


def _g(grid):
    return Grounding(np.asarray(grid, float), (224, 224), "hand", {}, "q")


def test_box_takes_the_heavier_component_not_the_bigger_one():
    grid = np.zeros((8, 8))
    grid[0, 0] = 1.0  # the peak, alone
    grid[5:8, 5:8] = 0.6  # a bigger blob above half the max, with more mass (5.4 > 1)
    assert regions.box(grid, (224, 224), 0.5) == (140, 140, 224, 224)
    grid[5:8, 5:8] = 0.1  # below the threshold: only the peak is left
    assert regions.box(grid, (224, 224), 0.5) == (0, 0, 28, 28)


def test_points_are_peaks_at_least_the_separation_apart():
    grid = np.zeros((8, 8))
    grid[2, 2], grid[2, 3], grid[6, 6] = 3, 2, 1
    assert regions.points(grid, (224, 224), k=2, separation=2) == [(70, 70), (182, 182)]
    assert regions.points(grid, (224, 224), k=2, separation=1) == [(70, 70), (98, 70)]


def test_map_is_normalised_and_metrics_match_a_hand_computation():
    grid = np.zeros((8, 8))
    grid[0, 0], grid[7, 7] = 3.0, 1.0
    g = _g(grid)
    assert abs(g.map.sum() - 1) < 1e-12 and g.map[0, 0] == 0.75
    mask = np.zeros((224, 224), bool)
    mask[0:14, 0:28] = True  # half of cell (0, 0)
    assert metrics.pointing(g, mask) is True
    assert metrics.energy(g, mask) == pytest.approx(0.75 * 0.5)
    assert metrics.box_iou((0, 0, 28, 28), (0, 0, 28, 14)) == pytest.approx(0.5)
    assert metrics.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    far = np.zeros((224, 224), bool)
    far[200:, 100:120] = True
    assert metrics.pointing(g, far) is False and metrics.energy(g, far) == 0.0
    with pytest.raises(ValueError, match="resize the mask"):
        metrics.energy(g, np.zeros((10, 10), bool))


def test_random_map_uses_the_same_rules_and_grid():
    g = Grounding.random(_g(np.ones((8, 8))), seed=3)
    assert g.map.shape == (8, 8) and abs(g.map.sum() - 1) < 1e-12 and g.method == "random"
    assert not np.allclose(g.map, Grounding.random(_g(np.ones((8, 8))), seed=4).map)


def test_crop_box_is_a_square_inside_the_image_around_the_box():
    for box in [(10, 10, 30, 40), (200, 190, 224, 224), (0, 0, 224, 224), (100, 100, 101, 101)]:
        x0, y0, x1, y1 = crop_box(box, (224, 224), margin=0.5)
        assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224 and x1 - x0 == y1 - y0 >= 56
        assert x0 <= box[0] and y0 <= box[1] and x1 >= box[2] and y1 >= box[3]
    for bad in [(200, 10, 260, 50), (-5, 0, 10, 10), (30, 30, 20, 40), (1, 2, 3)]:
        with pytest.raises(GroundingError):
            crop_box(bad, (224, 224))


def test_probe_scenes_change_only_the_target_object():
    world = SceneWorld(seed=0)
    for i in range(4):
        base = world.scene("test", i)
        for kind in ("small", "faint"):
            probe, k = world.probe(i, kind)
            assert [o.cls for o in probe.objects] == base.classes
            others = np.ones((224, 224), bool)
            r, c = probe.objects[k].cell
            others[r * 74:(r + 1) * 74, c * 74:(c + 1) * 74] = False
            assert np.array_equal(np.asarray(probe.image)[others], np.asarray(base.image)[others])
            if kind == "small":
                assert probe.objects[k].size <= 27 < base.objects[k].size
            else:
                assert probe.objects[k].faint and probe.objects[k].size == base.objects[k].size
    items = probe_questions(world, 3, "small")
    assert [it["truth"] for it in items] == ["yes", "no"] * 3
    assert all(not it["scene"].has(it["cls"]) for it in items if it["truth"] == "no")


def test_figure_and_html_need_no_network(tmp_path):
    grid = np.zeros((8, 8))
    grid[3, 4] = 1.0
    g = _g(grid)
    page = g.to_html()
    assert "data:image/png;base64," in page and "&quot;box&quot;: [" in page
    assert re.findall(r'src="([^"]*)"', page) and all(v.startswith("data:") for v in re.findall(r'src="([^"]*)"', page))
    assert "http" not in page and "<script" not in page
    assert g.save(tmp_path / "g.png").stat().st_size > 1000
    assert json.loads(g.save(tmp_path / "g.json").read_text())["box"] == [112, 84, 140, 112]
    with pytest.raises(ValueError, match="use .json, .png or .html"):
        g.save(tmp_path / "g.gif")


@pytest.mark.parametrize("size", [(232, 232), (225, 301), (29, 58), (450, 123)])
def test_scaled_box_touching_the_far_edges_stays_inside_the_photo(size):
    """Review r16a: scale() used float ratios and ceil, so 224 * (232 / 224) = 232.00000000000003 became 233 and
    reask's crop_box refused the grounded box of a 232-px photo as "not inside the image"."""
    grid = np.zeros((8, 8))
    grid[7, 7] = 1.0  # the bottom-right cell: the box ends at the input's far edges
    g = _g(grid)
    (x0, y0, x1, y1), pts = g.scale(size)
    assert (x1, y1) == size and 0 <= x0 < x1 and 0 <= y0 < y1
    assert all(0 <= x < size[0] and 0 <= y < size[1] for x, y in pts)
    crop_box((x0, y0, x1, y1), size)  # accepted


@pytest.mark.parametrize("pixel_size", [(230, 230), (200, 300)])
def test_metrics_count_every_pixel_when_the_input_does_not_divide_into_the_grid(pixel_size):
    """Review r16a: the metrics cut cells of pixel_size // grid pixels from the top left, so the last rows/columns of
    an input not divisible by the grid were outside every cell, while box, points and pixel_map (and the model's
    patches) cover them: a mask there scored pointing False and energy 0 for a map peaked on its cell."""
    grid = np.zeros((8, 8))
    grid[7, 7] = 1.0
    g = Grounding(grid, pixel_size, "hand", {}, "q")
    mask = np.zeros(pixel_size, bool)
    mask[-1, -1] = True  # the bottom-right pixel: inside cell (7, 7) by pixel_map's and the box's rule
    assert g.pixel_map()[-1, -1] == 1.0
    assert metrics.pointing(g, mask)
    cell = g.pixel_map() > 0
    assert metrics.energy(g, mask) == pytest.approx(1 / cell.sum())
    full = np.ones(pixel_size, bool)
    assert metrics.energy(g, full) == pytest.approx(1.0)
