"""Models: checkpoints and aggregators found in ComfyUI's model folders and loaded in ONE place,
and AFA ensembles built from them (`load_ensemble`, `ensemble_of_models`), or the experts alone
for training (`load_experts`, `experts_of`).

Files are found through ComfyUI's `folder_paths` (its model folders plus extra_model_paths.yaml);
a path to an existing file is accepted too (the CLI passes paths).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import comfy.sd
import folder_paths
import torch
from safetensors import SafetensorError

from ..core.aggregator_file import AggregatorFile, load_aggregator
from ..core.errors import AFAError
from ..core.files import file_sha256
from ..core.spec import EnsembleSpec, check_model_count
from ..ensemble_model import build_ensemble, require_ensemble
from ..per_model_clip import PerModelCLIP

NONE = "none"
AFA_FOLDER = "afa"


def register_afa_folder():
    """models/afa for aggregators, added to (never replacing) an entry from extra_model_paths.yaml.
    Idempotent; called where ComfyUI (or a front end) starts the pack, not at import."""
    default = os.path.join(folder_paths.models_dir, AFA_FOLDER)
    paths, extensions = folder_paths.folder_names_and_paths.get(AFA_FOLDER, ([], set()))
    if default not in paths:
        paths = list(paths) + [default]
    folder_paths.folder_names_and_paths[AFA_FOLDER] = (paths, {".safetensors"} | set(extensions or ()))


def checkpoint_names() -> list:
    return folder_paths.get_filename_list("checkpoints")


def aggregator_names() -> list:
    register_afa_folder()
    return folder_paths.get_filename_list(AFA_FOLDER)


def resolve_file(folder: str, name_or_path) -> Path:
    """A file from ComfyUI's `folder` by name, or an existing path; AFAError naming both otherwise."""
    text = str(name_or_path or "").strip()
    if not text or text == NONE:
        raise AFAError(f"no {folder} file given.")
    found = folder_paths.get_full_path(folder, text)
    if found:
        return Path(found)
    if os.path.isfile(text):
        return Path(text).resolve()
    raise AFAError(f"{folder} file '{text}' not found: it is neither in ComfyUI's {folder} folders "
                   f"({', '.join(folder_paths.get_folder_paths(folder))}) nor an existing path.")


def load_aggregator_file(name_or_path) -> Optional[AggregatorFile]:
    """An aggregator from models/afa by name (or a path); None for 'none'/''."""
    if name_or_path in (None, "", NONE):
        return None
    register_afa_folder()
    return load_aggregator(resolve_file(AFA_FOLDER, name_or_path))


