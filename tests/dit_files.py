"""The tiny DiT split files the tests share (afa_nodes.comfy_dit_models: SD3 diffusion models in
ComfyUI's MMDiT key layout, CLIP-L as their text encoder, a 16-channel TAESD as their VAE; built
once into the test cache), and putting them into ComfyUI's diffusion_models / text_encoders /
vae folders for a front end that lists files from there (the studio)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

SPLIT_KINDS = ("diffusion_models", "text_encoders", "vae")


def sd3_demo_files(sd15_checkpoint: Path) -> dict:
    """{kind: [paths]} of the tiny SD3 split files (the SD1.5 demo checkpoint gives the CLIP-L)."""
    from conftest import checkpoint_cache_dir

    from afa_nodes.comfy_dit_models import ensure_sd3_demo_files
    return ensure_sd3_demo_files(checkpoint_cache_dir() / "dit", Path(sd15_checkpoint).resolve())


def check_trained(out: Path, files: dict, family: str, steps: int = 2):
    """`out` is a finished aggregator of `family` trained `steps` steps on the diffusion model files
    of `files` (their names and sha256, in order) with the flow-matching objective."""
    from afa_nodes.core.aggregator_file import load_aggregator
    from afa_nodes.core.files import file_sha256
    agg = load_aggregator(out)
    assert agg.layout["family"] == family and agg.training["step"] == steps and agg.training["finished"]
    assert agg.training["objective"] == "flow-matching velocity MSE" and agg.training["target"] == "noise - x0"
    assert [e["name"] for e in agg.experts] == [Path(p).name for p in files["diffusion_models"]]
    assert [e["sha256"] for e in agg.experts] == [file_sha256(p) for p in files["diffusion_models"]]
    return agg


def skip_unless_comfyui_reads_flux_text_width(files: dict):
    """Skip where this ComfyUI cannot load the tiny FLUX files: ComfyUI 0.3.64 takes FLUX's text
    width as 4096, the tiny files' is CLIP-L's 768 (0.8.0 reads it from txt_in.weight; real FLUX
    files, 4096 wide, load on both). Reads the file's header only."""
    import torch
    from safetensors import safe_open

    import comfy.model_detection
    with safe_open(str(files["diffusion_models"][0]), "pt") as f:
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    detected = (comfy.model_detection.detect_unet_config(shapes, "") or {}).get("context_in_dim")
    width = shapes["txt_in.weight"].shape[1]
    if detected != width:
        pytest.skip(f"this ComfyUI takes FLUX's text width as {detected}; the tiny FLUX test files are {width} "
                    "wide (CLIP-L). Run the FLUX file tests with ComfyUI 0.8.0 (COMFYUI_PATH).")


@contextmanager
def in_comfyui_folders(files: dict):
    """The folders of `files` ({kind: [paths]}) added to ComfyUI's model folders of their kind
    while the block runs (folder_paths as it was afterwards, its file list cache dropped)."""
    import folder_paths
    with pytest.MonkeyPatch.context() as mp:
        for kind in SPLIT_KINDS:
            paths, extensions = folder_paths.folder_names_and_paths[kind]
            folder = str(Path(files[kind][0]).parent)
            mp.setitem(folder_paths.folder_names_and_paths, kind, (list(paths) + [folder], extensions))
            mp.delitem(folder_paths.filename_list_cache, kind, raising=False)
        try:
            yield {kind: [Path(p).name for p in files[kind]] for kind in SPLIT_KINDS}
        finally:
            for kind in SPLIT_KINDS:
                folder_paths.filename_list_cache.pop(kind, None)
