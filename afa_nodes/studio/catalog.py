"""What ComfyUI offers the studio: checkpoints, DiT split files (diffusion models, text
encoders, VAEs), aggregators, samplers, dataset folders.

Everything is listed through ComfyUI's `folder_paths` (its model folders plus
extra_model_paths.yaml), never from other places. `get_filename_list` is cached by
folder mtime, so a newly trained aggregator shows up at the next call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import folder_paths

from ..core.errors import AFAError
from ..core.spec import CLIP_TYPES as SPEC_CLIP_TYPES, MAX_MODELS, MIN_MODELS, MODE_NAMES, Mode, parse_mode
from ..service import models, split_files
from ..service.sampling import samplers, schedulers

NONE = models.NONE
MODES = MODE_NAMES
CLIP_TYPES = list(SPEC_CLIP_TYPES)   # text encoder types of split files (ComfyUI's CLIP loaders'; "auto" first)
MAX_TEXT_ENCODERS = 3                  # ComfyUI's TripleCLIPLoader

__all__ = ["NONE", "MODES", "CLIP_TYPES", "checkpoints", "diffusion_models", "text_encoders", "vaes", "aggregators",
           "loras", "controlnets", "samplers", "schedulers", "dataset_folders", "checkpoint_folders",
           "check_checkpoints", "check_sources", "check_split_files", "check_aggregator", "SplitFiles"]


def checkpoints() -> list[str]:
    return models.checkpoint_names()


def diffusion_models() -> list[str]:
    """Diffusion model files of DiTs shared as split files (models/diffusion_models)."""
    return split_files.split_file_names("diffusion_models")


def text_encoders() -> list[str]:
    return split_files.split_file_names("text_encoders")


def vaes() -> list[str]:
    """`none` followed by ComfyUI's VAE files (models/vae)."""
    return [NONE] + split_files.split_file_names("vae")


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


# ---------------------------------------------------------------- DiT split files
@dataclass(frozen=True)
class SplitFiles:
    """An ensemble of diffusion model files sharing text encoder file(s) and a VAE (names from
    ComfyUI's folders), as Load Diffusion Model, (Dual/Triple)CLIPLoader and Load VAE load them."""
    diffusion_models: tuple
    text_encoders: tuple
    vae: str
    clip_type: str = "auto"

    def label(self) -> str:
        return f"{len(self.diffusion_models)} diffusion models, text encoder type {self.clip_type}"


def _chosen(names) -> list:
    if isinstance(names, str):
        names = [names]
    return [n for n in (names or []) if n and n != NONE]


def check_sources(checkpoints, diffusion_models=(), text_encoders=(), vae=None,
                  clip_type="auto") -> tuple[list, Optional[SplitFiles]]:
    """The models of an ensemble: (checkpoint names, None) or ([], SplitFiles). Exactly one kind
    must be given (a split-file choice is any diffusion model, text encoder or VAE chosen; the
    text encoder type alone is not one); AFAError saying what to choose otherwise."""
    split = _chosen(diffusion_models) or _chosen(text_encoders) or _chosen(vae)
    if _chosen(checkpoints) and split:
        raise AFAError("choose either checkpoints to ensemble or DiT split files (diffusion model files with their "
                       "text encoder(s) and VAE), not both: an ensemble is of one kind. Clear one of the two.")
    if split:
        return [], check_split_files(diffusion_models, text_encoders, vae, clip_type)
    if not _chosen(checkpoints):
        raise AFAError(f"choose at least {MIN_MODELS} checkpoints to ensemble (models/checkpoints), or under 'DiT "
                       f"split files' {MIN_MODELS}-{MAX_MODELS} diffusion model files (models/diffusion_models) with "
                       "their text encoder file(s) and VAE.")
    return check_checkpoints(checkpoints), None


def check_split_files(diffusion_models, text_encoders, vae, clip_type="auto") -> SplitFiles:
    """2-6 known diffusion model files, 1-3 known text encoder files, a known VAE and one of
    CLIP_TYPES; AFAError naming what is missing and where the files are read from."""
    dms, tes, vae_name = _chosen(diffusion_models), _chosen(text_encoders), (_chosen(vae) or [None])[0]
    if not MIN_MODELS <= len(dms) <= MAX_MODELS:
        raise AFAError(f"choose {MIN_MODELS}-{MAX_MODELS} diffusion model files to ensemble (chosen: {len(dms)}); "
                       "they share the text encoder(s) and the VAE chosen beside them.")
    if not 1 <= len(tes) <= MAX_TEXT_ENCODERS:
        raise AFAError(f"choose the diffusion models' text encoder file(s): 1-{MAX_TEXT_ENCODERS} (chosen: "
                       f"{len(tes)}; FLUX: clip_l + t5xxl, SD3/SD3.5: clip_l + clip_g + t5xxl, Chroma: t5xxl, "
                       "Qwen-Image: qwen_2.5_vl).")
    if vae_name is None:
        raise AFAError("choose the diffusion models' VAE (models/vae; FLUX: ae.safetensors).")
    if clip_type not in CLIP_TYPES:
        raise AFAError(f"text encoder type '{clip_type}' is not one of {', '.join(CLIP_TYPES)}.")
    for folder, names in (("diffusion_models", dms), ("text_encoders", tes), ("vae", [vae_name])):
        known = set(split_files.split_file_names(folder))
        missing = [n for n in names if n not in known]
        if missing:
            raise AFAError(f"{folder} file(s) {', '.join(missing)} not found in ComfyUI's {folder} folders "
                           f"({', '.join(folder_paths.get_folder_paths(folder))}); the studio loads them from there "
                           "only. Refresh the list or copy the file there.")
    return SplitFiles(tuple(dms), tuple(tes), vae_name, clip_type)
