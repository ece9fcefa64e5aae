"""Tiny FLUX, SD3 (MMDiT) and Qwen-Image models made from ComfyUI's own classes, for tests,
benchmarks and demos. Random seeded weights: what they draw is noise, but every block is
ComfyUI's own code.

* FLUX: ComfyUI's detection fixes FLUX's width at 3072 (24 heads, rotary axes 16/56/56), so a
  tiny FLUX is built directly from `comfy.supported_models.Flux` / `FluxSchnell` and
  `model_base.Flux` with a small `unet_config` (`flux_patcher`); Chroma likewise
  (`chroma_patcher`; detection fixes its approximator at 5 x 5120).
* SD3: detection reads every width from the weights, so a tiny SD3 is a state dict in the real
  key layout (`sd3_state_dict`) that `comfy.sd.load_diffusion_model_state_dict` (what the
  "Load Diffusion Model" node uses) detects as SD3 (`sd3_patcher`, `save_sd3`).
* `ensure_sd3_demo_files(...)`: what an SD3 workflow needs, in the folders the stock loaders
  read: two tiny SD3 diffusion models (diffusion_models/), a CLIP-L text encoder taken from an
  SD1.5 demo checkpoint (text_encoders/, "Load CLIP" type sd3 pads it to SD3's 4096-wide
  context and 2048-wide pooled vector) and a 16-channel TAESD as the VAE (vae/);
  `ensure_flux_demo_files(...)` the same for FLUX with the smallest detectable FLUX files.
* Qwen-Image: detection reads only the input width and the depth and takes the rest from the
  class defaults (width 3072, rotary axes 16/56/56, 3584-wide text), so a tiny Qwen-Image is
  built from `comfy.supported_models.QwenImage` / `model_base.QwenImage` with a small
  `unet_config` (`qwen_patcher`: its real model sampling, ModelSamplingFlux shift 1.15, and
  Wan 2.1 latent format); `qwen_state_dict` gives the smallest state dict detected as Qwen-Image.
* `finetuned(...)`: a copy of a model with every weight moved by a relative amount, as a
  stand-in for a fine-tune of one base model.

ComfyUI is imported inside the functions (the caller has booted it).
"""
import dataclasses
import math

import torch

TINY_FLUX = dict(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=64,
                 mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12],
                 theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
TINY_CHROMA = dict(in_channels=64, out_channels=64, context_in_dim=48, hidden_size=64, mlp_ratio=4.0, num_heads=2,
                   depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
                   in_dim=64, out_dim=64, hidden_dim=96, n_layers=2, txt_ids_dims=[], vec_in_dim=None)
# detected as SD3: width = 64 * depth; context / pooled widths as CLIP-L fed through ComfyUI's
# SD3 text encoder gives them (77 x 4096 tokens, 2048 pooled)
TINY_SD3 = dict(depth=2, in_channels=16, patch_size=2, context_dim=4096, adm_dim=2048, pos_embed_max_size=16)


def _fill(module: torch.nn.Module, seed: int) -> dict:
    """Seeded weights for every state-dict entry: matrices N(0, 1/fan_in), norm scales 1,
    biases and positional tables small."""
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for key, t in module.state_dict().items():
        shape, leaf = tuple(t.shape), key.rsplit(".", 1)[-1]
        if leaf == "scale" or (leaf == "weight" and len(shape) == 1):
            value = torch.ones(shape)
        elif len(shape) >= 2 and key != "pos_embed":
            value = torch.randn(shape, generator=gen) / math.sqrt(max(math.prod(shape[1:]), 1))
        else:
            value = torch.randn(shape, generator=gen) * (0.5 if key == "pos_embed" else 0.02)
        out[key] = value
    return out


