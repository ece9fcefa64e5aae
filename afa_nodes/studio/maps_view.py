"""Maps tab back end: one generation's recorded attention maps, rendered by `core.map_render`.

The sliders pick an aggregation point and a sampler step by position (0..P-1 over the
recorded points in UNet order, 0..S-1 over the recorded steps); `render` returns the
per-model maps at that step (one row of the paper's Figure-6 grid), the dominant model
per pixel, that map over the ensemble's image, and each model's mean weight per point.
`hover_html` is the hover view: the dominant-model map with every position's weights in
the page, so hovering a position reads each model's weight there.
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..core import map_render
from ..core.errors import AFAError
from ..core.image_file import to_pil
from ..core.map_recorder import MapRun

CELL = 160          # per-model map size in the grid row
DOMINANT_SIZE = 320


@dataclass
class MapsFigures:
    per_model: Image.Image
    dominant: Image.Image
    overlay: Image.Image
    chart: Image.Image
    caption: str
    hover: str = ""        # the hover view's HTML


class MapsView:
    """The maps of one finished run plus the decoded images [B, H, W, 3] of that run."""

    def __init__(self, run: MapRun, images: torch.Tensor, title: str = ""):
        if not run.maps.maps:
            raise AFAError(f"the run recorded no maps ({'; '.join(run.notes) or 'nothing was mixed'}).")
        self.run, self.images, self.title = run, images.detach().cpu(), title

    @property
    def models(self) -> list:
        return list(self.run.maps.model_names)

    @property
    def points(self) -> list:
        return list(self.run.maps.point_names)

    @property
    def steps(self) -> list:
        return sorted(self.run.maps.steps)

    @property
    def branches(self) -> list:
        return self.run.maps.branches

    @property
    def batch(self) -> int:
        return self.run.batch

    def render(self, point_index: int, step_index: int, branch: str = "cond", batch_index: int = 0) -> MapsFigures:
        point = self.points[_index(point_index, len(self.points), "point")]
        step = self.steps[_index(step_index, len(self.steps), "step")]
        batch_index = _index(batch_index, self.batch, "image")
        if branch not in self.branches:
            raise AFAError(f"no '{branch}' maps in this run (cfg 1.0 runs no uncond pass); "
                           f"recorded: {', '.join(self.branches)}.")
        maps = self.run.maps
        per_model = map_render.render_grid(maps, point, branch, batch_index, cell=CELL, steps=[step])
        dominant = map_render.render_dominant(maps, step, point, branch, batch_index, size=DOMINANT_SIZE)
        overlay = map_render.render_overlay(self.images, maps, step, point, branch, batch_index)
        chart = map_render.render_mean_chart(maps, branch, batch_index, step=step)
        sigma = maps.sigma(step)
        caption = (f"point {point} ({point_index + 1}/{len(self.points)}), step {step} "
                   f"({self.steps.index(step) + 1}/{len(self.steps)} recorded"
                   + (f", sigma {sigma:.3g}" if sigma is not None else "") + f"), {branch}, image {batch_index + 1}")
        hover = hover_html(maps.weights(step, point, branch, batch_index), self.models, caption)
        return MapsFigures(*(to_pil(x) for x in (per_model, dominant, overlay, chart)), caption, hover)


HOVER_WIDTH = 320


def hover_html(weights: torch.Tensor, models: list, caption: str) -> str:
    """The dominant model per position of `weights` [N, h, w] as an image whose data attributes
    hold every position's weights (3 decimals) and the model names; the page's script reads them
    under the pointer (app.HOVER_JS)."""
    n, h, w = weights.shape
    winner = weights.argmax(0).numpy()
    colours = np.array([map_render.PALETTE[i % len(map_render.PALETTE)] for i in range(n)], dtype=np.uint8)[winner]
    height = max(1, round(HOVER_WIDTH * h / w))
    picture = Image.fromarray(colours).resize((HOVER_WIDTH, height), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    grid = [[[round(float(v), 3) for v in weights[:, y, x]] for x in range(w)] for y in range(h)]
    legend = " ".join(f'<span style="color:rgb{map_render.PALETTE[i % len(map_render.PALETTE)]}">&#9632;</span> '
                      f"{html.escape(name)}" for i, name in enumerate(models))
    return (f'<div class="afa-hover"><div>{html.escape(caption)}</div>'
            f'<img class="afa-hover-map" width="{HOVER_WIDTH}" height="{height}" '
            f'src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}" '
            f"data-weights='{html.escape(json.dumps(grid))}' data-models='{html.escape(json.dumps(models))}'>"
            f'<div>{legend}</div><div class="afa-hover-readout">Hover the map: each model\'s weight at that '
            "position.</div></div>")


def _index(value, count: int, what: str) -> int:
    value = int(value if value is not None else 0)
    if not 0 <= value < count:
        raise AFAError(f"{what} {value} is out of range: this run has {count} ({0}..{count - 1}).")
    return value
