"""Pictures of a win map (core.winmap.ErrorTable), host-free: PIL -> ComfyUI IMAGE tensors.

- `render_step(table, s)`: the grid of regions at step s, each in the colour of the model that
  won it most often (PALETTE of the maps viewer), paler the closer the race; legend below with
  each model's share of the regions won at that step.
- `render_steps(table)`: every step's picture, one IMAGE batch [steps, H, W, 3].
- `render_share_plot(table)`: the proportion of wins per model (y) at each step (x, noisiest
  first), the 1/N line dashed, and the overall shares and the verdict below.
- `render_eval_plot(table)`: held-out evaluation, one bar per predictor (the ensemble first,
  then each expert alone): mean denoising error, lower is better.
- `render_overview(table)`: steps side by side + the share plot (the README picture).
"""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from .image_file import to_image, to_pil
from .map_render import BG, FG, PALETTE, _fit, _font, _text_w
from .winmap import ErrorTable, short_name

CELL_PX = 192          # side of a step's region grid in pixels
MARGIN, TITLE_H, ROW_H = 8, 24, 20
PLOT_W, PLOT_H, AXIS_W = 360, 200, 44
GREY = (150, 150, 150)


def _pale(colour, strength: float):
    """Blend towards white: strength 1 = the full colour, 0 = 75% white."""
    a = 0.25 + 0.75 * max(0.0, min(1.0, strength))
    return tuple(int(round(c * a + 255 * (1 - a))) for c in colour)


def _legend(d, x, y, width, names, values, what=""):
    f = _font(13)
    for i, (name, v) in enumerate(zip(names, values)):
        yy = y + i * ROW_H
        d.rectangle((x, yy + 2, x + 14, yy + 16), fill=PALETTE[i % len(PALETTE)], outline=FG)
        text = f"{100 * v:.0f}%{what} {short_name(name)}"
        d.text((x + 22, yy + 2), _fit(f, text, width - 22), font=f, fill=FG)


def step_title(table: ErrorTable, s: int) -> str:
    return f"t={table.timesteps[s]} (sigma {table.sigmas[s]:.3g})"


def render_step(table: ErrorTable, s: int) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: which model won each region at step s (see the module)."""
    gh, gw = table.grid
    cell = max(1, CELL_PX // max(gh, gw))
    w, h = max(gw * cell, 200) + 2 * MARGIN, gh * cell
    n = table.num_experts
    img = Image.new("RGB", (w, TITLE_H + h + MARGIN + n * ROW_H + MARGIN), BG)
    d = ImageDraw.Draw(img)
    d.text((MARGIN, 5), _fit(_font(14), step_title(table, s), w - 2 * MARGIN), font=_font(14), fill=FG)
    winners, strength = table.winners()[s], table.winner_strength()[s]
    x0 = (w - gw * cell) // 2
    for r in range(gh):
        for c in range(gw):
            colour = _pale(PALETTE[int(winners[r, c]) % len(PALETTE)], float(strength[r, c]))
            d.rectangle((x0 + c * cell, TITLE_H + r * cell, x0 + (c + 1) * cell - 1, TITLE_H + (r + 1) * cell - 1),
                        fill=colour)
    _legend(d, MARGIN, TITLE_H + h + MARGIN, w - 2 * MARGIN, table.names[:n], table.step_share()[s].tolist())
    return to_image(img)


def render_steps(table: ErrorTable) -> torch.Tensor:
    """IMAGE [steps, H, W, 3]: render_step of every step (one size)."""
    return torch.cat([render_step(table, s) for s in range(len(table.timesteps))])


def render_share_plot(table: ErrorTable) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: proportion of wins per model per step (see the module)."""
    n, steps = table.num_experts, len(table.timesteps)
    share = table.step_share()                                   # (steps, experts)
    x0, y0 = MARGIN + AXIS_W, MARGIN + TITLE_H
    x1, y1 = x0 + PLOT_W, y0 + PLOT_H
    w = x1 + MARGIN + 16
    verdict = table.verdict()
    f = _font(12)
    lines = _wrap(f, verdict, w - 2 * MARGIN)
    img = Image.new("RGB", (w, y1 + 40 + n * ROW_H + len(lines) * 16 + MARGIN), BG)
    d = ImageDraw.Draw(img)
    d.text((MARGIN, MARGIN), "proportion of wins per model, by step", font=_font(14), fill=FG)
    Y = lambda v: y1 - v * (y1 - y0)  # noqa: E731
    X = lambda k: x0 + (k + 0.5) * (x1 - x0) / steps  # noqa: E731
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        d.line((x0, Y(v), x1, Y(v)), fill=(225, 225, 225))
        d.text((MARGIN, Y(v) - 7), f"{100 * v:.0f}%", font=f, fill=FG)
    u = Y(1 / n)
    for xs in range(x0, x1, 8):
        d.line((xs, u, min(xs + 4, x1), u), fill=GREY)
    d.rectangle((x0, y0, x1, y1), outline=FG)
    for k in range(steps):
        label = f"t={table.timesteps[k]}"
        d.text((X(k) - _text_w(f, label) / 2, y1 + 4), label, font=f, fill=FG)
    d.text((x0, y1 + 20), "step (noisiest first)", font=f, fill=FG)
    for m in range(n):
        xy = [(X(k), Y(float(share[k, m]))) for k in range(steps)]
        if len(xy) > 1:
            d.line(xy, fill=PALETTE[m % len(PALETTE)], width=3)
        for x, y in xy:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=PALETTE[m % len(PALETTE)])
    ly = y1 + 40
    _legend(d, MARGIN, ly, w - 2 * MARGIN, table.names[:n], table.win_share(), " of all wins:")
    for i, line in enumerate(lines):
        d.text((MARGIN, ly + n * ROW_H + 2 + 16 * i), line, font=f, fill=FG)
    return to_image(img)


