"""Images, host-free: the one home of ComfyUI IMAGE <-> PIL conversion, and PNG files with text chunks."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .files import atomic_write


def to_image(img: Image.Image) -> torch.Tensor:
    """PIL -> ComfyUI IMAGE [1, H, W, 3] float32 0..1."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def to_pil(image: torch.Tensor) -> Image.Image:
    """ComfyUI IMAGE [1, H, W, 3] (or [H, W, 3]) -> PIL RGB."""
    a = image[0] if image.dim() == 4 else image
    return Image.fromarray((a.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))


def save_png(image: torch.Tensor, path, texts: Mapping[str, object] | None = None) -> Path:
    """IMAGE [H, W, 3] 0..1 -> PNG at `path`, written under a temporary name and renamed.
    Each entry of `texts` becomes a PNG text chunk: strings as they are, anything else as
    JSON; None values are left out (e.g. {"afa": settings, "prompt": comfy_graph})."""
    path = Path(path)
    info = PngInfo()
    for key, value in (texts or {}).items():
        if value is not None:
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    picture = to_pil(image)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG", pnginfo=info))
    return path
