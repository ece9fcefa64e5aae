import pytest
import torch
from PIL import ImageFont

from afa_nodes.core import map_render as mr
from afa_nodes.core.errors import AFAError
from afa_nodes.core.image_file import to_pil
from afa_nodes.core.map_render import (
    PALETTE, chart_layout, grid_layout, legend_height, render_dominant,
    render_grid, render_mean_chart, render_overlay, summary, uniform_level)
from afa_nodes.core.recorded_maps import RecordedMaps


def const_maps(names, values, steps=(0, 5, 10), points=("input 4", "middle"), hw=(8, 8), b=1,
               sigmas=True):
    """Every map: model i has constant weight values[i]."""
    m = RecordedMaps(model_names=list(names))
    a = torch.tensor(values, dtype=torch.float32)[None, :, None, None].expand(b, -1, *hw)
    for s in steps:
        for p in points:
            m.add(s, p, "cond", a, sigma=10.0 / (s + 1) if sigmas else None)
    return m


def halves_maps():
    """Model 0 wins the left half, model 1 the right half."""
    a = torch.zeros(1, 2, 8, 8)
    a[0, 0, :, :4] = 0.9
    a[0, 1, :, :4] = 0.1
    a[0, 0, :, 4:] = 0.2
    a[0, 1, :, 4:] = 0.8
    m = RecordedMaps(model_names=["left", "right"])
    m.add(3, "output 2", "cond", a)
    return m


def check_image(img, hw=None):
    assert img.dtype == torch.float32 and img.dim() == 4 and img.shape[0] == 1 and img.shape[-1] == 3
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    if hw is not None:
        assert tuple(img.shape[1:3]) == hw
    to_pil(img)  # usable as PIL


def region(img, box):
    x0, y0, x1, y1 = (int(v) for v in box)
    return img[0, y0:y1, x0:x1]


# ------------------------------------------------------------------ data model
def test_add_stores_reduced_fp16_and_weights_returns_float32():
    m = RecordedMaps(model_names=["a", "b", "c"])
    a = torch.rand(2, 3, 128, 96).softmax(1)
    m.add(0, "input 0", "cond", a, sigma=14.6, max_side=32)
    assert m.maps[(0, "input 0", "cond")].dtype == torch.float16
    assert m.maps[(0, "input 0", "cond")].shape == (2, 3, 32, 24)
    w = m.weights(0, "input 0", "cond", batch_index=1)
    assert w.dtype == torch.float32 and w.shape == (3, 32, 24)
    assert torch.allclose(w.sum(0), torch.ones(32, 24), atol=1e-2)
    assert m.steps == [0] and m.point_names == ["input 0"] and m.sigma(0) == pytest.approx(14.6)


def test_add_rejects_wrong_model_count():
    m = RecordedMaps(model_names=["a", "b"])
    with pytest.raises(AFAError, match=r"\[B, 2, H, W\]"):
        m.add(0, "middle", "cond", torch.rand(1, 3, 8, 8))


def test_errors_list_available_points_steps_branches_batch():
    m = const_maps(["a", "b"], [0.5, 0.5])
    with pytest.raises(AFAError) as e:
        m.weights(0, "output 3")
    assert "output 3" in str(e.value) and "input 4" in str(e.value) and "middle" in str(e.value)
    with pytest.raises(AFAError) as e:
        m.weights(7, "middle")
    assert "0, 5, 10" in str(e.value)
    with pytest.raises(AFAError, match="cond"):
        m.weights(0, "middle", "uncond")
    with pytest.raises(AFAError, match="batch_index 3"):
        m.weights(0, "middle", "cond", 3)
    for fn in (lambda: render_grid(m, "final", "cond", 0),
               lambda: render_dominant(m, 99, "middle", "cond", 0, 256),
               lambda: render_overlay(torch.rand(64, 64, 3), m, 99, "middle"),
               lambda: render_mean_chart(m, "cond", 0, step=99)):
        with pytest.raises(AFAError, match="available"):
            fn()
    with pytest.raises(AFAError, match="recorded branches"):
        render_mean_chart(m, "uncond")
    with pytest.raises(AFAError):
        summary(m, branch="uncond")


