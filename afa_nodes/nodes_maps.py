"""Attention maps: AFA Record Attention and AFA Attention Preview (+ the viewer's endpoint).

Wiring: Record Attention turns an AFA MODEL into a recording clone and returns an AFA_MAPS
handle (its `MapRecorder`). An OUTER_SAMPLE wrapper keyed "afa_maps" on that clone opens
a new run each time a sampler uses it and keeps the sampler's output latent with it. The
preview takes the handle AND the sampler's LATENT: it runs after that sampling and shows
the run that produced exactly this latent, so it cannot show maps of another run (a second
sampler on the same MODEL, an older run, a re-run with another seed).
The web viewer (web/afa_maps.js) reads GET /afa/maps/{run_id} (run info) and
GET /afa/maps/{run_id}?step=&point=&branch=&batch= (one map, uint8 base64).
"""
import os
import random
import sys

import folder_paths
import numpy as np
from PIL import Image

from .core.errors import AFAError
from .service import maps as service_maps
from .service.maps import BRANCHES, POINTS_HELP as POINTS_TOOLTIP, STEPS_HELP as STEPS_TOOLTIP, maps_response

CATEGORY = "AFA"
record = service_maps.record_maps  # until the CLI and the studio call service.maps themselves


class AFARecordAttention:
    DESCRIPTION = ("Records the aggregator's per-pixel model weights (AFA's attention maps) while a sampler "
                   "uses the MODEL. Connect MODEL to the sampler and AFA_MAPS + the sampler's LATENT to "
                   "AFA Attention Preview. Off: the MODEL passes through unchanged.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "AFA_MAPS")
    RETURN_NAMES = ("model", "maps")
    OUTPUT_TOOLTIPS = ("The same AFA MODEL, recording its weight maps.",
                       "Handle to the recorded runs, for AFA Attention Preview.")
    FUNCTION = "record"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An AFA MODEL (from AFA Ensemble Loader or AFA Ensemble)."}),
            "enabled": ("BOOLEAN", {"default": True, "tooltip": "Off: nothing is recorded and nothing slows down."}),
            "points": ("STRING", {"default": "all", "tooltip": POINTS_TOOLTIP}),
            "steps": ("STRING", {"default": "all", "tooltip": STEPS_TOOLTIP}),
            "max_side": ("INT", {"default": 64, "min": 4, "max": 512, "tooltip": "Maps are averaged down to at most this many pixels per side."}),
            "cap_mb": ("INT", {"default": 256, "min": 1, "max": 65536, "tooltip": "Memory for the recorded maps (CPU, fp16); recording stops with a warning when reached."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, steps):
        try:
            service_maps.check_steps(steps)
        except AFAError as e:
            return str(e)
        return True

    def record(self, model, enabled, points, steps, max_side, cap_mb):
        return service_maps.record_maps(model, points, steps, max_side, cap_mb, enabled)


# ---------------------------------------------------------------- preview
def save_temp_images(images, prefix="AFA_maps"):
    """PNG files in ComfyUI's temp dir, as PreviewImage writes them -> ui 'images' entries."""
    temp = folder_paths.get_temp_directory()
    prefix = f"{prefix}_{''.join(random.choice('abcdefghijklmnopqrstupvxyz') for _ in range(5))}"
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, temp, 0, 0)
    os.makedirs(folder, exist_ok=True)
    out = []
    for img in images:
        for i in range(img.shape[0]):
            file = f"{filename}_{counter:05}_.png"
            counter += 1
            arr = (img[i].clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(folder, file), compress_level=1)
            out.append({"filename": file, "subfolder": subfolder, "type": "temp"})
    return out


class AFAAttentionPreview:
    DESCRIPTION = ("Shows which model paints which region: per-step grids (paper Fig. 6), the dominant model, "
                   "an overlay on the decoded image and the mean weight per point, plus an interactive viewer. "
                   "Connect the AFA_MAPS of AFA Record Attention and the LATENT of the sampler that used its MODEL.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE", "IMAGE")
    RETURN_NAMES = ("grid", "dominant", "overlay", "chart")
    OUTPUT_TOOLTIPS = ("Rows = recorded steps, columns = models, one image per chosen point.",
                       "Per-pixel strongest model at the chosen step and (first) point.",
                       "The dominant model over the decoded image (the dominant map when no image is given).",
                       "Mean weight of each model at every recorded point.")
    FUNCTION = "preview"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "maps": ("AFA_MAPS", {"tooltip": "From AFA Record Attention."}),
            "latent": ("LATENT", {"tooltip": "The LATENT output of the sampler that used the recording MODEL."}),
            "points": ("STRING", {"default": "middle", "tooltip": "Point(s) for the grid; the first one for the dominant map. " + POINTS_TOOLTIP}),
            "step": ("INT", {"default": -1, "min": -1, "max": 10000, "tooltip": "Step for the dominant map and overlay; -1 = the last recorded."}),
            "branch": (BRANCHES, {"default": "cond", "tooltip": "Maps of the positive (cond) or negative (uncond) pass."}),
            "batch_index": ("INT", {"default": 0, "min": 0, "max": 4095, "tooltip": "Which image of the batch."}),
            "cell": ("INT", {"default": 96, "min": 40, "max": 512, "tooltip": "Grid cell size in pixels."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "The decoded image (VAE Decode of the same LATENT) for the overlay."}),
        }}

    def preview(self, maps, latent, points, step, branch, batch_index, cell, image=None):
        shown = service_maps.preview_maps(maps, latent, points, step, branch, batch_index, cell, image)
        ui = {"images": save_temp_images(shown.shown), "afa_maps": [shown.info]}
        return {"ui": ui, "result": shown.images}


# ---------------------------------------------------------------- endpoint for the web viewer
def register_routes() -> bool:
    """Add the viewer's routes when running inside the ComfyUI server (not as a library)."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    from aiohttp import web

    async def get_maps(request):
        status, body = maps_response(request.match_info["run_id"], dict(request.rel_url.query))
        return web.json_response(body, status=status)

    instance.routes.get("/afa/maps/{run_id}")(get_maps)
    return True


register_routes()

NODE_CLASS_MAPPINGS = {
    "AFARecordAttention": AFARecordAttention,
    "AFAAttentionPreview": AFAAttentionPreview,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AFARecordAttention": "AFA Record Attention",
    "AFAAttentionPreview": "AFA Attention Preview",
}
