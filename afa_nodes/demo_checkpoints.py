"""Small synthetic checkpoints in ComfyUI's real key layout (for demos and tests).

The weights are seeded random numbers, so the images they make are noise-like,
but every file is a genuine checkpoint that
``comfy.sd.load_checkpoint_guess_config`` detects and loads with no missing or
left-over keys:

* ``build_sd15_checkpoint``: detected as **SD15** (model_channels 320,
  context_dim 768, here ``channel_mult=[1]``, ``num_res_blocks=[1]``: 2 input
  blocks, middle, 2 output blocks, 25.8M UNet parameters), WITH the full
  CLIP-L text encoder (fixed size in ComfyUI: 123M parameters) and a VAE, so
  CLIPTextEncode -> KSampler -> VAEDecode runs. fp16 file: 289 MiB (TAESD) or
  444 MiB (full VAE); the CLIP alone is 236 MiB. The CLIP has no
  ``text_projection``/``logit_scale`` (like real SD1.x files; ComfyUI only logs
  that at debug level and SD1.x does not use them).
  The VAE is by default a *TAESD* (tiny autoencoder, 2.4M parameters) stored
  under ``first_stage_model.taesd_*``: ComfyUI's ``VAE`` detects it by key
  (``taesd_decoder.1.weight``) and treats it as an 8x SD VAE, 4 latent channels.
  ``vae="full"`` writes the standard SD VAE (AutoencoderKL, 83.7M parameters),
  ``vae=None`` none.
* ``build_sdxl_checkpoint``: detected as the SDXL-family model
  **Segmind_Vega** (model_channels 320, transformer_depth [0,0,1,1,2,2],
  context_dim 2048, adm_in_channels 2816 -> ``label_emb``) with the SDXL block
  structure (9 input blocks, middle, 9 output blocks) but ``channel_mult=[1,1,1]``
  (ComfyUI does not match on channel_mult), attention in output blocks 0-5 and
  the middle block: 102.8M parameters, 196 MiB in fp16. UNet-only by default
  (``load_checkpoint_guess_config`` then returns clip=None and a VAE whose
  ``first_stage_model`` is None): tests feed conditioning directly, context
  [B, 77, 2048] with ``pooled_output`` [B, 1280] (ComfyUI builds ``y`` [B, 2816]);
  ``vae="taesd"``/``"full"`` adds a VAE.

Weights: seeded (``torch.Generator``), deterministic across runs. Linear/conv
weights ~ N(0, 1/fan_in) (unit-scale activations), biases ~ N(0, 0.02),
normalisation weights 1 and biases 0, embeddings N(0, 0.02). The UNet and the
CLIP depend on ``seed``; the VAE on ``vae_seed`` (shared by default, like
fine-tunes of one base model). Files carry safetensors metadata
``afa.synthetic = "true"``.

This module imports ComfyUI only inside functions (booting it with
:func:`afa_nodes.comfy_env.boot_comfyui` when needed): it builds the layouts
from ComfyUI's own classes on the ``meta`` device, so the keys are exactly
those ComfyUI expects.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Literal, Optional

import torch

from . import logger
from .core.errors import AFAError

__all__ = [
    "BUILDER_VERSION",
    "SD15_UNET_CONFIG",
    "SDXL_UNET_CONFIG",
    "build_sd15_checkpoint",
    "build_sdxl_checkpoint",
    "ensure_demo_checkpoints",
    "demo_checkpoint_name",
    "is_synthetic_checkpoint",
]

#: Bump when the produced files change (caches are keyed on it).
BUILDER_VERSION = "1"

VaeKind = Optional[Literal["taesd", "full"]]

SD15_UNET_CONFIG = {
    "context_dim": 768,
    "model_channels": 320,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "in_channels": 4,
    "out_channels": 4,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
}

SDXL_UNET_CONFIG = {
    "model_channels": 320,
    "use_linear_in_transformer": True,
    "transformer_depth": [0, 0, 1, 1, 2, 2],           # Segmind_Vega's
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],  # attention where SDXL has it
    "transformer_depth_middle": 1,
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "in_channels": 4,
    "out_channels": 4,
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1],
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
}

_SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                    "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                    "attn_resolutions": [], "dropout": 0.0}

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model."          # SD1.x checkpoint layout
VAE_PREFIX = "first_stage_model."


# ------------------------------------------------------------------ layouts
def _comfy():
    from . import comfy_env

    comfy_env.boot_comfyui()


def _model_config(unet_config: dict, expect: str):
    """ComfyUI's supported-model config for ``unet_config``; checks the detected class."""
    import comfy.model_detection as md

    cfg = md.model_config_from_unet_config(dict(unet_config))
    if cfg is None or type(cfg).__name__ != expect:
        raise AFAError(f"This ComfyUI does not detect the synthetic UNet as {expect} "
                       f"(got {type(cfg).__name__ if cfg else None}); its model list changed.")
    return cfg


