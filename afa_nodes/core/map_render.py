"""Host-free rendering of recorded AFA aggregation maps (pure torch + numpy + PIL).

The recorder fills a `RecordedMaps` (core/recorded_maps.py); the render functions turn it into
ComfyUI IMAGE tensors [1, H, W, 3] float32 in 0..1 (core/image_file.to_pil gives the PIL image back).

Sizes are deterministic and exposed through the `*_layout` functions (tests use them):
  grid:     W = max(GRID_MIN_W, 2*MARGIN + ROW_LABEL_W + N*(cell+GAP) - GAP)
            H = 2*MARGIN + TITLE_H + HEADER_H + S*(cell+GAP) - GAP + COLORBAR_H
  dominant: W = size, H = TITLE_H + round(size*h/w) + legend_height(N)
  overlay:  W = max(image W, LEGEND_MIN_W), H = image H + TITLE_H + legend_height(N)
  chart:    W = 2*MARGIN + Y_AXIS_W + max(P*X_STEP, 200) + LEGEND_W,
            H = 2*MARGIN + TITLE_H + PLOT_H + XLABEL_H
with legend_height(N) = N*LEGEND_ROW_H + MARGIN, N models, S step rows, P points.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from afa_nodes import logger
from afa_nodes.core.errors import AFAError
from afa_nodes.core.image_file import to_image
from afa_nodes.core.recorded_maps import RecordedMaps

MARGIN, GAP, TITLE_H, HEADER_H, ROW_LABEL_W, COLORBAR_H = 8, 6, 24, 34, 72, 30
GRID_MIN_W, LEGEND_ROW_H, LEGEND_MIN_W = 260, 20, 240
Y_AXIS_W, X_STEP, PLOT_H, XLABEL_H, LEGEND_W = 60, 24, 200, 86, 190
BG, FG, CELL_BG = (250, 250, 250), (25, 25, 25), (222, 222, 222)
# Okabe-Ito (colour-blind safe); the first six are used for 2-6 models.
PALETTE = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (213, 94, 0), (86, 180, 233),
           (204, 121, 167), (240, 228, 66), (0, 0, 0)]
_VIRIDIS = [(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
            (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)]
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_VIRIDIS)),
                           [c[k] for c in _VIRIDIS]) for k in range(3)], 1).astype(np.uint8)


# ---------------------------------------------------------------- drawing helpers
def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _text_w(font, text: str) -> int:
    box = font.getbbox(text)
    return box[2] - box[0]


def _fit(font, text: str, max_w: int) -> str:
    """Shorten with '...' in the middle so the text fits in max_w pixels: the end of a
    name (e.g. '_v2') is often what tells models apart."""
    if _text_w(font, text) <= max_w:
        return text
    head, tail = text[: (len(text) + 1) // 2], text[(len(text) + 1) // 2:]
    while (head or tail) and _text_w(font, head + "..." + tail) > max_w:
        if len(head) >= len(tail):
            head = head[:-1]
        else:
            tail = tail[1:]
    return head + "..." + tail


def _label(name: str) -> str:
    """Display name: folder and checkpoint extension dropped."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    for ext in (".safetensors", ".ckpt", ".sft", ".pth", ".pt", ".bin"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _wrap2(font, text: str, max_w: int) -> list[str]:
    """Break into at most two lines of width max_w (second line truncated)."""
    if _text_w(font, text) <= max_w:
        return [text]
    cut = len(text)
    while cut > 1 and _text_w(font, text[:cut]) > max_w:
        cut -= 1
    return [text[:cut], _fit(font, text[cut:], max_w)]


def _vtext(img: Image.Image, xy: tuple[int, int], text: str, font) -> None:
    """Text rotated 90 degrees (reads bottom to top); xy = top-left corner."""
    lab = Image.new("L", (_text_w(font, text) + 4, 16), 0)
    ImageDraw.Draw(lab).text((0, 0), text, font=font, fill=255)
    lab = lab.rotate(90, expand=True)
    img.paste(Image.new("RGB", lab.size, FG), xy, lab)


def colormap(values: torch.Tensor) -> np.ndarray:
    """[h, w] in 0..1 -> uint8 RGB [h, w, 3] with the viridis-like LUT (0 dark, 1 bright)."""
    idx = (values.clamp(0, 1).nan_to_num(0.0) * 255).round().long().numpy()
    return _LUT[idx]