def files_fingerprint(folder, names) -> str:
    """Changes when a chosen file is replaced or rewritten, so a result is redone (the nodes' change
    detection: ComfyUI caches by inputs; the studio's model cache). Aggregators (MBs) by content
    sha256; checkpoints (GBs, never hashed here) by inode, size, mtime and ctime (which a rewrite
    always changes, even when size and mtime are put back)."""
    out = []
    for name in names:
        if name and name != NONE:
            path = folder_paths.get_full_path(folder, name) or (name if os.path.isfile(str(name)) else None)
            if path and os.path.exists(path):
                st = os.stat(path)
                out.append(f"{name}:{file_sha256(path)}" if folder == AFA_FOLDER else
                           f"{name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    return "|".join(out)


@dataclass
class Checkpoint:
    """One loaded checkpoint file: ComfyUI's MODEL, CLIP and VAE (CLIP/VAE None when absent)."""
    name: str
    path: Path
    model: object
    clip: object
    vae: object


def load_checkpoint(name_or_path) -> Checkpoint:
    """The one checkpoint loader of the pack (nodes, CLI, studio, training)."""
    path = resolve_file("checkpoints", name_or_path)
    try:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
    except (ValueError, RuntimeError, OSError, SafetensorError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AFAError(f"checkpoint '{path.name}' cannot be loaded ({reason}): the file is truncated, damaged or "
                       "not a diffusion checkpoint. Re-download it or choose another checkpoint.") from e
    if model is None:
        raise AFAError(f"'{path.name}' holds no diffusion model (is it a VAE or text encoder file?).")
    return Checkpoint(str(name_or_path), path, model, clip, vae)


def load_checkpoints(names) -> list:
    """Checkpoints in order; one file chosen twice is loaded once (the same Checkpoint twice)."""
    loaded = {}
    for name in names:
        if name not in loaded:
            loaded[name] = load_checkpoint(name)
    return [loaded[name] for name in names]


def per_model_clip(checkpoints: list):
    """Each model's own text encoder behind one CLIP; model 1's when some file has no CLIP."""
    clips = [c.clip for c in checkpoints]
    return merge_clips(clips) if all(c is not None for c in clips) else clips[0]


def merge_clips(clips: list):
    """2-6 CLIPs (in the order of the ensemble's models) -> one CLIP encoding with each of them."""
    check_model_count(len(clips), "merging text encoders")
    return PerModelCLIP.from_clips(clips)


@dataclass
class LoadedEnsemble:
    model: object        # the AFA MODEL
    clip: object         # PerModelCLIP (each model's own text encoder), or the shared one of split files
    vae: object          # model 1's VAE
    checkpoints: list    # Checkpoint per expert


def load_ensemble(spec: EnsembleSpec) -> LoadedEnsemble:
    """Checkpoints (+ aggregator) of `spec` -> the AFA MODEL, the per-model CLIP and model 1's VAE."""
    spec = spec.checked()
    if spec.mode.needs_aggregator:
        load_aggregator_file(spec.aggregator)  # fail fast, before loading any checkpoint
    return ensemble_of_checkpoints(load_checkpoints(spec.checkpoints), spec)


def ensemble_of_checkpoints(ckpts: list, spec: EnsembleSpec, shared_clip: bool = False) -> LoadedEnsemble:
    """Loaded checkpoints (in the order of the ensemble's models; each may carry its own LoRA, see
    `with_loras`) + how to combine them -> the AFA MODEL, the per-model CLIP and model 1's VAE.
    `shared_clip`: the models share model 1's text encoder (DiT split files, split_files.load_split_files)."""
    spec = spec.checked(len(ckpts))
    agg_file = load_aggregator_file(spec.aggregator) if spec.mode.needs_aggregator else None
    hashes = [file_sha256(c.path) for c in ckpts] if agg_file is not None else None
    names = [c.path.name for c in ckpts]
    model = build_ensemble([c.model for c in ckpts], names, spec, agg_file, hashes, [str(c.path) for c in ckpts])
    return LoadedEnsemble(model, ckpts[0].clip if shared_clip else per_model_clip(ckpts), ckpts[0].vae, ckpts)


def ensemble_of_models(models: list, names: list, spec: EnsembleSpec, aggregator: Optional[AggregatorFile] = None):
    """MODELs already loaded (each may carry its own LoRA) -> the AFA MODEL."""
    check_model_count(len(models))
    return build_ensemble(models, names, spec, aggregator)


@dataclass
class ExpertSet:
    """The frozen experts of a training run: ModelPatchers in order, their names, sha256 (None
    where the file is unknown) and paths (None where unknown)."""
    patchers: list
    names: list
    hashes: list
    sources: list

    @property
    def models(self):
        return [p.model for p in self.patchers]


def experts_of(model) -> ExpertSet:
    """The experts behind an AFA MODEL (the node trains the ensemble it is given)."""
    ensemble = require_ensemble(model, "AFA Train Aggregator")
    patchers = [model] + [p for p in model.get_additional_models_with_key("afa")
                          if p.model is not getattr(ensemble.aggregator_patcher, "model", None)]
    by_model = {id(p.model): p for p in patchers}
    sources = ensemble.sources or [None] * ensemble.num_models
    hashes = [h or (file_sha256(s) if s else None) for h, s in zip(ensemble.hashes, sources)]
    return ExpertSet([by_model[id(m)] for m in ensemble.models], list(ensemble.names), hashes, list(sources))


def experts_from_files(names) -> tuple:
    """Checkpoint files -> (ExpertSet, per-model CLIP, model 1's VAE), no ensemble MODEL built."""
    check_model_count(len(names), "training an aggregator")
    ckpts = load_checkpoints(names)
    for c in ckpts:
        if c.clip is None or c.vae is None:
            raise AFAError(f"{c.path.name} has no text encoder or no VAE: training needs full checkpoints.")
    experts = ExpertSet([c.model for c in ckpts], [c.path.name for c in ckpts],
                        [file_sha256(c.path) for c in ckpts], [str(c.path) for c in ckpts])
    return experts, per_model_clip(ckpts), ckpts[0].vae


# ---------------------------------------------------------------- LoRAs, memory, demo checkpoints (studio)
DEMO_DIR = Path.home() / ".cache" / "comfyui-afa" / "demo-checkpoints"
DEMO_COUNT = 3


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA from ComfyUI's loras folders and its strength (on the model and the text encoder)."""
    name: str
    strength: float = 1.0


def lora_names() -> list:
    return folder_paths.get_filename_list("loras")


def with_loras(ckpt: Checkpoint, loras) -> Checkpoint:
    """ComfyUI's Load LoRA nodes applied in order to a loaded checkpoint: a Checkpoint whose MODEL
    and CLIP are patched clones (`ckpt` itself stays as loaded, so a cache can keep it)."""
    import nodes  # ComfyUI's built-in nodes (imported once ComfyUI is booted)
    model, clip = ckpt.model, ckpt.clip
    for lora in loras:
        if lora.name not in lora_names():
            raise AFAError(f"LoRA '{lora.name}' not found in ComfyUI's loras folders "
                           f"({', '.join(folder_paths.get_folder_paths('loras'))}).")
        if clip is None:
            model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora.name, float(lora.strength))[0]
        else:
            model, clip = nodes.LoraLoader().load_lora(model, clip, lora.name, float(lora.strength),
                                                       float(lora.strength))
    return replace(ckpt, model=model, clip=clip)


def checkpoint_bytes(ckpt: Checkpoint) -> int:
    """Memory of a loaded checkpoint's weights (diffusion model + text encoder + VAE), as ComfyUI's
    model patchers count them."""
    total = ckpt.model.model_size()
    for part in (ckpt.clip, ckpt.vae):
        patcher = getattr(part, "patcher", None)
        if patcher is not None and getattr(patcher, "model", None) is not None:
            total += patcher.model_size()
    return int(total)


def checkpoint_folders() -> list:
    """Where ComfyUI (and so every front end) looks for checkpoints."""
    return list(folder_paths.get_folder_paths("checkpoints"))


def add_demo_checkpoints(folder=None) -> list:
    """The synthetic SD1.5-layout demo checkpoints (random weights; built once into `folder`,
    default DEMO_DIR, ~290 MB each) added to ComfyUI's checkpoints folders for this process.
    Returns their names as the checkpoint lists show them."""
    from ..demo_checkpoints import ensure_demo_checkpoints
    folder = Path(folder or DEMO_DIR).expanduser().resolve()
    paths = ensure_demo_checkpoints(folder, "sd15", DEMO_COUNT)
    if str(folder) not in checkpoint_folders():
        folder_paths.add_model_folder_path("checkpoints", str(folder))
    return [p.name for p in paths]


def free_memory():
    """Let ComfyUI drop the models nobody holds any more (after a cache let go of checkpoints)."""
    import gc

    import comfy.model_management
    gc.collect()
    comfy.model_management.cleanup_models()
    comfy.model_management.soft_empty_cache()
