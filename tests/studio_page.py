"""One running AFA Studio shown in headless chromium, with a LoRA and a ControlNet in ComfyUI's
folders and an aggregator in models/afa (tests/tiny_models.py), and every checkpoint load
counted: what the studio's chromium feature tests share (test_studio_features.py,
test_studio_generate_browser.py)."""
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
from browser import STUDIO_READY, open_page
from PIL import Image
from test_studio import DATASET, serve_studio
from tiny_models import build_aggregator, build_controlnet, build_lora
from toy_dataset import make_dataset

SIZE = {"afa-gen-width": 64, "afa-gen-height": 64, "afa-gen-steps": 2, "afa-gen-cfg": 2}
LORA, CONTROLNET, AGGREGATOR = "tiny_lora.safetensors", "tiny_controlnet.safetensors", "features_agg.safetensors"


@contextmanager
def studio_page(comfy, checkpoints, browser, root):
    """-> SimpleNamespace(b, app, names (2 checkpoints), root, loads (paths loaded, in order))."""
    import comfy.sd as comfy_sd
    import folder_paths
    for sub in ("loras", "controlnet", "demo"):
        (root / sub).mkdir()
        if sub != "demo":
            folder_paths.add_model_folder_path(sub, str(root / sub))
    for p in checkpoints:  # the demo folder: the test cache's demo files (nothing is built)
        (root / "demo" / p.name).symlink_to(p.resolve())
    unet = comfy_sd.load_checkpoint_guess_config(str(checkpoints[0]), output_vae=False,
                                                 output_clip=False)[0].model
    build_lora(root / "loras" / LORA, unet)
    build_controlnet(root / "controlnet" / CONTROLNET)
    build_aggregator(comfy.models_dir / "afa" / AGGREGATOR, checkpoints[0])
    make_dataset(comfy.input_dir / DATASET)
    loads = []
    real = comfy_sd.load_checkpoint_guess_config

    def counting(path, *args, **kwargs):
        loads.append(str(path))
        return real(path, *args, **kwargs)
    with pytest.MonkeyPatch.context() as mp, serve_studio(comfy) as app:
        mp.setattr(comfy_sd, "load_checkpoint_guess_config", counting)
        app.studio.demo_folder = str(root / "demo")
        open_page(browser, app.url, STUDIO_READY, what="the studio page and its first status poll")
        yield SimpleNamespace(b=browser, app=app, names=[p.name for p in checkpoints[:2]], root=root, loads=loads)


def pixels(path) -> np.ndarray:
    """An image file -> float32 [H, W, 3] in 0..1."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255


def mse(a, b) -> float:
    return float(((a - b) ** 2).mean())
