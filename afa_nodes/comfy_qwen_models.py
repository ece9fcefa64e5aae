"""Tiny Qwen-Image models made from ComfyUI's own class, for tests and benchmarks. Random seeded
weights: what they draw is noise, but every block is ComfyUI's own code.

ComfyUI's detection reads only the input width and the depth of a Qwen-Image state dict and
takes everything else from the class defaults (width 3072 = 24 heads x 128, rotary axes
16/56/56, a 3584-wide text context), so a tiny Qwen-Image is built directly from
`comfy.supported_models.QwenImage` / `model_base.QwenImage` with a small `unet_config`
(`qwen_patcher`): the real model sampling (ModelSamplingFlux, shift 1.15, CONST) and latent
format (Wan 2.1, 16 channels, one frame). `qwen_state_dict` gives the smallest state dict
ComfyUI detects as Qwen-Image (its real widths, one block) for a detection-level test.

ComfyUI is imported inside the functions (the caller has booted it).
"""
import torch

from .comfy_dit_models import _fill, _patcher

# 2 heads x 32 = width 64; rotary axes sum to the head width; a 48-wide text context
TINY_QWEN = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                 num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(8, 12, 12))
# what ComfyUI's detection gives a Qwen-Image state dict with one transformer block
REAL_LAYOUT_QWEN = dict(TINY_QWEN, num_layers=1, attention_head_dim=128, num_attention_heads=24,
                        joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))


def qwen_patcher(seed: int, dtype=torch.float32, **overrides):
    """A tiny Qwen-Image as a ModelPatcher; `overrides` change TINY_QWEN entries (e.g. num_layers=3,
    default_ref_method="index_timestep_zero", use_additional_t_cond=True where ComfyUI has them)."""
    import comfy.supported_models

    config = {**TINY_QWEN, **overrides, "image_model": "qwen_image"}
    model_config = comfy.supported_models.QwenImage(config)
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