def _resize(a: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[N, h, w] -> [N, H, W] bilinear."""
    return F.interpolate(a[None], size=hw, mode="bilinear", align_corners=False)[0]


def _check_models(maps: RecordedMaps) -> None:
    if not 1 <= maps.n_models <= len(PALETTE):
        raise AFAError(f"can render 1..{len(PALETTE)} models, got {maps.n_models}")


def uniform_level(n: int) -> float:
    """Weight every model gets when the aggregator is untrained (zero conv_out): 1/N."""
    return 1.0 / n


# ---------------------------------------------------------------- 1. grid
def grid_layout(n_models: int, n_rows: int, cell: int = 96) -> dict:
    """Boxes (x0, y0, x1, y1) of the grid figure: title, header, cells[row][col], colorbar."""
    x0, y0 = MARGIN + ROW_LABEL_W, MARGIN + TITLE_H + HEADER_H
    width = max(GRID_MIN_W, 2 * MARGIN + ROW_LABEL_W + n_models * (cell + GAP) - GAP)
    grid_h = n_rows * (cell + GAP) - GAP
    cells = [[(x0 + c * (cell + GAP), y0 + r * (cell + GAP),
               x0 + c * (cell + GAP) + cell, y0 + r * (cell + GAP) + cell)
              for c in range(n_models)] for r in range(n_rows)]
    return {"size": (y0 + grid_h + COLORBAR_H + MARGIN, width),
            "title": (MARGIN, MARGIN, width - MARGIN, MARGIN + TITLE_H),
            "header": (x0, MARGIN + TITLE_H, width - MARGIN, y0),
            "row_labels": (MARGIN, y0, x0, y0 + grid_h),
            "cells": cells,
            "colorbar": (x0, y0 + grid_h + 10, x0 + min(160, width - x0 - MARGIN - 20), y0 + grid_h + 22)}


def _pick_steps(steps: list[int], max_rows: int) -> list[int]:
    if len(steps) <= max_rows:
        return list(steps)
    idx = np.linspace(0, len(steps) - 1, max_rows).round().astype(int)
    return [steps[i] for i in sorted(set(idx.tolist()))]


def render_grid(maps: RecordedMaps, point: str, branch: str = "cond", batch_index: int = 0,
                cell: int = 96, steps: list[int] | None = None, max_rows: int = 12) -> torch.Tensor:
    """Paper Fig. 6: rows = steps (evenly subsampled to max_rows), columns = models."""
    _check_models(maps)
    cell = max(int(cell), 40)
    rows = _pick_steps(list(steps) if steps is not None else maps.steps, max_rows)
    if not rows:
        raise AFAError("no steps were recorded, nothing to render")
    data = [maps.weights(s, point, branch, batch_index) for s in rows]
    lay = grid_layout(maps.n_models, len(rows), cell)
    H, W = lay["size"]
    img = Image.new("RGB", (W, H), BG)
    d = ImageDraw.Draw(img)
    f, ft = _font(13), _font(16)
    title = f"{point}  ({branch}, image {batch_index})"
    d.text(lay["title"][:2], _fit(ft, title, W - 2 * MARGIN), font=ft, fill=FG)
    for c, name in enumerate(maps.model_names):
        x, _, x1, _ = lay["cells"][0][c]
        for i, line in enumerate(_wrap2(f, _label(name), cell)):
            d.text((x, lay["header"][1] + 2 + 15 * i), line, font=f, fill=FG)
    for r, (s, a) in enumerate(zip(rows, data)):
        bx = lay["cells"][r][0]
        d.text((MARGIN, bx[1] + 4), f"step {s}", font=f, fill=FG)
        sg = maps.sigma(s)
        if sg is not None:
            d.text((MARGIN, bx[1] + 20), _fit(f, f"sigma {sg:.3g}", ROW_LABEL_W - 4), font=f, fill=FG)
        h, w = a.shape[-2:]
        th, tw = max(1, round(h * cell / max(h, w))), max(1, round(w * cell / max(h, w)))
        up = _resize(a, (th, tw))
        for c in range(maps.n_models):
            x0, y0, x1, y1 = lay["cells"][r][c]
            d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=CELL_BG)
            img.paste(Image.fromarray(colormap(up[c])), (x0 + (cell - tw) // 2, y0 + (cell - th) // 2))
    cx0, cy0, cx1, cy1 = lay["colorbar"]
    bar = colormap(torch.linspace(0, 1, cx1 - cx0)[None].expand(cy1 - cy0, -1))
    img.paste(Image.fromarray(bar), (cx0, cy0))
    d.text((cx0 - 12, cy0 - 2), "0", font=f, fill=FG)
    d.text((cx1 + 4, cy0 - 2), "1", font=f, fill=FG)
    return to_image(img)


# ---------------------------------------------------------------- 2./3. dominant model
def legend_height(n_models: int) -> int:
    return n_models * LEGEND_ROW_H + MARGIN


TIE = 0.02          # top two weights closer than this: no model dominates (drawn grey)
TIE_COLOUR = (150, 150, 150)


def _dominant(maps, step, point, branch, batch_index, hw):
    """Colours [h,w,3] of the winning model per pixel, each model's pixel share, and the tied share."""
    _check_models(maps)
    weights = _resize(maps.weights(step, point, branch, batch_index), hw)
    top = weights.topk(2, dim=0).values
    tied = (top[0] - top[1]) < TIE
    idx = weights.argmax(0)
    colours = np.asarray(PALETTE, dtype=np.uint8)[idx.numpy()]
    colours[tied.numpy()] = TIE_COLOUR
    share = torch.bincount(idx[~tied], minlength=maps.n_models).float() / idx.numel()
    return colours, share.tolist(), tied.float().mean().item()


def _dominant_title(point, step, branch, tied):
    title = f"dominant model: {point}, step {step} ({branch})"
    return title + (f"; {100 * tied:.0f}% tied (grey)" if tied > 0 else "")


def _draw_legend(img, y, maps, share, title):
    d, f = ImageDraw.Draw(img), _font(13)
    d.text((MARGIN, y + 4), _fit(_font(15), title, img.width - 2 * MARGIN), font=_font(15), fill=FG)
    y += TITLE_H
    for i, name in enumerate(maps.model_names):
        yy = y + i * LEGEND_ROW_H
        d.rectangle((MARGIN, yy + 2, MARGIN + 14, yy + 16), fill=PALETTE[i], outline=FG)
        pct = f"  {100 * share[i]:.0f}% of pixels"
        room = img.width - 2 * MARGIN - 22 - _text_w(f, pct)
        d.text((MARGIN + 22, yy + 2), _fit(f, _label(name), room) + pct, font=f, fill=FG)


def render_dominant(maps: RecordedMaps, step: int, point: str, branch: str = "cond",
                    batch_index: int = 0, size: int = 384) -> torch.Tensor:
    """Per-pixel argmax model in PALETTE colours; legend (swatch, name, pixel share) below."""
    size = max(int(size), LEGEND_MIN_W)
    h, w = maps.weights(step, point, branch, batch_index).shape[-2:]
    mh = max(1, round(size * h / w))
    colours, share, tied = _dominant(maps, step, point, branch, batch_index, (mh, size))
    img = Image.new("RGB", (size, mh + TITLE_H + legend_height(maps.n_models)), BG)
    img.paste(Image.fromarray(colours), (0, 0))
    _draw_legend(img, mh, maps, share, _dominant_title(point, step, branch, tied))
    return to_image(img)


def render_overlay(image: torch.Tensor, maps: RecordedMaps, step: int, point: str,
                   branch: str = "cond", batch_index: int = 0, alpha: float = 0.45) -> torch.Tensor:
    """Dominant-model colours blended over the decoded image [H,W,3] (or [B,H,W,3]) + legend."""
    if image.dim() == 4:
        image = image[batch_index if image.shape[0] > 1 else 0]
    if image.dim() != 3 or image.shape[-1] != 3:
        raise AFAError(f"overlay needs an image [H, W, 3], got shape {tuple(image.shape)}")
    H, W = image.shape[:2]
    colours, share, tied = _dominant(maps, step, point, branch, batch_index, (H, W))
    base = image.detach().float().cpu().clamp(0, 1).numpy()
    mixed = (1 - alpha) * base + alpha * colours.astype(np.float32) / 255.0
    img = Image.new("RGB", (max(W, LEGEND_MIN_W), H + TITLE_H + legend_height(maps.n_models)), BG)
    img.paste(Image.fromarray((mixed * 255 + 0.5).clip(0, 255).astype(np.uint8)), (0, 0))
    _draw_legend(img, H, maps, share, f"{point}, step {step} ({branch})"
                 + (f"; {100 * tied:.0f}% tied (grey)" if tied > 0 else ""))
    return to_image(img)


# ---------------------------------------------------------------- 4. mean chart
def mean_weights(maps: RecordedMaps, branch: str = "cond", batch_index: int = 0,
                 step: int | None = None) -> dict[str, list[float]]:
    """{point: [mean weight per model]} averaged over pixels and over steps (or one step)."""
    if step is not None and step not in maps.steps:
        raise AFAError(f"step {step} was not recorded; available steps: "
                       f"{', '.join(map(str, maps.steps)) or 'none'}")
    out = {}
    for p in maps.point_names:
        vals = [maps.weights(s, p, branch, batch_index).mean((1, 2))
                for s in ([step] if step is not None else maps.steps) if (s, p, branch) in maps.maps]
        if vals:
            out[p] = torch.stack(vals).mean(0).tolist()
    if not out:
        raise AFAError(f"no {branch!r} maps recorded"
                       + (f" at step {step}" if step is not None else "")
                       + f"; recorded branches: {', '.join(maps.branches) or 'none'}")
    return out


def chart_layout(n_points: int) -> dict:
    """Boxes of the mean-weight chart: 'plot' (x0, y0, x1, y1), 'legend', 'size' (H, W)."""
    px0, py0 = MARGIN + Y_AXIS_W, MARGIN + TITLE_H
    px1, py1 = px0 + max(n_points * X_STEP, 200), py0 + PLOT_H
    return {"size": (py1 + XLABEL_H + MARGIN, px1 + LEGEND_W + MARGIN),
            "plot": (px0, py0, px1, py1), "legend": (px1 + 12, py0, px1 + LEGEND_W, py1)}


def render_mean_chart(maps: RecordedMaps, branch: str = "cond", batch_index: int = 0,
                      step: int | None = None) -> torch.Tensor:
    """One line per model: mean weight (y, 0..1) at each aggregation point (x, in order)."""
    _check_models(maps)
    data = mean_weights(maps, branch, batch_index, step)
    pts = list(data)
    lay = chart_layout(len(pts))
    H, W = lay["size"]
    x0, y0, x1, y1 = lay["plot"]
    img = Image.new("RGB", (W, H), BG)
    d, f = ImageDraw.Draw(img), _font(12)
    when = "all recorded steps" if step is None else f"step {step}"
    d.text((MARGIN, MARGIN), _fit(_font(15), f"mean weight per point ({branch}, {when})", W - 2 * MARGIN),
           font=_font(15), fill=FG)
    Y = lambda v: y1 - v * (y1 - y0)  # noqa: E731
    X = lambda i: x0 + (i + 0.5) * (x1 - x0) / len(pts)  # noqa: E731
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        d.line((x0, Y(t), x1, Y(t)), fill=(225, 225, 225))
        d.text((x0 - 34, Y(t) - 7), f"{t:.2f}", font=f, fill=FG)
    u = Y(uniform_level(maps.n_models))
    for xs in range(x0, x1, 8):
        d.line((xs, u, min(xs + 4, x1), u), fill=(120, 120, 120))
    d.rectangle((x0, y0, x1, y1), outline=FG)
    for i, p in enumerate(pts):
        _vtext(img, (int(X(i)) - 8, y1 + 4), _fit(f, p, XLABEL_H - 26), f)
    d.text(((x0 + x1) // 2 - 50, y1 + XLABEL_H - 16), "aggregation point", font=f, fill=FG)
    _vtext(img, (MARGIN, (y0 + y1) // 2 - 36), "mean weight", f)
    for m in range(maps.n_models):
        xy = [(X(i), Y(data[p][m])) for i, p in enumerate(pts)]
        if len(xy) > 1:
            d.line(xy, fill=PALETTE[m], width=3)
        for x, y in xy:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=PALETTE[m])
    lx, ly = lay["legend"][:2]
    overall = [float(np.mean([data[p][m] for p in pts])) for m in range(maps.n_models)]
    for m, name in enumerate(maps.model_names):
        yy = ly + m * LEGEND_ROW_H
        d.line((lx, yy + 8, lx + 18, yy + 8), fill=PALETTE[m], width=3)
        d.text((lx + 24, yy + 1), _fit(f, f"{overall[m]:.2f} {_label(name)}", LEGEND_W - 36), font=f, fill=FG)
    yy = ly + maps.n_models * LEGEND_ROW_H
    d.line((lx, yy + 8, lx + 4, yy + 8), fill=(120, 120, 120))
    d.line((lx + 8, yy + 8, lx + 12, yy + 8), fill=(120, 120, 120))
    d.line((lx + 16, yy + 8, lx + 18, yy + 8), fill=(120, 120, 120))
    d.text((lx + 24, yy + 1), f"uniform 1/{maps.n_models}", font=f, fill=FG)
    return to_image(img)


# ---------------------------------------------------------------- 5. summary
def summary(maps: RecordedMaps, branch: str | None = None) -> dict[str, float]:
    """Mean weight of each model over all recorded maps (every map counts equally).

    Keys are model names (duplicates get a ' #i' suffix); branch=None uses all branches.
    """
    vals = [a.float().mean((0, 2, 3)) for k, a in maps.maps.items() if branch in (None, k[2])]
    if not vals:
        raise AFAError(f"no maps recorded for branch {branch!r}; recorded branches: "
                       f"{', '.join(maps.branches) or 'none'}")
    mean = torch.stack(vals).mean(0).tolist()
    keys, seen = [], set()
    for i, n in enumerate(maps.model_names):
        keys.append(n if n not in seen else f"{n} #{i}")
        seen.add(n)
    logger.debug("AFA map summary over %d maps: %s", len(vals), mean)
    return dict(zip(keys, mean))