# ------------------------------------------------------------------ grid
@pytest.mark.parametrize("n,steps,cell", [(2, 3, 96), (3, 1, 64), (6, 4, 48)])
def test_grid_shape_matches_documented_formula(n, steps, cell):
    m = const_maps([f"model{i}" for i in range(n)], [1.0 / n] * n, steps=range(steps))
    img = render_grid(m, "middle", "cond", 0, cell=cell)
    width = max(mr.GRID_MIN_W, 2 * mr.MARGIN + mr.ROW_LABEL_W + n * (cell + mr.GAP) - mr.GAP)
    height = (2 * mr.MARGIN + mr.TITLE_H + mr.HEADER_H + steps * (cell + mr.GAP) - mr.GAP
              + mr.COLORBAR_H)
    check_image(img, (height, width))
    assert grid_layout(n, steps, cell)["size"] == (height, width)


def test_grid_subsamples_rows_to_max_rows():
    m = const_maps(["a", "b"], [0.5, 0.5], steps=range(30))
    img = render_grid(m, "middle", cell=40, max_rows=5)
    assert img.shape[1] == grid_layout(2, 5, 40)["size"][0]


def test_grid_weight_one_cell_brighter_than_weight_zero():
    m = const_maps(["one", "zero"], [1.0, 0.0])
    img = render_grid(m, "input 4", "cond", 0, cell=64)
    cells = grid_layout(2, 3, 64)["cells"]
    for row in cells:
        bright, dark = region(img, row[0]).mean(), region(img, row[1]).mean()
        assert bright > dark + 0.3
    # 0 is dark, 1 is bright (viridis ends)
    assert region(img, cells[0][1]).mean() < 0.25 and region(img, cells[0][0]).mean() > 0.5


def test_grid_non_square_map_fits_cell_and_is_letterboxed():
    m = const_maps(["one", "zero"], [1.0, 0.0], hw=(8, 4))
    img = render_grid(m, "middle", cell=64)
    x0, y0, x1, y1 = grid_layout(2, 3, 64)["cells"][0][0]
    side = img[0, y0 + 32, x0 + 2]  # outside the 32-wide map: grey background
    centre = img[0, y0 + 32, x0 + 32]
    assert torch.allclose(side, torch.tensor(mr.CELL_BG, dtype=torch.float32) / 255, atol=1 / 255)
    assert not torch.allclose(side, centre)


def test_grid_header_has_text_and_depends_on_model_names():
    lay = grid_layout(2, 3, 96)
    a = render_grid(const_maps(["alpha", "beta"], [0.5, 0.5]), "middle", cell=96)
    b = render_grid(const_maps(["gamma_model", "delta"], [0.5, 0.5]), "middle", cell=96)
    ha, hb = region(a, lay["header"]), region(b, lay["header"])
    assert (ha.mean(-1) < 0.4).sum() > 20  # dark text pixels on the light background
    assert not torch.equal(ha, hb)
    assert (region(a, lay["title"]).mean(-1) < 0.4).sum() > 20
    no_sigma = render_grid(const_maps(["alpha", "beta"], [0.5, 0.5], sigmas=False), "middle")
    assert (region(no_sigma, lay["row_labels"]).mean(-1) < 0.4).sum() > 20  # "step k"
    assert (region(a, lay["row_labels"]).mean(-1) < 0.4).sum() > (
        region(no_sigma, lay["row_labels"]).mean(-1) < 0.4).sum()  # + "sigma s"
    # long names are wrapped/truncated inside the cell width, not spilled over
    long = render_grid(const_maps(["x" * 80, "y" * 80], [0.5, 0.5]), "middle", cell=96)
    check_image(long, lay["size"])


# ------------------------------------------------------------------ dominant / overlay
def test_dominant_left_right_palette_and_shape():
    m = halves_maps()
    img = render_dominant(m, 3, "output 2", "cond", 0, size=256)
    check_image(img, (256 + mr.TITLE_H + legend_height(2), 256))
    p0 = torch.tensor(PALETTE[0], dtype=torch.float32) / 255
    p1 = torch.tensor(PALETTE[1], dtype=torch.float32) / 255
    assert torch.allclose(img[0, :256, :120], p0.expand(256, 120, 3), atol=1 / 255)
    assert torch.allclose(img[0, :256, 136:], p1.expand(256, 120, 3), atol=1 / 255)
    legend = img[0, 256:]
    assert (legend.mean(-1) < 0.4).sum() > 50  # text
    assert (torch.abs(legend - p0).sum(-1) < 0.02).sum() > 50  # swatch 0
    assert (torch.abs(legend - p1).sum(-1) < 0.02).sum() > 50  # swatch 1


