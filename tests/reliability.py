"""Helpers of the reliability tests (issue #14): AFA prompts for a real server, aggregator files
for the tiny SD1.5 checkpoints, a process's memory and open files, the slopes of a memory series."""
from __future__ import annotations

import os
import struct
import zlib
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


def memory_sample(pid: int) -> dict:
    """Resident memory of process `pid` in MB: `rss` (all of it) and `anon` (its anonymous pages,
    from /proc/<pid>/smaps_rollup: the heap and tensors, without the page cache of mmapped
    checkpoint files, which the kernel keeps or drops as it likes), and its open descriptors."""
    rss, fds = process_stats(pid)
    anon = float("nan")
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            anon = next(int(line.split()[1]) for line in f if line.startswith("Anonymous:")) / 1024
    except (OSError, StopIteration):
        pass   # no smaps_rollup (kernel < 4.14): anon stays NaN and its slope is not asserted
    return {"rss": rss, "anon": anon, "fds": fds}


def slope(values, kinds=None) -> float:
    """Least-squares slope of `values` against their index (units per step). With `kinds` (one
    label per value), each kind gets its own intercept: a run alternating kinds of work that
    hold different amounts of memory is not mistaken for growth (or hidden by it)."""
    y = np.asarray(values, dtype=np.float64)
    labels = sorted(set(kinds)) if kinds is not None else [None]
    x = np.column_stack([np.arange(len(y), dtype=np.float64)]
                        + [[1.0 if kinds is None or k == label else 0.0 for k in (kinds or y)] for label in labels])
    return float(np.linalg.lstsq(x, y, rcond=None)[0][0])


def sen_slope(values, kinds=None) -> float:
    """Theil-Sen slope with one intercept per kind (Sen's seasonal slope): the median, over every
    pair of values of the same kind, of (later - earlier) / (index distance). A minority of
    samples inflated by any amount (allocator caches, garbage not yet collected) moves it little;
    a steady growth moves every pair. NaN when no kind occurs twice."""
    y = np.asarray(values, dtype=np.float64)
    k = list(kinds) if kinds is not None else [0] * len(y)
    pairs = [(y[j] - y[i]) / (j - i) for i in range(len(y)) for j in range(i + 1, len(y)) if k[i] == k[j]]
    return float(np.median(pairs)) if pairs else float("nan")


def layout_of(checkpoint: Path):
    """The aggregation layout of a checkpoint's UNet. Needs ComfyUI booted (the `comfy` fixture)."""
    import comfy.sd as comfy_sd

    from afa_nodes.core.layout import derive_layout
    model = comfy_sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)[0]
    return derive_layout(model.model.diffusion_model)


def new_aggregator(layout, num_models: int):
    """A small untrained aggregator (hidden 32, 4 heads, depth 1) for `layout`."""
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    return Aggregator(layout.point_channels, SABWConfig(num_models, hidden=32, heads=4, depth=1,
                                                        context_dim=layout.context_dim,
                                                        time_embed_dim=layout.time_embed_dim))


def save_agg(path: Path, layout, n=2, experts=(), nan=False) -> str:
    """An untrained aggregator file for `n` models of `layout` (`experts`: the sha256 list it
    claims; `nan`: one NaN weight); returns its file name."""
    from afa_nodes.core.aggregator_file import save_aggregator
    agg = new_aggregator(layout, n)
    if nan:
        with torch.no_grad():
            agg.blocks[0].conv_out.weight[0, 0, 0, 0] = float("nan")
    save_aggregator(path, agg, layout, list(experts))
    return path.name


def write_aggregator(path: Path, checkpoint: Path, num_models: int, seed: int) -> Path:
    """A random, non-uniform aggregator for `num_models` of the tiny SD1.5 checkpoints (any of
    them: they share one layout). Needs ComfyUI booted (the `comfy` fixture)."""
    from afa_nodes.core.aggregator_file import save_aggregator
    layout = layout_of(checkpoint)
    agg = new_aggregator(layout, num_models)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in agg.blocks:
            block.conv_out.weight.copy_(torch.randn(block.conv_out.weight.shape, generator=generator) * 2.0)
    save_aggregator(path, agg, layout, [])
    return path


def png_header_bomb(path: Path, side: int = 100_000) -> Path:
    """A PNG claiming side x side pixels (10 G) in a few hundred bytes: PIL refuses it at open."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" + b"\x00" * 16
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(row * 4)) + chunk(b"IEND", b""))
    return path


def make_image(folder: Path, name: str, image, caption="a picture") -> Path:
    """`image` (PIL) saved as folder/name with a same-name .txt caption (str, raw bytes, or None:
    no caption file)."""
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_bytes(caption.encode() if isinstance(caption, str) else caption)
    return folder / name


def txt2img(model: list, clip: list, size: int, seed: int, steps: int) -> dict:
    """Nodes 2-5 of a txt2img prompt: two CLIP Text Encode, Empty Latent Image, KSampler."""
    return {
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a red lighthouse"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
    }


def afa_prompt(checkpoints, mode: str, size: int, seed: int, aggregator: str = "none", maps: bool = False,
               prefix: str = "afa_rel", steps: int = 2, latent: bool = False) -> dict:
    """AFA Ensemble Loader -> KSampler -> VAE Decode -> Save Image (and Save Latent when `latent`);
    with `maps`, AFA Record Attention between loader and sampler and an AFA Attention Preview."""
    loader = {f"ckpt_{i + 1}": name for i, name in enumerate(checkpoints)}
    loader.update(aggregator=aggregator if mode == AGGREGATOR else "none", mode=mode, weights="", model_index=1)
    prompt = {"1": {"class_type": "AFAEnsembleLoader", "inputs": loader},
              **txt2img(["1", 0], ["1", 1], size, seed, steps),
              "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
              "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}}}
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
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
            **txt2img(["1", 0], ["1", 1], size, seed, steps),
            "10": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}}}


def saved_latent(srv, entry: dict, node: str = "10") -> torch.Tensor:
    """The latent a Save Latent node of a finished prompt wrote."""
    from safetensors.torch import load_file
    (item,) = entry["outputs"][node]["latents"]
    return load_file(str(srv.output_dir / item.get("subfolder", "") / item["filename"]))["latent_tensor"]
