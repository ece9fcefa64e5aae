"""Training: what every front end calls to train or evaluate an aggregator.

- `train(experts, clip, vae, config, progress, should_stop, status, comm) -> TrainResult`:
  train (or resume) the aggregator of `experts` (service.models.ExpertSet) on config.dataset;
  writes config.out (+ its .train-state) at every save.
- `evaluate(experts, clip, vae, config, aggregator)`: the held-out validation table (each
  expert alone, the block-wise average and, when given, an aggregator file) without training.
- The node's and the studio's names resolved: `config_from_ui` (a folder name inside
  ComfyUI's input directory, a save name in models/afa), `dataset_in_input_dir`,
  `aggregator_save_path`, `dataset_fingerprint`; `render_loss_curve` for the loss plot.

Callbacks: progress(step, total, loss) after each optimizer step; should_stop() polled before
each step (a stop saves a resumable file); status(text) for what happens between steps.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image, ImageDraw, ImageFont

import folder_paths

from .. import training_host
from ..training_dit import differentiable_rope
from ..core.aggregator_file import AggregatorFile, check_fits
from ..core.errors import DatasetError, TrainingError
from ..core.image_file import to_image
from ..core.train import TrainResult, evaluate_aggregator, format_validation, state_path, train_aggregator
from ..core.train_config import NODE, Comm, TrainConfig, from_ui
from . import models

__all__ = ["TrainConfig", "TrainResult", "aggregator_save_path", "config_from_ui", "dataset_fingerprint",
           "dataset_in_input_dir", "evaluate", "format_validation", "render_loss_curve", "state_path", "train"]

CURVE_SIZE = (640, 360)
Progress = Callable[[int, int, float], None]


def dataset_in_input_dir(name) -> Path:
    """`name` as a folder inside ComfyUI's input directory; refuses absolute paths and `..`."""
    base = os.path.abspath(folder_paths.get_input_directory())
    name = str(name or "").strip()
    if not name:
        raise DatasetError(f"give the dataset folder: the name of a subfolder of ComfyUI's input directory ({base}).")
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise DatasetError(f"dataset folder '{name}' must be a subfolder of ComfyUI's input directory ({base}), "
                           "given relative to it, without '..'. Move or copy the dataset into the input folder.")
    path = os.path.abspath(os.path.join(base, name))
    real_base, real = os.path.realpath(base), os.path.realpath(path)
    if os.path.commonpath([base, path]) != base or path == base or os.path.commonpath([real_base, real]) != real_base \
            or real == real_base:
        raise DatasetError(f"dataset folder '{name}' is outside ComfyUI's input directory ({base})"
                           + (f": it is a link to {real}" if real != path else "")
                           + ". Move or copy the dataset into the input folder (links out of it are refused).")
    if not os.path.isdir(path):
        raise DatasetError(f"dataset folder '{name}' does not exist: create {path} with images and same-name "
                           ".txt captions (or a metadata.jsonl).")
    return Path(path)


def aggregator_save_path(save_name) -> Path:
    """models/afa/<save_name>.safetensors (the first 'afa' model folder)."""
    name = str(save_name or "").strip()
    if name.endswith(".safetensors"):
        name = name[:-len(".safetensors")]
    if not re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9_\-. ]*", name):
        raise TrainingError(f"save name '{save_name}' must be a plain file name (letters, digits, '_', '-', '.', "
                            "spaces; no folders): the aggregator is written to models/afa/<name>.safetensors.")
    models.register_afa_folder()
    return Path(folder_paths.get_folder_paths(models.AFA_FOLDER)[0]) / f"{name}.safetensors"


def config_from_ui(values: dict, front: str = NODE) -> TrainConfig:
    """The node's or the studio's option values (by input name) -> a TrainConfig whose dataset
    and out are the resolved paths."""
    config = from_ui(values, front)
    return config.replace(dataset=dataset_in_input_dir(config.dataset), out=aggregator_save_path(config.out))


