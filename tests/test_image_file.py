"""core.image_file.save_png: pixels, text chunks, no temporary file left behind."""
import json

import numpy as np
import torch
from PIL import Image

from afa_nodes.core.image_file import save_png


def test_save_png_writes_pixels_and_text_chunks(tmp_path):
    image = torch.linspace(-0.5, 1.5, 4 * 6 * 3).reshape(4, 6, 3)  # [H, W, 3], clamped to 0..1
    path = save_png(image, tmp_path / "out.png", {"afa": {"seed": 7}, "note": "plain", "prompt": None})
    assert path == tmp_path / "out.png" and [p.name for p in tmp_path.iterdir()] == ["out.png"]
    with Image.open(path) as im:
        assert im.size == (6, 4) and im.text == {"afa": json.dumps({"seed": 7}), "note": "plain"}
        pixels = np.asarray(im)
    assert np.array_equal(pixels, (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    save_png(image, path)  # no texts: a plain PNG replaces the file
    with Image.open(path) as im:
        assert im.text == {}
