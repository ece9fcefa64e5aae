"""What a training run records and shows: the file's run metadata, the validation table as
text (core.train writes the table) and the loss plot (train loss per step, the aggregator's validation loss per save, and each
reference of the table, i.e. every model alone and the untrained ensemble, as a dashed line)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from .image_file import to_image

FINAL_LOSS_WINDOW = 20   # "final train loss" = mean of the last steps' losses
CURVE_POINTS = 200       # loss-curve points kept in the file's metadata
TRAINED_ROW = "AFA aggregator (trained)"   # the validation table's row of the aggregator
CURVE_SIZE = (640, 360)
LEGEND_ROW = 14            # px per legend row (two entries per row, below the plot)
TRAIN_COLOR, VAL_COLOR = (31, 119, 180), (255, 127, 14)
REFERENCE_COLORS = [(44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
                    (188, 189, 34)]


def format_validation(table: Optional[dict], meta: Optional[dict] = None) -> str:
    """The validation table as text (lower is better)."""
    meta = meta or {}
    head = f"AFA aggregator training: step {meta.get('step', '?')}/{meta.get('steps', '?')}"
    if meta.get("final_train_loss") is not None:
        head += f", train loss {meta['final_train_loss']:.5f} (mean of the last {FINAL_LOSS_WINDOW} steps)"
    if not table:
        return head + "\nNo validation set (validation fraction 0 or fewer than 2 images)."
    lines = [head, f"Validation at step {table['step']}: {table['samples']} held-out sample(s), "
                   f"{table['metric']} (lower is better)"]
    width = max(len(r["name"]) for r in table["rows"])
    best = min(r["loss"] for r in table["rows"])
    for r in table["rows"]:
        lines.append(f"  {r['name']:<{width}}  {r['loss']:.5f}{'  <- best' if r['loss'] == best else ''}")
    return "\n".join(lines)


def run_metadata(trainer, finished: bool) -> dict:
    """What an aggregator file records about the run of `trainer` (a core.train.AggregatorTrainer):
    steps, data, settings, losses, the validation table and the loss curve (at most CURVE_POINTS)."""
    t, c = trainer, trainer.config
    recent = [h[1] for h in t.history[-FINAL_LOSS_WINDOW:]]
    stride = max(1, math.ceil(len(t.history) / CURVE_POINTS))
    curve = t.history[::stride] + ([t.history[-1]] if t.history and (len(t.history) - 1) % stride else [])
    return {
        "step": t.step, "steps": c.steps, "finished": finished, "samples_seen": t.position,
        "data": {"train_samples": len(t.data.train), "val_samples": len(t.data.val), **t.extra_meta.get("data", {})},
        "config": {"batch_size": c.batch_size, "grad_accum": c.grad_accum, "lr": c.lr,
                   "weight_decay": c.weight_decay, "warmup_steps": c.warmup_steps,
                   "max_grad_norm": c.max_grad_norm, "caption_dropout": c.caption_dropout, "seed": t.seed,
                   "mixed_precision": str(t.amp_dtype).replace("torch.", "") if t.amp_dtype else "no",
                   "gradient_checkpointing": t.checkpointing, "world_size": t.comm.world_size},
        "final_train_loss": sum(recent) / len(recent) if recent else None,
        "final_val_loss": t.val_history[-1][1] if t.val_history else None,
        "validation": t.validation, "loss_curve": curve, "val_curve": t.val_history,
        **{k: v for k, v in t.extra_meta.items() if k != "data"},
    }


def reference_losses(table: Optional[dict]) -> list:
    """[(name, loss)] of the validation table's rows other than the trained aggregator: each
    model alone and the untrained ensemble (frozen models: the same at every validation)."""
    return [(r["name"], float(r["loss"])) for r in (table or {}).get("rows", []) if r["name"] != TRAINED_ROW]


def render_loss_curve(history, val_history, title="AFA aggregator training", size=CURVE_SIZE,
                      references: Sequence = ()) -> torch.Tensor:
    """Train loss (line), validation loss (dots) per step and `references` [(name, loss)] as
    dashed lines with a legend -> IMAGE [1, H, W, 3] float 0..1. Log scale when the values
    span more than 20x."""
    w, h = size
    img = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    references = [(name, v) for name, v in references if v is not None and math.isfinite(v)]
    left, right, top = 64, 16, 30
    bottom = 26 + LEGEND_ROW * math.ceil((2 + len(references)) / 2)   # axis labels, then the legend
    draw.text((left, 8), title, fill=(25, 25, 25), font=font)
    finite = [(s, v) for s, v in list(history) + list(val_history) if v is not None and math.isfinite(v)]
    if not finite:
        draw.text((left, h // 2), "no steps trained yet", fill=(90, 90, 90), font=font)
        return to_image(img)
    values = [v for _, v in finite] + [v for _, v in references]
    log = min(values) > 0 and max(values) / min(values) > 20
    tf = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = min(map(tf, values)), max(map(tf, values))
    hi = hi if hi > lo else lo + 1e-6
    s_max = max(1, max(s for s, _ in finite))
    x0, x1, y0, y1 = left, w - right, top, h - bottom

    def xy(s, v):
        return x0 + (x1 - x0) * s / s_max, y0 + (y1 - y0) * (1 - (tf(v) - lo) / (hi - lo))
    draw.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
    for frac in (0.0, 0.5, 1.0):
        value = lo + (hi - lo) * frac
        draw.text((4, y1 - (y1 - y0) * frac - 6), f"{10 ** value:.3g}" if log else f"{value:.3g}",
                  fill=(60, 60, 60), font=font)
    draw.text((x0, y1 + 6), "0", fill=(60, 60, 60), font=font)
    draw.text((x1 - 40, y1 + 6), f"step {s_max}", fill=(60, 60, 60), font=font)
    for i, (name, v) in enumerate(references):
        y = xy(0, v)[1]
        color = REFERENCE_COLORS[i % len(REFERENCE_COLORS)]
        for x in range(int(x0), int(x1), 10):  # dashed
            draw.line([(x, y), (min(x + 6, x1), y)], fill=color, width=2)
    train_line = [xy(s, v) for s, v in history if v is not None and math.isfinite(v)]
    if len(train_line) > 1:
        draw.line(train_line, fill=TRAIN_COLOR, width=2)
    elif train_line:
        x, y = train_line[0]
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=TRAIN_COLOR)
    for s, v in val_history:
        if v is not None and math.isfinite(v):
            x, y = xy(s, v)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=VAL_COLOR)
    legend = [("train loss", TRAIN_COLOR, "line"), ("validation: aggregator", VAL_COLOR, "dot")]
    legend += [(f"validation {v:.4g}: {name}", REFERENCE_COLORS[i % len(REFERENCE_COLORS)], "dash")
               for i, (name, v) in enumerate(references)]
    _legend(draw, font, legend, x0, y1 + 20, (x1 - x0) // 2)
    return to_image(img)


def _legend(draw, font, entries, x, y, column: int):
    """The legend in two columns of `column` px from (x, y): a line / dot / dash mark per entry."""
    for k, (text, color, mark) in enumerate(entries):
        left, cy = x + column * (k % 2), y + LEGEND_ROW * (k // 2) + 6
        if mark == "dot":
            draw.ellipse([left + 8, cy - 4, left + 16, cy + 4], fill=color)
        else:
            draw.line([(left, cy), (left + (9 if mark == "dash" else 24), cy)], fill=color, width=2)
            if mark == "dash":
                draw.line([(left + 15, cy), (left + 24, cy)], fill=color, width=2)
        draw.text((left + 30, cy - 6), _fit_text(draw, font, text, column - 36), fill=(40, 40, 40), font=font)


def _fit_text(draw, font, text: str, width: float) -> str:
    """`text` cut in the middle ('demo_1...l_v2.safetensors') to `width` px: both ends tell names apart."""
    keep = len(text)
    short = text
    while keep > 8 and draw.textlength(short, font=font) > width:
        keep -= 2
        short = text[:keep // 2] + "..." + text[len(text) - (keep - keep // 2):]
    return short
