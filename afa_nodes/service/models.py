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
from ..core.spec import CLIP_TYPES, EnsembleSpec, check_model_count  # noqa: F401 - CLIP_TYPES: for front ends
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
    clip: object         # PerModelCLIP (each model's own text encoder)
    vae: object          # model 1's VAE
    checkpoints: list    # Checkpoint per expert


def load_ensemble(spec: EnsembleSpec) -> LoadedEnsemble:
    """Checkpoints (+ aggregator) of `spec` -> the AFA MODEL, the per-model CLIP and model 1's VAE."""
    spec = spec.checked()
    if spec.mode.needs_aggregator:
        load_aggregator_file(spec.aggregator)  # fail fast, before loading any checkpoint
    return ensemble_of_checkpoints(load_checkpoints(spec.checkpoints), spec)


def ensemble_of_checkpoints(ckpts: list, spec: EnsembleSpec) -> LoadedEnsemble:
    """Loaded checkpoints (in the order of the ensemble's models; each may carry its own LoRA, see
    `with_loras`) + how to combine them -> the AFA MODEL, the per-model CLIP and model 1's VAE."""
    spec = spec.checked(len(ckpts))
    agg_file = load_aggregator_file(spec.aggregator) if spec.mode.needs_aggregator else None
    hashes = [file_sha256(c.path) for c in ckpts] if agg_file is not None else None
    names = [c.path.name for c in ckpts]
    model = build_ensemble([c.model for c in ckpts], names, spec, agg_file, hashes, [str(c.path) for c in ckpts])
    return LoadedEnsemble(model, per_model_clip(ckpts), ckpts[0].vae, ckpts)


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


# ---------------------------------------------------------------- split DiT files
# A DiT is shared as a diffusion model file (models/diffusion_models), text encoder files
# (models/text_encoders) and a VAE (models/vae), loaded by "Load Diffusion Model", "Load CLIP" /
# DualCLIPLoader / TripleCLIPLoader (with a type) and "Load VAE"; `experts_from_split_files`
# loads them the same way. The text encoder type for "auto", by the experts' family:
CLIP_TYPE_OF_FAMILY = {"flux": "flux", "chroma": "chroma", "mmdit": "sd3", "qwen_image": "qwen_image"}
SPLIT_FOLDERS = ("diffusion_models", "text_encoders", "vae")


def split_file_names(folder: str) -> list:
    """The files of one of ComfyUI's SPLIT_FOLDERS (models/diffusion_models, text_encoders, vae and
    extra_model_paths.yaml), as its loaders list them."""
    if folder not in SPLIT_FOLDERS:
        raise ValueError(f"not a split-file folder: {folder}")
    return folder_paths.get_filename_list(folder)


def experts_from_split_files(diffusion_models, text_encoders, vae, clip_type: str = "auto") -> tuple:
    """Diffusion model files + text encoder file(s) + a VAE file -> (ExpertSet, the text encoder
    shared by every expert, the VAE), as experts_from_files gives for checkpoints. `clip_type`:
    ComfyUI's CLIP loader type (flux, sd3, chroma, ...; "auto": from the experts' family).
    AFAError naming the file and the fix for a file of the wrong kind, experts of different
    architectures, a text encoder or VAE that does not fit the experts."""
    from ..core.layout import check_same_layout, derive_layout

    check_model_count(len(diffusion_models), "training an aggregator")
    if not text_encoders or not vae:
        raise AFAError("diffusion model files need their text encoder file(s) and a VAE file: give both "
                       "(e.g. FLUX: clip_l + t5xxl and ae.safetensors; SD3.5: clip_l + clip_g + t5xxl and its VAE).")
    loaded = {}
    for name in diffusion_models:
        if name not in loaded:
            loaded[name] = _load_diffusion_model(name)
    paths = [loaded[name][0] for name in diffusion_models]
    patchers = [loaded[name][1] for name in diffusion_models]
    names = [p.name for p in paths]
    layouts = [derive_layout(p.model.diffusion_model, f"'{n}'") for p, n in zip(patchers, names)]
    check_same_layout(layouts, names)
    layout = layouts[0]
    clip_type = CLIP_TYPE_OF_FAMILY.get(layout.family, "stable_diffusion") if clip_type == "auto" else clip_type
    clip = _load_text_encoders(text_encoders, clip_type, layout, names[0])
    vae_model = _load_vae(vae, patchers[0], names[0])
    experts = ExpertSet(patchers, names, [file_sha256(p) for p in paths], [str(p) for p in paths])
    return experts, clip, vae_model


def _load_diffusion_model(name):
    path = resolve_file("diffusion_models", name)
    try:
        return path, comfy.sd.load_diffusion_model(str(path))
    except (RuntimeError, ValueError, KeyError) as e:
        raise AFAError(f"'{path.name}' is not a diffusion model ComfyUI can detect ({str(e).splitlines()[0]}): give "
                       "the model file (models/diffusion_models) here, text encoders and the VAE to their own options."
                       ) from e


def _load_text_encoders(names, clip_type: str, layout, model_name: str):
    kind = getattr(comfy.sd.CLIPType, str(clip_type).upper(), None)
    if kind is None and clip_type != "sdxl":  # ComfyUI's DualCLIPLoader type sdxl is its default type
        known = ", ".join(sorted(t.name.lower() for t in comfy.sd.CLIPType))
        raise AFAError(f"text encoder type '{clip_type}' is not one ComfyUI knows ({known}).")
    paths = [resolve_file("text_encoders", n) for n in names]
    files = ", ".join(p.name for p in paths)
    try:
        clip = comfy.sd.load_clip([str(p) for p in paths], folder_paths.get_folder_paths("embeddings"),
                                  clip_type=kind or comfy.sd.CLIPType.STABLE_DIFFUSION)
    except (RuntimeError, ValueError, KeyError, AttributeError) as e:
        raise AFAError(f"{files} could not be loaded as text encoder(s) of type {clip_type} "
                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__}): give text encoder files "
                       "(models/text_encoders).") from e
    width = clip.encode_from_tokens(clip.tokenize("")).shape[-1]
    if width != layout.context_dim:
        raise AFAError(f"the text encoder(s) {files} (type {clip_type}) give {width}-wide encodings but "
                       f"'{model_name}' takes {layout.context_dim}: give the model's own text encoders and type "
                       "(FLUX: clip_l + t5xxl, type flux; SD3/SD3.5: clip_l + clip_g + t5xxl, type sd3).")
    return clip


def _load_vae(name, patcher, model_name: str):
    import comfy.utils

    path = resolve_file("vae", name)
    try:
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
        vae.throw_exception_if_invalid()
    except (RuntimeError, ValueError, KeyError) as e:
        raise AFAError(f"'{path.name}' is not a VAE ComfyUI can load ({str(e).splitlines()[0]}).") from e
    wanted = patcher.model.latent_format.latent_channels
    if vae.latent_channels != wanted:
        raise AFAError(f"VAE '{path.name}' makes {vae.latent_channels}-channel latents but '{model_name}' takes "
                       f"{wanted}: give the model's own VAE (FLUX: ae.safetensors; SD3/SD3.5: its 16-channel VAE).")
    return vae


def free_memory():
    """Let ComfyUI drop the models nobody holds any more (after a cache let go of checkpoints)."""
    import gc

    import comfy.model_management
    gc.collect()
    comfy.model_management.cleanup_models()
    comfy.model_management.soft_empty_cache()
