"""Win maps and held-out evaluation: what every front end calls (core.winmap does the measuring).

- `win_map(experts, clip, vae, settings, ensemble=None, ...) -> WinMapResult`: for the experts
  (service.models.ExpertSet) and the images of `settings.dataset` (images with same-name .txt
  captions, as training reads them), each model's per-region denoising error at
  `settings.steps` steps and `settings.seeds` noise seeds; the winners per region and step, the
  proportion of wins, the verdict. With `ensemble` (an EnsembleSpec: any mode, any aggregator)
  the ensemble is measured on the same draws beside each expert: the held-out evaluation table
  and its bar plot (give a folder of images the aggregator was NOT trained on).
- `ensemble_spec_of(model)`: the spec of an AFA MODEL (the nodes evaluate the ensemble they get).
- `settings_from_ui(values)`: the node's and the studio's option values -> WinMapSettings.

The images and captions are encoded once (cached) by the training adapter (training_host:
centre crop at `resolution`, the experts' own VAE and text encoders; a Kohya 'N_name' folder's
images count N times); nothing is trained.
Callbacks as in training: progress(done, total) after each (image, step), should_stop()
polled before each (a stop returns the partial table, `stopped` set), status(text).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import logger, training_host
from ..core.aggregator_file import check_fits
from ..core.ensemble import EnsembleExecutor, mixer_for
from ..core.errors import AFAError
from ..core.spec import EnsembleSpec, Mode
from ..core.train_config import TrainConfig
from ..core.winmap import GRID, ErrorTable, Ensembled, measure
from ..core.winmap_render import render_eval_plot, render_overview, render_share_plot, render_steps
from ..ensemble_model import require_ensemble
from . import models
from .training import dataset_in_input_dir

__all__ = ["WinMapResult", "WinMapSettings", "ensemble_spec_of", "format_table", "settings_from_ui", "win_map"]

MAX_SEEDS = 64


@dataclass
class WinMapSettings:
    dataset: Path                      # folder of images with captions (resolved)
    steps: int = 4                     # noise levels, spread over the schedule (core.winmap.step_indices)
    seeds: tuple = (0, 1)              # noise seeds per image
    grid: int = GRID                   # regions per side
    resolution: int = 512              # images are centre-cropped to this square size
    max_images: int = 0                # 0: every image of the folder


@dataclass
class WinMapResult:
    table: ErrorTable
    winners: torch.Tensor              # IMAGE [steps, H, W, 3]: who wins each region, per step
    share_plot: torch.Tensor           # IMAGE [1, H, W, 3]: proportion of wins per model per step
    overview: torch.Tensor             # IMAGE [1, H, W, 3]: steps side by side + the share plot
    verdict: str
    evaluation: Optional[torch.Tensor] = None   # IMAGE: the evaluation bars (with an ensemble)
    report: str = ""                   # the evaluation table as text


def settings_from_ui(values: dict) -> WinMapSettings:
    """{dataset_folder, steps, seeds, seed, grid, resolution, max_images} (a folder name inside
    ComfyUI's input directory; `seeds` noise seeds from `seed` on) -> WinMapSettings."""
    count, first = int(values.get("seeds", 2)), int(values.get("seed", 0))
    if not 1 <= count <= MAX_SEEDS:
        raise AFAError(f"seeds must be 1..{MAX_SEEDS} noise seeds per image, got {count}.")
    resolution = int(values.get("resolution", 512))
    if resolution < 8 or resolution % 8:
        raise AFAError(f"resolution must be a multiple of 8 (the latent is 1/8 of the image), got {resolution}.")
    return WinMapSettings(dataset=dataset_in_input_dir(values.get("dataset_folder")), steps=int(values.get("steps", 4)),
                          seeds=tuple(range(first, first + count)), grid=int(values.get("grid", GRID)),
                          resolution=resolution, max_images=int(values.get("max_images", 0)))


def ensemble_spec_of(model) -> EnsembleSpec:
    """The EnsembleSpec (mode, aggregator, weights) of an AFA MODEL."""
    return require_ensemble(model, "AFA Evaluate").spec


def _ensembled(spec: EnsembleSpec, experts, layout) -> tuple:
    """(Ensembled, its aggregator module or None): the ensemble as the core measures it, the
    spec's mixer (an aggregator file checked against the experts) over all experts, or one
    expert for mode 'single model'. Built before anything is encoded: a bad file fails fast."""
    n = len(experts.names)
    spec = spec.checked(n)
    aggregator, name = None, f"ensemble: {spec.mode.value}"
    if spec.mode is Mode.AGGREGATOR:
        agg_file = models.load_aggregator_file(spec.aggregator)
        check_fits(agg_file, layout, experts.names, experts.hashes if all(experts.hashes) else None)
        aggregator = agg_file.build().float().eval()
        name = f"ensemble: {Path(str(spec.aggregator)).stem}"
    indices = [spec.single_index] if spec.mode is Mode.SINGLE_MODEL else list(range(n))
    if spec.mode is Mode.SINGLE_MODEL:
        name = f"ensemble: {Mode.SINGLE_MODEL.value} {spec.model_index}"
    return Ensembled(name, EnsembleExecutor(layout, mixer_for(spec, layout, n, aggregator)), indices), aggregator


def win_map(experts: models.ExpertSet, clip, vae, settings: WinMapSettings, ensemble: Optional[EnsembleSpec] = None,
            progress: Optional[Callable[[int, int], None]] = None, should_stop: Optional[Callable[[], bool]] = None,
            status: Optional[Callable[[str], None]] = None) -> WinMapResult:
    """The win map of `experts` on settings.dataset (see the module); with `ensemble`, its
    held-out evaluation beside each expert."""
    config = TrainConfig(dataset=str(settings.dataset), resolution=settings.resolution, val_fraction=0.0,
                         crop="center", buckets=False, caption_dropout=0.0).for_run(("dataset",))
    ens, aggregator = (None, None) if ensemble is None else _ensembled(ensemble, experts,
                                                                        training_host.experts_layout(experts))
    with torch.inference_mode(False):
        run = training_host.prepare(experts, clip, vae, config, comm=None, status=status)
        if aggregator is not None:
            aggregator.to(run.device)
        samples = run.data.train
        if settings.max_images:
            samples = [samples[k] for k in range(min(settings.max_images, len(samples)))]
        what = (f"measuring {len(experts.names)} models{' and the ensemble' if ens else ''} on {len(samples)} "
                f"image(s) x {len(settings.seeds)} seed(s) x {settings.steps} step(s)")
        logger.info("%s", what)
        if status:
            status(what)
        table = measure(run.experts, run.layout, run.schedule, samples, experts.names, settings.steps,
                        settings.seeds, settings.grid, ens, progress, should_stop, run.device)
    verdict = table.verdict()
    logger.info("win map of %s on %s: %s", ", ".join(experts.names), settings.dataset.name, verdict)
    result = WinMapResult(table, render_steps(table), render_share_plot(table), render_overview(table), verdict)
    if ens is not None:
        result.evaluation = render_eval_plot(table)
        result.report = format_table(table)
    return result


def format_table(table: ErrorTable) -> str:
    """The evaluation table as text: mean error per predictor (ensemble first), per step, best marked."""
    rows = table.rows()
    width = max(len(r["name"]) for r in rows)
    steps = "  ".join(f"t={t:<6}" for t in table.timesteps)
    lines = [f"held-out {table.objective} on {table.images} image(s) x {table.seeds} seed(s) (lower is better)"
             + (" - CANCELLED, partial" if table.stopped else ""),
             f"  {'':<{width}}  {'mean':<8}  {steps}"]
    best = min(r["loss"] for r in rows)
    for r in rows:
        per = "  ".join(f"{v:<8.4g}" for v in r["per_step"])
        lines.append(f"  {r['name']:<{width}}  {r['loss']:<8.4g}  {per}{'  <- best' if r['loss'] == best else ''}")
    return "\n".join(lines)
