"""What ComfyUI offers the studio: checkpoints, aggregators, samplers, dataset folders.

Everything is listed through ComfyUI's `folder_paths` (its model folders plus
extra_model_paths.yaml), never from other places. `get_filename_list` is cached by
folder mtime, so a newly trained aggregator shows up at the next call.
"""
from __future__ import annotations

import os

import folder_paths

from ..core.errors import AFAError
from ..core.spec import MAX_MODELS, MIN_MODELS, MODE_NAMES, Mode, parse_mode
from ..service import models
from ..service.sampling import samplers, schedulers

NONE = models.NONE
MODES = MODE_NAMES

__all__ = ["NONE", "MODES", "checkpoints", "aggregators", "loras", "controlnets", "samplers", "schedulers",
           "dataset_folders", "checkpoint_folders", "check_checkpoints", "check_aggregator"]


def checkpoints() -> list[str]:
    return models.checkpoint_names()


def aggregators() -> list[str]:
    """`none` followed by the aggregators in every "afa" model folder."""
    return [NONE] + models.aggregator_names()


def loras() -> list[str]:
    return models.lora_names()


def controlnets() -> list[str]:
    """`none` followed by ComfyUI's ControlNet models."""
    return [NONE] + folder_paths.get_filename_list("controlnet")


def checkpoint_folders() -> list[str]:
    return models.checkpoint_folders()


def dataset_folders() -> list[str]:
    """Subfolders of ComfyUI's input directory (the only place the studio trains from)."""
    base = folder_paths.get_input_directory()
    try:
        return sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def check_checkpoints(names) -> list[str]:
    """The chosen checkpoint names, in order; AFAError unless 2-6 known ones are given."""
    names = [n for n in (names or []) if n and n != NONE]
    if len(names) < MIN_MODELS:
        raise AFAError(f"choose at least {MIN_MODELS} checkpoints to ensemble (chosen: {len(names)}). "
                       "The list shows ComfyUI's checkpoints folders (models/checkpoints and "
                       "extra_model_paths.yaml).")
    if len(names) > MAX_MODELS:
        raise AFAError(f"an AFA ensemble takes at most {MAX_MODELS} checkpoints; {len(names)} are chosen. "
                       "Remove some.")
    known = set(checkpoints())
    missing = [n for n in names if n not in known]
    if missing:
        raise AFAError(f"checkpoint(s) {', '.join(missing)} not found in ComfyUI's checkpoints folders "
                       f"({', '.join(folder_paths.get_folder_paths('checkpoints'))}); the studio loads "
                       "checkpoints from there only. Refresh the list or copy the file there.")
    return names


def check_aggregator(name: str, mode: str) -> str:
    """The aggregator name for `mode`: NONE for training-free modes; AFAError when missing."""
    if not parse_mode(mode).needs_aggregator:
        return NONE
    if name in (None, "", NONE):
        raise AFAError(f"mode '{Mode.AGGREGATOR}' needs a trained aggregator: pick one from the list (models/afa), "
                       "train one in the Train tab, or choose a training-free mode such as "
                       f"'{Mode.BLOCK_AVERAGE}'.")
    if name not in aggregators():
        raise AFAError(f"aggregator '{name}' not found in ComfyUI's afa model folders "
                       f"({', '.join(folder_paths.get_folder_paths('afa'))}). Refresh the list.")
    return name
