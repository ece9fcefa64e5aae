"""Writing a ComfyUI IMAGE as a PNG file with text chunks (host-free)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .files import atomic_write


def save_png(image: torch.Tensor, path, texts: Mapping[str, object] | None = None) -> Path:
    """IMAGE [H, W, 3] 0..1 -> PNG at `path`, written under a temporary name and renamed.
    Each entry of `texts` becomes a PNG text chunk: strings as they are, anything else as
    JSON; None values are left out (e.g. {"afa": settings, "prompt": comfy_graph})."""
    path = Path(path)
    pixels = (image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    info = PngInfo()
    for key, value in (texts or {}).items():
        if value is not None:
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info))
    return path