def _patcher(base_model):
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(base_model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def flux_patcher(seed: int, schnell: bool = False, dtype=torch.float32, **overrides):
    """A tiny FLUX.1 [dev] (guidance, ModelSamplingFlux) or [schnell] (no guidance, discrete flow)
    as a ModelPatcher; `overrides` change TINY_FLUX entries (e.g. depth=3)."""
    import comfy.supported_models
    from comfy.ldm.flux.model import FluxParams

    known = {f.name for f in dataclasses.fields(FluxParams)}
    config = {k: v for k, v in {**TINY_FLUX, **overrides}.items() if k in known}
    config["image_model"] = "flux"
    config["guidance_embed"] = not schnell
    model_config = (comfy.supported_models.FluxSchnell if schnell else comfy.supported_models.Flux)(config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    model.diffusion_model.load_state_dict(_fill(model.diffusion_model, seed))
    return _patcher(model.eval())


def chroma_patcher(seed: int, dtype=torch.float32, **overrides):
    """A tiny Chroma (FLUX blocks, modulation from its approximator) as a ModelPatcher."""
    import comfy.supported_models
    from comfy.ldm.chroma.model import ChromaParams

    known = {f.name for f in dataclasses.fields(ChromaParams)}
    config = {k: v for k, v in {**TINY_CHROMA, **overrides}.items() if k in known}
    config["image_model"] = "chroma"
    model_config = comfy.supported_models.Chroma(config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    model.diffusion_model.load_state_dict(_fill(model.diffusion_model, seed))
    return _patcher(model.eval())


# The smallest state dict ComfyUI detects as FLUX.1 [dev]: its fixed width (3072, 24 heads,
# rotary axes 16/56/56) with 1 double + 1 single block; CLIP-L-wide text and pooled inputs.
REAL_LAYOUT_FLUX = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=768, hidden_size=3072,
                        mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                        theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])


def flux_state_dict(seed: int, dtype=torch.bfloat16, **overrides) -> dict:
    """A FLUX diffusion model state dict in the real key layout (default: REAL_LAYOUT_FLUX,
    ~0.5 B parameters, ~1 GB in bf16), seeded weights."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux, FluxParams

    known = {f.name for f in dataclasses.fields(FluxParams)}
    config = {k: v for k, v in {**REAL_LAYOUT_FLUX, **overrides}.items() if k in known}
    with torch.device("meta"):
        module = Flux(**config, device="meta", operations=comfy.ops.disable_weight_init)
    return {k: v.to(dtype) for k, v in _fill(module, seed).items()}


def _meta_mmdit(config: dict):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    hidden = 64 * config["depth"]
    with torch.device("meta"):
        return MMDiT(input_size=None, patch_size=config["patch_size"], in_channels=config["in_channels"],
                     depth=config["depth"], adm_in_channels=config["adm_dim"],
                     context_embedder_config={"target": "torch.nn.Linear",
                                              "params": {"in_features": config["context_dim"], "out_features": hidden}},
                     pos_embed_max_size=config["pos_embed_max_size"],
                     num_patches=config["pos_embed_max_size"] ** 2, pos_embed_scaling_factor=None,
                     device="meta", operations=comfy.ops.disable_weight_init)


def sd3_state_dict(seed: int, dtype=torch.float32, **overrides) -> dict:
    """A tiny SD3 diffusion model in the real key layout (no prefix), seeded weights."""
    config = {**TINY_SD3, **overrides}
    return {k: v.to(dtype) for k, v in _fill(_meta_mmdit(config), seed).items()}


def sd3_patcher(seed: int, dtype=torch.float32, **overrides):
    """A tiny SD3 loaded (and detected) the way "Load Diffusion Model" loads one."""
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model_state_dict(sd3_state_dict(seed, **overrides),
                                                       model_options={"dtype": dtype})
    if patcher is None or type(patcher.model).__name__ != "SD3":
        raise RuntimeError("this ComfyUI does not detect the tiny MMDiT state dict as SD3")
    return patcher


def save_sd3(path, seed: int, dtype=torch.float16, **overrides):
    """Write a tiny SD3 diffusion model file (for models/diffusion_models, "Load Diffusion Model")."""
    _save(sd3_state_dict(seed, dtype, **overrides), path, f"tiny SD3 (seed {seed})")
    return path


# Qwen-Image: 2 heads x 32 = width 64 (rotary axes sum to the head width), a 48-wide text context
TINY_QWEN = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                 num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(8, 12, 12))
# what ComfyUI's detection gives a Qwen-Image state dict with one transformer block
REAL_LAYOUT_QWEN = dict(TINY_QWEN, num_layers=1, attention_head_dim=128, num_attention_heads=24,
                        joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))


def qwen_patcher(seed: int, dtype=torch.float32, **overrides):
    """A tiny Qwen-Image as a ModelPatcher; `overrides` change TINY_QWEN entries (e.g. num_layers=3,
    default_ref_method="index_timestep_zero", use_additional_t_cond=True where ComfyUI has them)."""
    import comfy.supported_models

    model_config = comfy.supported_models.QwenImage({**TINY_QWEN, **overrides, "image_model": "qwen_image"})
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    model.diffusion_model.load_state_dict(_fill(model.diffusion_model, seed))
    return _patcher(model.eval())


def qwen_state_dict(seed: int, dtype=torch.bfloat16, **overrides) -> dict:
    """A Qwen-Image diffusion model state dict in the real key layout (default REAL_LAYOUT_QWEN:
    ~0.4 B parameters, ~0.8 GB in bf16), seeded weights."""
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    with torch.device("meta"):
        module = QwenImageTransformer2DModel(**{**REAL_LAYOUT_QWEN, **overrides}, device="meta",
                                             operations=comfy.ops.disable_weight_init)
    return {k: v.to(dtype) for k, v in _fill(module, seed).items()}


SD3_DEMO_FILES = {"diffusion_models": ["afa_demo_sd3_tiny_1.safetensors", "afa_demo_sd3_tiny_2.safetensors"],
                  "text_encoders": ["afa_demo_clip_l.safetensors"], "vae": ["afa_demo_taesd16.safetensors"]}
FLUX_DEMO_FILES = {"diffusion_models": ["afa_demo_flux_min_1.safetensors", "afa_demo_flux_min_2.safetensors"],
                   "text_encoders": SD3_DEMO_FILES["text_encoders"], "vae": SD3_DEMO_FILES["vae"]}
CLIP_PREFIX = "cond_stage_model.transformer."


def _save(tensors: dict, path, title: str):
    import safetensors.torch

    from .core.files import atomic_write

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"afa.synthetic": "true", "modelspec.title": f"ComfyUI-AFA {title}; random weights, not a real model"}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))


def ensure_sd3_demo_files(folder, sd15_checkpoint) -> dict:
    """Build (once) the SD3 demo files under folder/<kind>/; -> {kind: [paths]}.
    `sd15_checkpoint`: an SD1.5 checkpoint whose CLIP-L becomes the text encoder."""
    return _ensure(folder, SD3_DEMO_FILES, sd15_checkpoint, save_sd3)


def ensure_flux_demo_files(folder, sd15_checkpoint) -> dict:
    """The FLUX demo files (two smallest FLUX files ComfyUI detects, ~1 GB each in bf16; the
    CLIP-L and the 16-channel TAESD of the SD3 demo) under folder/<kind>/; -> {kind: [paths]}."""
    return _ensure(folder, FLUX_DEMO_FILES, sd15_checkpoint,
                   lambda path, seed: _save(flux_state_dict(seed), path, f"smallest detectable FLUX (seed {seed})"))


def _ensure(folder, names: dict, sd15_checkpoint, save_model) -> dict:
    from pathlib import Path

    folder = Path(folder)
    out = {kind: [folder / kind / name for name in files] for kind, files in names.items()}
    for kind in out:
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for seed, path in enumerate(out["diffusion_models"], start=1):
        if not path.is_file():
            save_model(path, seed)
    clip = out["text_encoders"][0]
    if not clip.is_file():
        from safetensors import safe_open
        with safe_open(str(sd15_checkpoint), "pt") as f:
            tensors = {k[len(CLIP_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(CLIP_PREFIX)}
        if not tensors:
            raise RuntimeError(f"{sd15_checkpoint} holds no CLIP-L ({CLIP_PREFIX}*)")
        _save(tensors, clip, "CLIP-L of an SD1.5 demo checkpoint")
    vae = out["vae"][0]
    if not vae.is_file():
        import comfy.taesd.taesd
        with torch.device("meta"):
            taesd = comfy.taesd.taesd.TAESD(latent_channels=16)
        tensors = _fill(taesd, 3)
        tensors.update(vae_scale=torch.tensor(1.0), vae_shift=torch.tensor(0.0))
        _save({k: v.half() for k, v in tensors.items()}, vae, "16-channel TAESD (SD3 / FLUX latents)")
    return out


def finetuned(patcher, seed: int, amount: float = 0.2):
    """A new model of `patcher`'s class and config whose every float weight is the original's
    moved by `amount` x that tensor's spread x N(0, 1): a stand-in for a fine-tune of one base."""
    gen = torch.Generator().manual_seed(int(seed))
    source = patcher.model
    model = source.model_config.get_model({})
    state = {}
    for key, value in source.diffusion_model.state_dict().items():
        if value.is_floating_point() and value.numel() > 1:
            noise = torch.randn(value.shape, generator=gen) * amount * value.float().std()
            value = (value.float() + noise).to(value.dtype)
        state[key] = value
    model.diffusion_model.load_state_dict(state)
    return _patcher(model.eval())
