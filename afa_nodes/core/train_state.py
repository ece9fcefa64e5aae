"""Files of a training run, host-free: what a resume reads back and what it refuses.

`<out>.safetensors` is a normal aggregator file whose "training" metadata holds the step,
the samples consumed (`samples_seen`), the seed and the data settings. The sidecar
`<out>.safetensors.train-state` (torch.save of plain containers, read with
weights_only=True) holds what the file cannot: the sample position, AdamW and grad-scaler
state, the loss histories. The trainer writes the sidecar first and the aggregator second,
both atomically; a sidecar whose step differs from the file's is ignored with a warning
(it only costs the optimizer moments, the run continues).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import logger
from .aggregator_file import AggregatorFile, check_fits, load_aggregator
from .files import atomic_write
from .errors import TrainingError

STATE_SUFFIX = ".train-state"
STATE_FORMAT = 1
DATA_SETTINGS = ("dataset", "resolution", "crop", "crop_variants", "buckets")  # compared on resume


def state_path(out_path) -> Path:
    return Path(str(out_path) + STATE_SUFFIX)


@dataclass
class ResumePoint:
    file: AggregatorFile
    step: int
    position: int               # samples consumed (the sidecar's value wins when it is usable)
    seed: int                   # the file's seed: data order and noise continue with it
    history: list
    batch_size: Optional[int]   # the saved run's micro-batch size


def read_resume_file(path, expert_info, layout, seed: int, global_batch: int, data_meta: dict) -> ResumePoint:
    """The file to continue; refuses other experts or a layout it does not fit."""
    path = Path(path)
    agg_file = load_aggregator(path)
    check_resume_experts(agg_file.experts, expert_info, path)
    check_fits(agg_file, layout, [e["name"] for e in expert_info])
    meta, config = agg_file.training, agg_file.training.get("config", {})
    step = int(meta.get("step", 0))
    saved_seed = int(config.get("seed", seed))
    if saved_seed != seed:
        logger.warning("resume: %s was trained with seed %d; continuing with it (not %d) so the data "
                       "order and noise continue exactly", path.name, saved_seed, seed)
    _warn_changed_data(meta.get("data", {}), data_meta, path)
    return ResumePoint(file=agg_file, step=step, position=int(meta.get("samples_seen", step * global_batch)),
                       seed=saved_seed, history=[list(h) for h in meta.get("loss_curve", [])],
                       batch_size=config.get("batch_size"))


def read_sidecar(out_path, step: int, device) -> Optional[dict]:
    """The sidecar of `out_path` at `step`, or None (with the reason logged) when unusable."""
    path, name = state_path(out_path), Path(out_path).name
    if not path.exists():
        logger.warning("resume: no optimizer state %s; continuing %s from step %d with a fresh optimizer "
                       "(the result will differ slightly from an uninterrupted run)", path.name, name, step)
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a damaged sidecar only costs the optimizer moments
        logger.warning("resume: cannot read %s (%s); continuing with a fresh optimizer", path.name, e)
        return None
    if state.get("step") != step or state.get("format") != STATE_FORMAT:
        logger.warning("resume: %s is from step %s but %s from step %d (interrupted save?); continuing "
                       "with a fresh optimizer", path.name, state.get("step"), name, step)
        return None
    return state


def write_sidecar(out_path, state: dict):
    atomic_write(state_path(out_path), lambda tmp: torch.save(dict(state, format=STATE_FORMAT), tmp))


def _describe_experts(experts):
    return ", ".join(f"{e.get('name')} (sha256 {str(e.get('sha256') or '?')[:12]})" for e in experts)


def _warn_changed_data(saved: dict, now: dict, path):
    """A resume on other data settings is allowed (e.g. a later phase at another size) but not exact."""
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in DATA_SETTINGS
               if k in saved and k in now and saved[k] != now[k]]
    if changed:
        logger.warning("resume: %s was trained with other data settings (%s); it continues on the new ones, "
                       "so the run is not an exact continuation", Path(path).name, ", ".join(changed))


def check_resume_experts(file_experts, experts, path):
    """Refuse to resume a file trained on other experts (sha256 when known, else names)."""
    use_hash = all(e.get("sha256") for e in list(file_experts) + list(experts))
    key = "sha256" if use_hash else "name"
    if [e.get(key) for e in file_experts] != [e.get(key) for e in experts]:
        raise TrainingError(
            f"cannot resume {Path(path).name}: it was trained on [{_describe_experts(file_experts)}] but the "
            f"models now are [{_describe_experts(experts)}]. Resume with the same checkpoints in the same "
            "order, choose another save name, or turn resume off to start over (overwrites the file).")
