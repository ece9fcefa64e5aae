"""DiTs shared as split files: a diffusion model file (models/diffusion_models) per model, text
encoder file(s) (models/text_encoders) and a VAE (models/vae), loaded as ComfyUI's "Load
Diffusion Model", "Load CLIP" / DualCLIPLoader / TripleCLIPLoader (with a type) and "Load VAE"
load them, and checked to fit each other with typed errors naming the file and the fix.

`load_split_files` gives a models.Checkpoint per diffusion model (sharing the text encoder and
the VAE) for generation (models.ensemble_of_checkpoints with shared_clip) and training
(`experts_from_split_files`); a cache (the studio's) can keep each loaded file.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import comfy.sd
import folder_paths

from ..core.errors import AFAError
from ..core.files import file_sha256
from ..core.spec import check_model_count
from .models import Checkpoint, ExpertSet, resolve_file

__all__ = ["CLIP_TYPE_OF_FAMILY", "SPLIT_FOLDERS", "experts_from_split_files", "split_file_names",
           "load_split_files", "file_label", "loaded_bytes"]

# the text encoder type for "auto", by the experts' family
CLIP_TYPE_OF_FAMILY = {"flux": "flux", "chroma": "chroma", "mmdit": "sd3", "qwen_image": "qwen_image"}
SPLIT_FOLDERS = ("diffusion_models", "text_encoders", "vae")
# cached(folder, names, clip type or "", load) -> load() or what the cache kept for those files
Cached = Callable[[str, list, str, Callable[[], object]], object]


def split_file_names(folder: str) -> list:
    """The files of one of ComfyUI's SPLIT_FOLDERS (models/diffusion_models, text_encoders, vae and
    extra_model_paths.yaml), as its loaders list them."""
    if folder not in SPLIT_FOLDERS:
        raise ValueError(f"not a split-file folder: {folder}")
    return folder_paths.get_filename_list(folder)


def _uncached(folder, names, extra, load):
    return load()


def load_split_files(diffusion_models, text_encoders, vae, clip_type: str = "auto",
                     cached: Optional[Cached] = None) -> tuple:
    """Diffusion model files + text encoder file(s) + a VAE file (names in ComfyUI's folders, or
    paths) -> ([a Checkpoint per diffusion model, in order, with the shared text encoder and VAE],
    the text encoder type used: `clip_type`, or for "auto" the experts' family's). A file chosen
    twice is loaded once. AFAError naming the file and the fix for a file of the wrong kind, models
    of different architectures, a text encoder or VAE that does not fit the models."""
    from ..core.layout import check_same_layout, derive_layout

    cached = cached or _uncached
    check_model_count(len(diffusion_models))
    if not text_encoders or not vae:
        raise AFAError("diffusion model files need their text encoder file(s) and a VAE file: give both "
                       "(e.g. FLUX: clip_l + t5xxl and ae.safetensors; SD3.5: clip_l + clip_g + t5xxl and its VAE).")
    loaded = {name: cached("diffusion_models", [name], "", lambda n=name: _load_diffusion_model(n))
              for name in dict.fromkeys(diffusion_models)}
    ckpts = [loaded[name] for name in diffusion_models]
    names = [c.path.name for c in ckpts]
    layouts = [derive_layout(c.model.model.diffusion_model, f"'{n}'") for c, n in zip(ckpts, names)]
    check_same_layout(layouts, names)
    layout = layouts[0]
    clip_type = CLIP_TYPE_OF_FAMILY.get(layout.family, "stable_diffusion") if clip_type == "auto" else clip_type
    clip = cached("text_encoders", list(text_encoders), clip_type,
                  lambda: _load_text_encoders(text_encoders, clip_type))
    _check_text_width(clip, text_encoders, clip_type, layout.context_dim, names[0])
    vae_model = cached("vae", [vae], "", lambda: _load_vae(vae))
    wanted = ckpts[0].model.model.latent_format.latent_channels
    if vae_model.latent_channels != wanted:
        raise AFAError(f"VAE '{_file_name('vae', vae)}' makes {vae_model.latent_channels}-channel latents but "
                       f"'{names[0]}' takes {wanted}: give the model's own VAE (FLUX: ae.safetensors; SD3/SD3.5: "
                       "its 16-channel VAE).")
    return [replace(c, clip=clip, vae=vae_model) for c in ckpts], clip_type


def experts_from_split_files(diffusion_models, text_encoders, vae, clip_type: str = "auto") -> tuple:
    """Diffusion model files + text encoder file(s) + a VAE file -> (models.ExpertSet, the text
    encoder shared by every expert, the VAE), as models.experts_from_files gives for checkpoints;
    the errors of `load_split_files`."""
    check_model_count(len(diffusion_models), "training an aggregator")
    ckpts, _ = load_split_files(diffusion_models, text_encoders, vae, clip_type)
    experts = ExpertSet([c.model for c in ckpts], [c.path.name for c in ckpts], [file_sha256(c.path) for c in ckpts],
                        [str(c.path) for c in ckpts])
    return experts, ckpts[0].clip, ckpts[0].vae


def _file_name(folder: str, name) -> str:
    return resolve_file(folder, name).name


def _load_diffusion_model(name) -> Checkpoint:
    path = resolve_file("diffusion_models", name)
    try:
        return Checkpoint(str(name), path, comfy.sd.load_diffusion_model(str(path)), None, None)
    except (RuntimeError, ValueError, KeyError) as e:
        raise AFAError(f"'{path.name}' is not a diffusion model ComfyUI can detect ({str(e).splitlines()[0]}): give "
                       "the model file (models/diffusion_models) here, text encoders and the VAE to their own options."
                       ) from e


def _load_text_encoders(names, clip_type: str):
    kind = getattr(comfy.sd.CLIPType, str(clip_type).upper(), None)
    if kind is None and clip_type != "sdxl":  # ComfyUI's DualCLIPLoader type sdxl is its default type
        known = ", ".join(sorted(t.name.lower() for t in comfy.sd.CLIPType))
        raise AFAError(f"text encoder type '{clip_type}' is not one ComfyUI knows ({known}).")
    paths = [resolve_file("text_encoders", n) for n in names]
    try:
        return comfy.sd.load_clip([str(p) for p in paths], folder_paths.get_folder_paths("embeddings"),
                                  clip_type=kind or comfy.sd.CLIPType.STABLE_DIFFUSION)
    except (RuntimeError, ValueError, KeyError, AttributeError) as e:
        raise AFAError(f"{', '.join(p.name for p in paths)} could not be loaded as text encoder(s) of type {clip_type} "
                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__}): give text encoder files "
                       "(models/text_encoders).") from e


def _check_text_width(clip, names, clip_type: str, context_dim: int, model_name: str):
    width = clip.encode_from_tokens(clip.tokenize("")).shape[-1]
    if width != context_dim:
        files = ", ".join(_file_name("text_encoders", n) for n in names)
        raise AFAError(f"the text encoder(s) {files} (type {clip_type}) give {width}-wide encodings but "
                       f"'{model_name}' takes {context_dim}: give the model's own text encoders and type "
                       "(FLUX: clip_l + t5xxl, type flux; SD3/SD3.5: clip_l + clip_g + t5xxl, type sd3).")


def _load_vae(name):
    import comfy.utils

    path = resolve_file("vae", name)
    try:
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
        vae.throw_exception_if_invalid()
    except (RuntimeError, ValueError, KeyError) as e:
        raise AFAError(f"'{path.name}' is not a VAE ComfyUI can load ({str(e).splitlines()[0]}).") from e
    return vae


def file_label(folder: str, names, clip_type: str = "") -> str:
    """How a cache lists a loaded split file (or a set of text encoders with their type)."""
    text = " + ".join(Path(str(n)).name for n in names)
    return {"diffusion_models": text, "text_encoders": f"text encoder {text} ({clip_type})",
            "vae": f"VAE {text}"}[folder]


def loaded_bytes(loaded) -> int:
    """Memory of a loaded split file's weights (a diffusion model's Checkpoint, a CLIP or a VAE), as
    ComfyUI's model patchers count them."""
    patcher = loaded.model if isinstance(loaded, Checkpoint) else getattr(loaded, "patcher", None)
    return int(patcher.model_size()) if patcher is not None else 0
