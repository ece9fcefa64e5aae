"""A tiny captioned training set for the training tests (node, CLI, studio)."""
from pathlib import Path

import numpy as np
from PIL import Image


def make_dataset(folder: Path, n=6, size=64, aspect=False) -> Path:
    """n noisy red/blue images with .txt captions ("a red picture" / "a blue picture"); `aspect`:
    pairs of wide (5:2) and tall (2:5) images instead of squares. Same files on every call."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        base = np.array([255, 40, 40] if k % 2 else [40, 40, 255], dtype=np.float32)
        long = 5 * size // 2
        shape = ((size, long) if (k // 2) % 2 == 0 else (long, size)) if aspect else (size, size)
        pixels = np.clip(base + rng.normal(0, 40, shape + (3,)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{k}.png")
        (folder / f"img_{k}.txt").write_text("a red picture" if k % 2 else "a blue picture")
    return folder
