"""Files of a training run, host-free: what a resume reads back and what it refuses.

`<out>.safetensors` is a normal aggregator file whose "training" metadata holds the step,
the samples consumed (`samples_seen`), the seed and the data settings. The sidecar
`<out>.safetensors.train-state` (torch.save of plain containers, read with
weights_only=True) holds what the file cannot: the sample position, AdamW and grad-scaler
state, the loss histories. The trainer writes the sidecar first and the aggregator second,
both atomically, and keeps the sidecar of the file still on disk as `<sidecar>.prev` until the
aggregator is written too: a process killed between the two writes leaves the file with its
own state (`read_sidecar` takes the one of the file's step). A sidecar of another step is
ignored with a warning (it only costs the optimizer moments, the run continues). Temp files of
a save killed mid-write are removed when the next run starts (`clean_interrupted_saves`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import logger
from .aggregator_file import AggregatorFile, check_fits, load_aggregator
from .files import atomic_write, remove_stale_temps
from .errors import TrainingError

STATE_SUFFIX = ".train-state"
STATE_FORMAT = 1
DATA_SETTINGS = ("dataset", "resolution", "crop", "crop_variants", "buckets")  # compared on resume


def state_path(out_path) -> Path:
    return Path(str(out_path) + STATE_SUFFIX)


def previous_state_path(out_path) -> Path:
    return Path(str(state_path(out_path)) + ".prev")


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
    """The sidecar of `out_path` at `step` (the current one, else the one kept from the previous
    save, which then becomes current), or None (with the reason logged) when unusable."""
    path, name = state_path(out_path), Path(out_path).name
    previous = previous_state_path(out_path)
    if not path.exists() and not previous.exists():
        logger.warning("resume: no optimizer state %s; continuing %s from step %d with a fresh optimizer "
                       "(the result will differ slightly from an uninterrupted run)", path.name, name, step)
        return None
    found = []
    for candidate in (path, previous):
        if not candidate.exists():
            continue
        try:
            state = torch.load(candidate, map_location=device, weights_only=True)
        except Exception as e:  # a damaged sidecar only costs the optimizer moments
            logger.warning("resume: cannot read %s (%s)", candidate.name, e)
            continue
        if state.get("step") == step and state.get("format") == STATE_FORMAT:
            if candidate == previous:  # killed between the sidecar and the aggregator: the pair is this one
                logger.info("resume: %s is from an interrupted save; using %s (step %d)", path.name,
                            previous.name, step)
                os.replace(previous, path)
            return state
        found.append(f"{candidate.name} is from step {state.get('step')}")
    logger.warning("resume: %s but %s is from step %d; continuing with a fresh optimizer",
                   "; ".join(found) or "no readable optimizer state", name, step)
    return None


def write_sidecar(out_path, state: dict):
    """Write the state of the save under way; the current sidecar (the file on disk's) is kept
    as `.prev` until `finish_sidecar` (call it once the aggregator file is written or failed)."""
    path = state_path(out_path)
    if path.exists():
        os.replace(path, previous_state_path(out_path))
    atomic_write(path, lambda tmp: torch.save(dict(state, format=STATE_FORMAT), tmp))


def finish_sidecar(out_path, saved: bool):
    """After the aggregator file: drop the kept sidecar (`saved`), or put it back (the save failed:
    the file on disk is still the previous one)."""
    previous = previous_state_path(out_path)
    if saved:
        previous.unlink(missing_ok=True)
    elif previous.exists():
        os.replace(previous, state_path(out_path))


def clean_interrupted_saves(out_path) -> list:
    """Remove the temp files of saves of `out_path` killed mid-write (only the run writing
    `out_path` may call this); returns their names."""
    removed = remove_stale_temps(out_path) + remove_stale_temps(state_path(out_path))
    if removed:
        logger.warning("removed %d temp file(s) of an interrupted save of %s: %s", len(removed),
                       Path(out_path).name, ", ".join(removed))
    return removed


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
