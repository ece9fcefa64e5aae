"""Training: what every front end calls to train or evaluate an aggregator.

- `train(experts, clip, vae, config, progress, should_stop, status, comm) -> TrainResult`:
  train (or resume) the aggregator of `experts` (service.models.ExpertSet) on config.dataset;
  writes config.out (+ its .train-state) at every save.
- `evaluate(experts, clip, vae, config, aggregator)`: the held-out validation table (each
  expert alone, the block-wise average and, when given, an aggregator file) without training.
- The node's and the studio's names resolved: `config_from_ui` (a folder name inside
  ComfyUI's input directory, a save name in models/afa), `dataset_in_input_dir`,
  `aggregator_save_path`, `dataset_fingerprint`; `render_loss_curve` (+ `reference_losses`) for the loss plot.
- Sample images: with config.sample_prompt, every save also renders one image with the file
  just written (`render_sample`, the same sampling as generation) into `samples_dir(out)`.

Callbacks: progress(step, total, loss) after each optimizer step; should_stop() polled before
each step (a stop saves a resumable file); status(text) for what happens between steps;
on_sample(step, png path) after each sample image.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

import folder_paths

from .. import logger, training_host
from ..training_dit import differentiable_rope
from ..core.aggregator_file import AggregatorFile, check_fits
from ..core.errors import DatasetError, TrainingError
from ..core.image_file import save_png
from ..core.spec import EnsembleSpec, Mode
from ..core.train import TrainResult, evaluate_aggregator, format_validation, state_path, train_aggregator
from ..core.train_report import reference_losses, render_loss_curve
from ..core.train_config import NODE, Comm, TrainConfig, from_ui
from . import models, sampling

__all__ = ["TrainConfig", "TrainResult", "aggregator_save_path", "config_from_ui", "dataset_fingerprint",
           "dataset_in_input_dir", "evaluate", "format_validation", "reference_losses", "render_loss_curve",
           "render_sample", "samples_dir", "state_path", "train"]

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
          comm: Optional[Comm] = None, on_sample: Optional[Callable[[int, Path], None]] = None) -> TrainResult:
    """Train (or, with config.resume, continue) an aggregator for `experts` (frozen); see the module."""
    config = config.for_run()

    def sample_at_save(step: int, path: Path):
        if should_stop is not None and should_stop():
            return  # a stop saves at once: no sample to wait for
        if status:
            status(f"step {step}: rendering a sample image")
        try:
            png = render_sample(experts, clip, vae, config, path, step)
        except Exception as e:  # noqa: BLE001 - a sample image is a preview: training goes on without it
            logger.warning("step %d: no sample image (%s: %s); training goes on", step, type(e).__name__, e)
            return
        if on_sample:
            on_sample(step, png)

    with torch.inference_mode(False), torch.enable_grad(), differentiable_rope():
        seed = training_host.data_seed(config.out, config.seed, config.resume)
        run = training_host.prepare(experts, clip, vae, config, seed, comm, status)
        meta = {"data": run.data_meta, **run.objective}
        return train_aggregator(run.experts, run.layout, run.data, run.schedule, config, config.out, run.info,
                                resume=config.resume, should_stop=should_stop, progress=progress, device=run.device,
                                comm=comm, extra_meta=meta, on_save=sample_at_save if config.sample_prompt else None)


def samples_dir(out_path) -> Path:
    """Where a run's sample images go: models/afa/<name>.samples/ beside <name>.safetensors."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".samples")


def render_sample(experts: models.ExpertSet, clip, vae, config: TrainConfig, aggregator_path, step: int) -> Path:
    """One image of config.sample_prompt from the ensemble with the aggregator file just saved
    (the run's seed and resolution, config.sample_steps and sample_cfg) -> samples_dir/step_NNNNNN.png,
    written atomically with its settings. The experts are then loaded for training again."""
    settings = sampling.SampleSettings(prompt=config.sample_prompt, width=config.resolution,
                                       height=config.resolution, steps=config.sample_steps,
                                       cfg=config.sample_cfg, seed=config.seed).checked()
    try:
        spec = EnsembleSpec(mode=Mode.AGGREGATOR, aggregator=str(aggregator_path))
        model = models.ensemble_of_models(experts.patchers, experts.names, spec,
                                          models.load_aggregator_file(aggregator_path))
        _, images = sampling.sample(model, clip, vae, settings)
    finally:
        training_host.ready_for_training(experts)  # sampling may have moved or re-created the weights
    out = samples_dir(config.out) / f"step_{step:06d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(images[0], out, {"afa": {"sample": asdict(settings), "step": step, "experts": list(experts.names),
                                      "aggregator": Path(aggregator_path).name}})
    logger.info("step %d: sample image %s", step, out)
    return out


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
