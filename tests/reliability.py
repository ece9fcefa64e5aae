"""Helpers of the reliability tests (issue #14): AFA prompts for a real server, aggregator files
for the tiny SD1.5 checkpoints, a process's memory and open files, the least-squares slope."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from afa_nodes.core.spec import Mode

AGGREGATOR = Mode.AGGREGATOR.value
BLOCK_AVERAGE = Mode.BLOCK_AVERAGE.value
NOISE_AVERAGE = Mode.NOISE_AVERAGE.value


def process_stats(pid: int) -> tuple[float, int]:
    """(resident memory in MB, open file descriptors) of process `pid` (psutil when installed,
    else /proc)."""
    try:
        import psutil
        p = psutil.Process(pid)
        return p.memory_info().rss / 2**20, p.num_fds()
    except ImportError:
        with open(f"/proc/{pid}/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def slope(values, kinds=None) -> float:
    """Least-squares slope of `values` against their index (units per step). With `kinds` (one
    label per value), each kind gets its own intercept: a run alternating kinds of work that
    hold different amounts of memory is not mistaken for growth (or hidden by it)."""
    y = np.asarray(values, dtype=np.float64)
    labels = sorted(set(kinds)) if kinds is not None else [None]
    x = np.column_stack([np.arange(len(y), dtype=np.float64)]
                        + [[1.0 if kinds is None or k == label else 0.0 for k in (kinds or y)] for label in labels])
    return float(np.linalg.lstsq(x, y, rcond=None)[0][0])


def write_aggregator(path: Path, checkpoint: Path, num_models: int, seed: int) -> Path:
    """A random, non-uniform aggregator for `num_models` of the tiny SD1.5 checkpoints (any of
    them: they share one layout). Needs ComfyUI booted (the `comfy` fixture)."""
    import comfy.sd as comfy_sd

    from afa_nodes.core.aggregator_file import save_aggregator
    from afa_nodes.core.layout import derive_layout
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    unet = comfy_sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False,
                                                 output_clip=False)[0].model.diffusion_model
    layout = derive_layout(unet)
    agg = Aggregator(layout.point_channels, SABWConfig(num_models, hidden=32, heads=4, depth=1,
                                                       context_dim=layout.context_dim,
                                                       time_embed_dim=layout.time_embed_dim))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in agg.blocks:
            block.conv_out.weight.copy_(torch.randn(block.conv_out.weight.shape, generator=generator) * 2.0)
    save_aggregator(path, agg, layout, [])
    return path


def afa_prompt(checkpoints, mode: str, size: int, seed: int, aggregator: str = "none", maps: bool = False,
               prefix: str = "afa_rel", steps: int = 2, latent: bool = False) -> dict:
    """AFA Ensemble Loader -> KSampler -> VAE Decode -> Save Image (and Save Latent when `latent`);
    with `maps`, AFA Record Attention between loader and sampler and an AFA Attention Preview."""
    loader = {f"ckpt_{i + 1}": name for i, name in enumerate(checkpoints)}
    loader.update(aggregator=aggregator if mode == AGGREGATOR else "none", mode=mode, weights="", model_index=1)
    prompt = {
        "1": {"class_type": "AFAEnsembleLoader", "inputs": loader},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red lighthouse"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    if maps:
        prompt["8"] = {"class_type": "AFARecordAttention", "inputs": {
            "model": ["1", 0], "enabled": True, "points": "all", "steps": "all", "max_side": 16, "cap_mb": 64}}
        prompt["5"]["inputs"]["model"] = ["8", 0]
        prompt["9"] = {"class_type": "AFAAttentionPreview", "inputs": {
            "maps": ["8", 1], "latent": ["5", 0], "points": "middle", "step": -1, "branch": "cond",
            "batch_index": 0, "cell": 40, "image": ["6", 0]}}
    if latent:
        prompt["10"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}}
    return prompt


def plain_prompt(checkpoint: str, size: int, seed: int, prefix: str = "afa_rel_plain", steps: int = 2) -> dict:
    """An ordinary (non-AFA) txt2img prompt of one checkpoint, with Save Latent."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red lighthouse"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
    }


def saved_latent(srv, entry: dict, node: str = "10") -> torch.Tensor:
    """The latent a Save Latent node of a finished prompt wrote."""
    from safetensors.torch import load_file
    (item,) = entry["outputs"][node]["latents"]
    return load_file(str(srv.output_dir / item.get("subfolder", "") / item["filename"]))["latent_tensor"]
