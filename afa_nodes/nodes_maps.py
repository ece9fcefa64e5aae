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

import comfy.patcher_extension
import folder_paths
import numpy as np
import torch
from PIL import Image

from . import logger
from .core import map_render
from .core.errors import AFAError
from .core.map_recorder import MapRecorder, get_run, map_payload, run_info
from .core.map_selection import StepSelection, parse_points
from .ensemble_model import require_ensemble, with_recorder

CATEGORY = "AFA"
KEY = "afa_maps"
BRANCHES = ["cond", "uncond"]
POINTS_TOOLTIP = ("Aggregation points: 'all', indices '1, 24', ranges '0-11', names 'middle', 'final', "
                  "'input 3', 'output 10', or a whole stage 'input' / 'output'.")
STEPS_TOOLTIP = ("Sampler steps: 'all', 'every 5' (0, 5, 10, ... and the last), 'last 10', "
                 "or indices '0, 5, 10-12' (0 = the first step).")


def _outer_sample_wrapper(recorder: MapRecorder):
    """Each sampling run through the recording MODEL gets its own MapRun."""
    def afa_maps_outer_sample(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        recorder.begin_run(tuple(noise.shape), sigmas)
        try:
            out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        except BaseException as e:
            recorder.abort_run(type(e).__name__)
            raise
        recorder.end_run(out)
        return out
    return afa_maps_outer_sample


def record(model, points="all", steps="all", max_side=64, cap_mb=256, enabled=True):
    """(recording MODEL, MapRecorder). Off: the MODEL unchanged (no recorder, no cost)."""
    ensemble = require_ensemble(model, "AFA Record Attention")
    names = ensemble.layout.point_names
    if not enabled:
        return model, MapRecorder.disabled(ensemble.names, names, ensemble.mode)
    recorder = MapRecorder(ensemble.names, names, points, steps, max_side, cap_mb, mode=ensemble.mode)
    if ensemble.mode == "single model":
        logger.warning("AFA Record Attention: mode 'single model' mixes nothing, so no maps will be recorded.")
    clone = with_recorder(model, recorder)
    kind = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    clone.remove_wrappers_with_key(kind, KEY)
    clone.add_wrapper_with_key(kind, KEY, _outer_sample_wrapper(recorder))
    return clone, recorder


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
            StepSelection.parse(steps)
        except AFAError as e:
            return str(e)
        return True

    def record(self, model, enabled, points, steps, max_side, cap_mb):
        return record(model, points, steps, max_side, cap_mb, enabled)


# ---------------------------------------------------------------- preview
def resolve_points(spec: str, recorder: MapRecorder, run) -> list[str]:
    """Point names for a preview spec (same syntax as recording); each must have been recorded."""
    names = [recorder.all_points[i] for i in parse_points(spec, recorder.all_points)]
    missing = [p for p in names if p not in run.maps.point_names]
    if missing:
        raise AFAError(f"point(s) {', '.join(missing)} were not recorded in this run; recorded points: "
                       f"{', '.join(run.maps.point_names)} (AFA Record Attention 'points' = "
                       f"{', '.join(recorder.all_points[i] for i in recorder.points)}).")
    return names


def resolve_step(step: int, run) -> int:
    """-1 = the last recorded step; otherwise it must have been recorded."""
    steps = sorted(run.maps.steps)
    if step == -1:
        return steps[-1]
    if step not in steps:
        raise AFAError(f"step {step} was not recorded in this run; recorded steps: "
                       f"{', '.join(map(str, steps))} (-1 = the last).")
    return step


def render_all(run, points, step, branch, batch_index, image=None, cell=96):
    """(grid [P,H,W,3], dominant, overlay, chart) IMAGEs for one run."""
    maps = run.maps
    if branch not in maps.branches:
        hint = " (cfg 1.0 runs no uncond pass)" if branch == "uncond" else ""
        raise AFAError(f"no {branch!r} maps in this run{hint}; recorded branches: {', '.join(maps.branches)}.")
    if not 0 <= batch_index < run.batch:
        raise AFAError(f"batch_index {batch_index} is out of range: the run sampled {run.batch} image(s) "
                       f"(0..{run.batch - 1}).")
    grids = torch.cat([map_render.render_grid(maps, p, branch, batch_index, cell=cell) for p in points])
    dominant = map_render.render_dominant(maps, step, points[0], branch, batch_index)
    if image is not None:
        overlay = map_render.render_overlay(image, maps, step, points[0], branch, batch_index)
    else:
        overlay = dominant
    chart = map_render.render_mean_chart(maps, branch, batch_index)
    return grids, dominant, overlay, chart


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
        if not isinstance(maps, MapRecorder):
            raise AFAError("'maps' must come from AFA Record Attention.")
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor):
            raise AFAError("'latent' holds no samples tensor: connect a sampler's LATENT output.")
        run = maps.find_run(samples)
        names = resolve_points(points, maps, run)
        chosen = resolve_step(step, run)
        if image is not None and image.shape[0] not in (1, run.batch):
            raise AFAError(f"the image batch ({image.shape[0]}) does not match the sampled batch ({run.batch}): "
                           "connect VAE Decode of the same LATENT.")
        grids, dominant, overlay, chart = render_all(run, names, chosen, branch, batch_index, image, cell)
        shown = [grids, dominant] + ([overlay] if image is not None else []) + [chart]
        info = dict(run_info(run), view={"point": names[0], "step": chosen, "branch": branch,
                                          "batch_index": batch_index})
        ui = {"images": save_temp_images(shown), "afa_maps": [info]}
        return {"ui": ui, "result": (grids, dominant, overlay, chart)}


# ---------------------------------------------------------------- endpoint for the web viewer
def maps_response(run_id: str, query=None):
    """(status, JSON dict) for GET /afa/maps/{run_id} (run info) or, with step/point in
    `query`, one map (see map_recorder.map_payload)."""
    run = get_run(run_id)
    if run is None:
        return 404, {"error": f"the maps of run {run_id} are no longer in memory (ComfyUI restarted, or the "
                              "AFA Record Attention node ran again). Queue the workflow again."}
    if run.status != "finished":
        return 409, {"error": f"run {run_id} is {run.status}; its maps are shown once sampling has finished."}
    query = query or {}
    if "step" not in query and "point" not in query:
        return 200, run_info(run)
    try:
        step = int(query.get("step", run.maps.steps[-1] if run.maps.steps else 0))
        return 200, map_payload(run, step, query.get("point", ""), query.get("branch", "cond"),
                                int(query.get("batch", 0)))
    except (AFAError, ValueError) as e:
        return 400, {"error": str(e)}


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