def _meta_unet(unet_config: dict, expect: str) -> torch.nn.Module:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = _model_config(unet_config, expect)
    kwargs = dict(cfg.unet_config)   # includes unet_extra_config (heads) as ComfyUI applies it
    kwargs.pop("disable_unet_model_creation", None)
    with torch.device("meta"):
        return UNetModel(**kwargs, device="meta", operations=comfy.ops.disable_weight_init)


def _meta_clip_l() -> torch.nn.Module:
    import comfy.sd1_clip

    with torch.device("meta"):
        return comfy.sd1_clip.SDClipModel(device="meta")


def _meta_vae(kind: str) -> torch.nn.Module:
    with torch.device("meta"):
        if kind == "taesd":
            import comfy.taesd.taesd

            return comfy.taesd.taesd.TAESD()
        if kind == "full":
            from comfy.ldm.models.autoencoder import AutoencoderKL

            return AutoencoderKL(ddconfig=dict(_SD_VAE_DDCONFIG), embed_dim=4)
    raise AFAError(f"Unknown vae kind {kind!r}: use 'taesd', 'full' or None.")


# ---------------------------------------------------------------- weights
_NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)


def _fill(module: torch.nn.Module, prefix: str, gen: torch.Generator, dtype: torch.dtype,
          overrides: dict[str, torch.Tensor] | None = None,
          skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Seeded real tensors for every entry of ``module.state_dict()`` (a meta module)."""
    kinds: dict[str, str] = {}
    for mname, mod in module.named_modules():
        for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(mod, _NORM_TYPES):
                kinds[full] = "norm"
            elif isinstance(mod, torch.nn.Embedding):
                kinds[full] = "embed"
            else:
                kinds[full] = "dense"
    out: dict[str, torch.Tensor] = {}
    overrides = overrides or {}
    for key, meta in module.state_dict().items():
        if any(key.startswith(s) or key == s for s in skip):
            continue
        if key in overrides:
            t = overrides[key].clone()
        else:
            shape = tuple(meta.shape)
            kind = kinds.get(key, "dense")
            leaf = key.rsplit(".", 1)[-1]
            if kind == "norm" or "running_var" in leaf:
                t = torch.ones(shape) if leaf in ("weight", "running_var") else torch.zeros(shape)
            elif meta.dtype in (torch.int64, torch.int32, torch.long) or "num_batches" in leaf:
                t = torch.zeros(shape, dtype=meta.dtype)
            elif kind == "embed" or "embedding" in key:
                t = torch.randn(shape, generator=gen) * 0.02
            elif len(shape) >= 2:
                fan_in = math.prod(shape[1:])
                t = torch.randn(shape, generator=gen) / math.sqrt(max(fan_in, 1))
            elif len(shape) == 1:
                t = torch.randn(shape, generator=gen) * 0.02
            else:  # scalars (e.g. vae_scale) keep ComfyUI's meaning: 1 unless overridden
                t = torch.ones(shape)
        if t.is_floating_point():
            t = t.to(dtype)
        out[prefix + key] = t.contiguous()
    return out


def _unet_sd(unet_config: dict, expect: str, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    unet = _meta_unet(unet_config, expect)
    gen = torch.Generator().manual_seed(int(seed))
    return _fill(unet, UNET_PREFIX, gen, dtype)


def _clip_sd(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    clip = _meta_clip_l()
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    # Real SD1.x checkpoints store only transformer.text_model.*: ComfyUI's SD15 loader
    # renames every other cond_stage_model.transformer.* key, so text_projection and
    # logit_scale cannot be stored there (ComfyUI ignores them for SD1.x).
    sd = _fill(clip, "", gen, dtype, skip=("logit_scale", "transformer.text_projection"))
    return {CLIP_PREFIX + k: v for k, v in sd.items()}


def _vae_sd(kind: str, vae_seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    vae = _meta_vae(kind)
    gen = torch.Generator().manual_seed(int(vae_seed) + 104729)
    overrides = {"vae_scale": torch.tensor(1.0), "vae_shift": torch.tensor(0.0)} if kind == "taesd" else None
    return _fill(vae, VAE_PREFIX, gen, dtype, overrides=overrides)


def _metadata(kind: str, seed: int, vae: VaeKind, vae_seed: int, dtype: torch.dtype,
              n_params: int) -> dict[str, str]:
    return {
        "afa.synthetic": "true",
        "afa.builder_version": BUILDER_VERSION,
        "afa.kind": kind,
        "afa.seed": str(int(seed)),
        "afa.vae": str(vae),
        "afa.vae_seed": str(int(vae_seed)),
        "afa.dtype": str(dtype).replace("torch.", ""),
        "afa.unet_parameters": str(n_params),
        "modelspec.title": f"ComfyUI-AFA synthetic {kind} (seed {seed}); random weights, not a real model",
        "format": "pt",
    }


def _save(sd: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.torch.save_file(sd, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a normal file, like ComfyUI's own model files
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _check_args(dtype: torch.dtype, vae) -> None:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise AFAError(f"dtype must be torch.float16, bfloat16 or float32, not {dtype}.")
    if vae not in (None, "taesd", "full"):
        raise AFAError(f"Unknown vae kind {vae!r}: use 'taesd', 'full' or None.")


# ------------------------------------------------------------------- public
def build_sd15_checkpoint(path: str | os.PathLike, seed: int, dtype: torch.dtype = torch.float16,
                          *, vae: VaeKind = "taesd", vae_seed: int = 0,
                          unet_config: dict | None = None) -> Path:
    """Write an SD1.5-shaped checkpoint (UNet + CLIP-L + VAE) to ``path``; return it.

    ``unet_config`` may override :data:`SD15_UNET_CONFIG` (e.g. ``channel_mult``
    ``[1, 1]`` for 4 input blocks); it must still be detected as SD15.
    """
    _check_args(dtype, vae)
    _comfy()
    t0 = time.perf_counter()
    cfg = dict(SD15_UNET_CONFIG, **(unet_config or {}))
    sd = _unet_sd(cfg, "SD15", seed, dtype)
    n_unet = sum(v.numel() for v in sd.values())
    sd.update(_clip_sd(seed, dtype))
    if vae is not None:
        sd.update(_vae_sd(vae, vae_seed, dtype))
    out = _save(sd, path, _metadata("sd15", seed, vae, vae_seed, dtype, n_unet))
    logger.info("Built synthetic SD1.5 checkpoint %s (%.1fM UNet params, %.0f MB) in %.1fs",
                out, n_unet / 1e6, out.stat().st_size / 2**20, time.perf_counter() - t0)
    return out


def build_sdxl_checkpoint(path: str | os.PathLike, seed: int, dtype: torch.dtype = torch.float16,
                          *, vae: VaeKind = None, vae_seed: int = 0,
                          unet_config: dict | None = None) -> Path:
    """Write an SDXL-family checkpoint (detected as Segmind_Vega, 9/1/9 blocks,
    ``label_emb``), UNet-only unless ``vae`` is "taesd" or "full"; return it.

    Without CLIP, ``load_checkpoint_guess_config`` returns ``clip=None``: feed
    conditioning directly (``[[torch.randn(B, 77, 2048), {"pooled_output":
    torch.randn(B, 1280)}]]``, or ``y`` of 2816 features to the UNet).
    """
    _check_args(dtype, vae)
    _comfy()
    t0 = time.perf_counter()
    cfg = dict(SDXL_UNET_CONFIG, **(unet_config or {}))
    sd = _unet_sd(cfg, "Segmind_Vega", seed, dtype)
    n_unet = sum(v.numel() for v in sd.values())
    if vae is not None:
        sd.update(_vae_sd(vae, vae_seed, dtype))
    out = _save(sd, path, _metadata("sdxl", seed, vae, vae_seed, dtype, n_unet))
    logger.info("Built synthetic SDXL-family checkpoint %s (%.1fM UNet params, %.0f MB) in %.1fs",
                out, n_unet / 1e6, out.stat().st_size / 2**20, time.perf_counter() - t0)
    return out


def demo_checkpoint_name(kind: str, i: int) -> str:
    return f"afa_demo_{kind}_synthetic_{i}.safetensors"


def is_synthetic_checkpoint(path: str | os.PathLike) -> bool:
    """True for files written by this module (reads only the safetensors header)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("afa.synthetic") == "true"
    except Exception:  # noqa: BLE001 - unreadable = not ours
        return False


def ensure_demo_checkpoints(folder: str | os.PathLike, kind: str = "sd15", count: int = 3,
                            dtype: torch.dtype = torch.float16, **kwargs) -> list[Path]:
    """Make sure ``folder`` holds ``count`` demo checkpoints of ``kind`` ("sd15" or
    "sdxl"), named ``afa_demo_<kind>_synthetic_<i>.safetensors`` (seed ``i``).

    Existing files are kept (never overwritten); missing ones are built via a
    temporary name and ``os.replace``. Extra ``kwargs`` go to the builder.
    """
    builders = {"sd15": build_sd15_checkpoint, "sdxl": build_sdxl_checkpoint}
    if kind not in builders:
        raise AFAError(f"Unknown demo checkpoint kind {kind!r}: use one of {sorted(builders)}.")
    if count < 1:
        raise AFAError(f"count must be >= 1, got {count}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = folder / demo_checkpoint_name(kind, i)
        if not p.exists():
            builders[kind](p, seed=i, dtype=dtype, **kwargs)
        paths.append(p)
    return paths