def test_palette_is_distinct():
    assert len(set(PALETTE[:6])) == 6


def test_overlay_blends_colours_over_image_and_accepts_batched_image():
    m = halves_maps()
    image = torch.full((1, 80, 300, 3), 0.5)
    img = render_overlay(image, m, 3, "output 2", "cond", 0, alpha=0.45)
    check_image(img, (80 + mr.TITLE_H + legend_height(2), 300))
    p0 = torch.tensor(PALETTE[0], dtype=torch.float32) / 255
    p1 = torch.tensor(PALETTE[1], dtype=torch.float32) / 255
    assert torch.allclose(img[0, 40, 10], 0.55 * 0.5 + 0.45 * p0, atol=2 / 255)
    assert torch.allclose(img[0, 40, 290], 0.55 * 0.5 + 0.45 * p1, atol=2 / 255)
    # alpha 0 leaves the image untouched; small images get a legend-wide canvas
    plain = render_overlay(torch.full((32, 32, 3), 0.25), m, 3, "output 2", alpha=0.0)
    assert plain.shape[2] == mr.LEGEND_MIN_W
    assert torch.allclose(plain[0, :32, :32], torch.full((32, 32, 3), 0.25), atol=1 / 255)
    with pytest.raises(AFAError, match="H, W, 3"):
        render_overlay(torch.rand(32, 32), m, 3, "output 2")


# ------------------------------------------------------------------ chart / summary
def test_chart_line_of_heavier_model_is_higher():
    m = const_maps(["heavy", "light"], [0.8, 0.2], points=("input 0", "middle", "output 0", "final"))
    img = render_mean_chart(m, "cond", 0)
    lay = chart_layout(4)
    check_image(img, lay["size"])
    plot = region(img, lay["plot"])
    ys = []
    for c in PALETTE[:2]:
        mask = (torch.abs(plot - torch.tensor(c) / 255).sum(-1) < 0.02)
        assert mask.sum() > 30
        ys.append(mask.nonzero()[:, 0].float().mean())
    assert ys[0] < ys[1]  # image rows grow downward: higher line = smaller y
    h = lay["plot"][3] - lay["plot"][1]
    assert ys[0] == pytest.approx(0.2 * h, abs=4) and ys[1] == pytest.approx(0.8 * h, abs=4)
    assert (region(img, lay["legend"]).mean(-1) < 0.4).sum() > 30


def test_chart_single_step_and_single_point():
    m = const_maps(["a", "b", "c"], [0.2, 0.3, 0.5], points=("middle",))
    check_image(render_mean_chart(m, "cond", 0, step=5), chart_layout(1)["size"])


def test_summary_and_uniform_level():
    m = const_maps(["a", "b", "a"], [0.25, 0.25, 0.5])
    s = summary(m)
    assert list(s) == ["a", "b", "a #2"]
    assert s["a"] == pytest.approx(0.25, abs=1e-3) and s["a #2"] == pytest.approx(0.5, abs=1e-3)
    assert uniform_level(4) == 0.25
    assert mr.mean_weights(m)["middle"] == pytest.approx([0.25, 0.25, 0.5], abs=1e-3)


def test_bitmap_font_fallback(monkeypatch):
    orig = ImageFont.load_default

    def old_pillow(size=None):
        if size is not None:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return orig()

    monkeypatch.setattr(ImageFont, "load_default", old_pillow)
    m = const_maps(["a", "b"], [0.5, 0.5])
    check_image(render_grid(m, "middle", cell=48), grid_layout(2, 3, 48)["size"])
    check_image(render_mean_chart(m), chart_layout(2)["size"])


def test_equal_weights_are_drawn_as_ties_not_as_model_1():
    from afa_nodes.core.map_render import TIE_COLOUR, render_dominant
    from afa_nodes.core.recorded_maps import RecordedMaps
    maps = RecordedMaps(model_names=["a", "b"])
    w = torch.full((1, 2, 8, 8), 0.5)
    w[0, 0, :, :4], w[0, 1, :, :4] = 0.9, 0.1  # left half: model a wins clearly
    maps.add(0, "middle", "cond", w)
    img = render_dominant(maps, 0, "middle", size=256)[0]
    right = (img[10, 250] * 255).round().tolist()
    left = (img[10, 5] * 255).round().tolist()
    assert right == list(TIE_COLOUR) and left != list(TIE_COLOUR)