def dataset_fingerprint(name) -> str:
    """Changes when a file of the dataset folder `name` (inside the input directory) changes;
    '' for a folder that cannot be used."""
    try:
        folder = dataset_in_input_dir(name)
    except DatasetError:
        return ""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            digest.update(f"{root}/{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def train(experts: models.ExpertSet, clip, vae, config: TrainConfig, progress: Optional[Progress] = None,
          should_stop: Optional[Callable[[], bool]] = None, status: Optional[Callable[[str], None]] = None,
          comm: Optional[Comm] = None) -> TrainResult:
    """Train (or, with config.resume, continue) an aggregator for `experts` (frozen); see the module."""
    config = config.for_run()
    with torch.inference_mode(False), torch.enable_grad(), differentiable_rope():
        seed = training_host.data_seed(config.out, config.seed, config.resume)
        run = training_host.prepare(experts, clip, vae, config, seed, comm, status)
        meta = {"data": run.data_meta, **run.objective}
        return train_aggregator(run.experts, run.layout, run.data, run.schedule, config, config.out, run.info,
                                resume=config.resume, should_stop=should_stop, progress=progress, device=run.device,
                                comm=comm, extra_meta=meta)


def evaluate(experts: models.ExpertSet, clip, vae, config: TrainConfig, aggregator=None,
             status: Optional[Callable[[str], None]] = None, comm: Optional[Comm] = None) -> Optional[dict]:
    """The validation table on config.dataset's held-out images: `aggregator` (an AggregatorFile,
    a name in models/afa or a path; None: the references only), the block-wise average and
    each expert alone. The split and draws use the seed the file was trained with (else
    config.seed), so a trained file's table is the one its training wrote. None without a
    validation set."""
    config = config.for_run(("dataset",))
    agg_file = aggregator if isinstance(aggregator, AggregatorFile) or aggregator is None \
        else models.load_aggregator_file(aggregator)
    seed = config.seed
    if agg_file is not None:
        check_fits(agg_file, training_host.experts_layout(experts), experts.names,
                   experts.hashes if all(experts.hashes) else None)
        seed = int(agg_file.training.get("config", {}).get("seed", seed))
    with torch.inference_mode(False), torch.enable_grad():
        run = training_host.prepare(experts, clip, vae, config, seed, comm, status)
        if status:
            status(f"validating on {len(run.data.val)} held-out sample(s)")
        module = agg_file.build() if agg_file is not None else None
        return evaluate_aggregator(run.experts, run.layout, run.data, run.schedule, config, module, run.info,
                                   run.device, comm, seed)


def render_loss_curve(history, val_history, title="AFA aggregator training", size=CURVE_SIZE) -> torch.Tensor:
    """Train loss (line) and validation loss (dots) per step -> IMAGE [1, H, W, 3] float 0..1."""
    w, h = size
    img = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 64, 16, 30, 40
    draw.text((left, 8), title, fill=(25, 25, 25), font=font)
    points = [(s, v) for s, v in list(history) + list(val_history) if v is not None and math.isfinite(v)]
    if not points:
        draw.text((left, h // 2), "no steps trained yet", fill=(90, 90, 90), font=font)
        return to_image(img)
    log = min(v for _, v in points) > 0 and max(v for _, v in points) / min(v for _, v in points) > 20
    tf = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = min(tf(v) for _, v in points), max(tf(v) for _, v in points)
    hi = hi if hi > lo else lo + 1e-6
    s_max = max(1, max(s for s, _ in points))

    def xy(s, v):
        return (left + (w - left - right) * s / s_max, top + (h - top - bottom) * (1 - (tf(v) - lo) / (hi - lo)))
    draw.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    for frac in (0.0, 0.5, 1.0):
        value = lo + (hi - lo) * frac
        label = f"{10 ** value:.3g}" if log else f"{value:.3g}"
        y = top + (h - top - bottom) * (1 - frac)
        draw.text((4, y - 6), label, fill=(60, 60, 60), font=font)
    draw.text((left, h - bottom + 6), "0", fill=(60, 60, 60), font=font)
    draw.text((w - right - 40, h - bottom + 6), f"step {s_max}", fill=(60, 60, 60), font=font)
    train_line = [xy(s, v) for s, v in history if v is not None and math.isfinite(v)]
    if len(train_line) > 1:
        draw.line(train_line, fill=(31, 119, 180), width=2)
    elif train_line:
        x, y = train_line[0]
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(31, 119, 180))
    for s, v in val_history:
        x, y = xy(s, v)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(255, 127, 14))
    draw.text((left + 8, h - 18), "train loss (line)   validation loss (dots)", fill=(60, 60, 60), font=font)
    return to_image(img)
