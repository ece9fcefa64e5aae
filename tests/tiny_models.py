"""Tiny model files in ComfyUI's real key layouts for the studio and browser tests: a LoRA
(kohya names, as comfy.lora maps them), an SD1.5-layout ControlNet and a random SABW
aggregator, all for the demo SD1.5 checkpoints (afa_nodes.demo_checkpoints)."""
import torch


def build_lora(path, unet, rank=4, scale=0.5, seed=0):
    """A LoRA for `unet` (ComfyUI BaseModel) with kohya key names (comfy.lora.model_lora_keys_unet):
    rank-`rank` up/down on the attention projections, fp16 safetensors (~0.3 MB)."""
    import comfy.lora
    from safetensors.torch import save_file
    weights, g, sd = unet.state_dict(), torch.Generator().manual_seed(seed), {}
    for lora_key, weight_key in comfy.lora.model_lora_keys_unet(unet, {}).items():
        if (isinstance(weight_key, str) and lora_key.startswith("lora_unet_")
                and any(p in weight_key for p in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_v"))
                and weights[weight_key].dim() == 2):
            out_f, in_f = weights[weight_key].shape
            sd[f"{lora_key}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).half()
            sd[f"{lora_key}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * scale).half()
            sd[f"{lora_key}.alpha"] = torch.tensor(float(rank)).half()
    assert len(sd) >= 12
    save_file(sd, str(path))


def build_controlnet(path, seed=0):
    """An SD1.5-layout ControlNet (`control_model.*`, ComfyUI's cldm.ControlNet) for the demo UNet's
    config, seeded random weights (zero convs too, so the control image matters), fp16."""
    import comfy.cldm.cldm
    import comfy.model_detection
    import comfy.ops
    from safetensors.torch import save_file

    from afa_nodes.demo_checkpoints import SD15_UNET_CONFIG
    config = dict(comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET_CONFIG)).unet_config)
    for key in ("out_channels", "disable_unet_model_creation"):
        config.pop(key, None)
    with torch.device("meta"):
        net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, device="meta",
                                         operations=comfy.ops.disable_weight_init)
    g, sd = torch.Generator().manual_seed(seed), {}
    for k, v in net.state_dict().items():
        value = (torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5 if v.dim() >= 2
                 else torch.ones(v.shape) if "norm" in k and k.endswith("weight") else torch.zeros(v.shape))
        sd[f"control_model.{k}"] = value.half()
    save_file(sd, str(path))


def build_aggregator(path, checkpoint):
    """A random (non-uniform: large output convs) aggregator for two demo checkpoints."""
    import comfy.sd as comfy_sd

    from afa_nodes.core.aggregator_file import save_aggregator
    from afa_nodes.core.layout import derive_layout
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    unet = comfy_sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False,
                                                 output_clip=False)[0].model.diffusion_model
    layout = derive_layout(unet)
    torch.manual_seed(0)
    agg = Aggregator(layout.point_channels, SABWConfig(2, hidden=32, heads=4, depth=1, context_dim=768,
                                                       time_embed_dim=layout.time_embed_dim))
    for block in agg.blocks:
        torch.nn.init.normal_(block.conv_out.weight, std=2.0)
    save_aggregator(path, agg, layout, [])