def _wrap(font, text: str, width: int) -> list:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and _text_w(font, trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def render_eval_plot(table: ErrorTable, title: str = "held-out denoising error (lower is better)") -> torch.Tensor:
    """IMAGE [1, H, W, 3]: one bar per predictor (ensemble first), mean error written on it."""
    rows = table.rows()
    f = _font(12)
    label_w, bar_w, bar_h = 200, PLOT_W, 22
    w = MARGIN * 2 + label_w + bar_w + 70
    img = Image.new("RGB", (w, MARGIN * 2 + TITLE_H + len(rows) * (bar_h + 6) + 20), BG)
    d = ImageDraw.Draw(img)
    d.text((MARGIN, MARGIN), _fit(_font(14), title, w - 2 * MARGIN), font=_font(14), fill=FG)
    top = max(r["loss"] for r in rows) or 1.0
    best = min(r["loss"] for r in rows)
    experts = table.names[:table.num_experts]
    for k, r in enumerate(rows):
        y = MARGIN + TITLE_H + k * (bar_h + 6)
        colour = PALETTE[experts.index(r["name"]) % len(PALETTE)] if r["name"] in experts else (60, 60, 60)
        d.text((MARGIN, y + 4), _fit(f, short_name(r["name"]), label_w - 8), font=f, fill=FG)
        x0 = MARGIN + label_w
        d.rectangle((x0, y, x0 + max(1, int(bar_w * r["loss"] / top)), y + bar_h), fill=colour)
        d.text((x0 + int(bar_w * r["loss"] / top) + 4, y + 4),
               f"{r['loss']:.4g}" + (" best" if r["loss"] == best else ""), font=f, fill=FG)
    d.text((MARGIN, img.height - MARGIN - 14), f"{table.objective}, {table.samples} sample(s) x "
           f"{len(table.timesteps)} step(s)", font=f, fill=FG)
    return to_image(img)


def render_overview(table: ErrorTable) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: every step's winners side by side, the share plot below."""
    steps = [to_pil(render_step(table, s)) for s in range(len(table.timesteps))]
    plot = to_pil(render_share_plot(table))
    w = max(sum(p.width for p in steps) + MARGIN * (len(steps) - 1), plot.width)
    img = Image.new("RGB", (w, steps[0].height + MARGIN + plot.height), BG)
    x = 0
    for p in steps:
        img.paste(p, (x, 0))
        x += p.width + MARGIN
    img.paste(plot, (0, steps[0].height + MARGIN))
    return to_image(img)
