"""Attention maps (V3 schema): AFA Record Attention and AFA Attention Preview, plus the web
viewer's HTTP route. The nodes validate, call service.maps and shape the result.

Record Attention turns an AFA MODEL into a recording clone and returns an AFA_MAPS handle
(its `MapRecorder`). The preview takes the handle AND the sampler's LATENT: it runs after
that sampling and shows the run that produced exactly this latent (service.maps.preview_maps).
The web viewer (web/afa_maps.js) reads GET /afa/maps/{run_id} (run info) and
GET /afa/maps/{run_id}?step=&point=&branch=&batch= (one map, uint8 base64); the route is
added by `register_routes`, which the pack's ComfyExtension calls when ComfyUI loads it.
"""
import random
import sys

from comfy_api.v0_0_2 import io, ui

from .core.errors import check_result
from .service import maps as service_maps
from .service.maps import BRANCHES, POINTS_HELP, STEPS_HELP, maps_response

CATEGORY = "AFA"
ROUTE = "/afa/maps/{run_id}"
Maps = io.Custom("AFA_MAPS")


class AFARecordAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AFARecordAttention", display_name="AFA Record Attention", category=CATEGORY,
            description=("Records the aggregator's per-pixel model weights (AFA's attention maps) while a sampler "
                         "uses the MODEL. Connect MODEL to the sampler and AFA_MAPS + the sampler's LATENT to "
                         "AFA Attention Preview. Off: the MODEL passes through unchanged."),
            inputs=[
                io.Model.Input("model", tooltip="An AFA MODEL (from AFA Ensemble Loader or AFA Ensemble)."),
                io.Boolean.Input("enabled", default=True, tooltip="Off: nothing is recorded and nothing slows down."),
                io.String.Input("points", default="all", tooltip=POINTS_HELP),
                io.String.Input("steps", default="all", tooltip=STEPS_HELP),
                io.Int.Input("max_side", default=64, min=4, max=512,
                             tooltip="Maps are averaged down to at most this many pixels per side."),
                io.Int.Input("cap_mb", default=256, min=1, max=65536,
                             tooltip="Memory for the recorded maps (CPU, fp16); recording stops with a warning "
                                     "when reached."),
            ],
            # output ids differ from input ids (ComfyUI v0.3.64 requires it); the names shown stay model, maps
            outputs=[io.Model.Output("recording_model", display_name="model",
                                     tooltip="The same AFA MODEL, recording its weight maps."),
                     Maps.Output("maps", display_name="maps",
                                 tooltip="Handle to the recorded runs, for AFA Attention Preview.")])

    @classmethod
    def validate_inputs(cls, steps):
        return check_result(service_maps.check_steps, steps)

    @classmethod
    def execute(cls, model, enabled, points, steps, max_side, cap_mb) -> io.NodeOutput:
        return io.NodeOutput(*service_maps.record_maps(model, points, steps, max_side, cap_mb, enabled))


class AFAAttentionPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AFAAttentionPreview", display_name="AFA Attention Preview", category=CATEGORY,
            is_output_node=True,
            description=("Shows which model paints which region: per-step grids (paper Fig. 6), the dominant model, "
                         "an overlay on the decoded image and the mean weight per point, plus an interactive "
                         "viewer. Connect the AFA_MAPS of AFA Record Attention and the LATENT of the sampler that "
                         "used its MODEL."),
            inputs=[
                Maps.Input("maps", tooltip="From AFA Record Attention."),
                io.Latent.Input("latent", tooltip="The LATENT output of the sampler that used the recording MODEL."),
                io.String.Input("points", default="middle", tooltip="Point(s) for the grid; the first one for the "
                                                                    "dominant map. " + POINTS_HELP),
                io.Int.Input("step", default=-1, min=-1, max=10000,
                             tooltip="Step for the dominant map and overlay; -1 = the last recorded."),
                io.Combo.Input("branch", options=BRANCHES, default="cond",
                               tooltip="Maps of the positive (cond) or negative (uncond) pass."),
                io.Int.Input("batch_index", default=0, min=0, max=4095, tooltip="Which image of the batch."),
                io.Int.Input("cell", default=96, min=40, max=512, tooltip="Grid cell size in pixels."),
                io.Image.Input("image", optional=True,
                               tooltip="The decoded image (VAE Decode of the same LATENT) for the overlay."),
            ],
            outputs=[io.Image.Output("grid", display_name="grid",
                                     tooltip="Rows = recorded steps, columns = models, one image per chosen point."),
                     io.Image.Output("dominant", display_name="dominant",
                                     tooltip="Per-pixel strongest model at the chosen step and (first) point."),
                     io.Image.Output("overlay", display_name="overlay",
                                     tooltip="The dominant model over the decoded image (the dominant map when no "
                                             "image is given)."),
                     io.Image.Output("chart", display_name="chart",
                                     tooltip="Mean weight of each model at every recorded point.")])

    @classmethod
    def execute(cls, maps, latent, points, step, branch, batch_index, cell, image=None) -> io.NodeOutput:
        shown = service_maps.preview_maps(maps, latent, points, step, branch, batch_index, cell, image)
        shown_ui = {"images": save_temp_images(shown.shown, cls), "afa_maps": [shown.info]}
        return io.NodeOutput(*shown.images, ui=shown_ui)


def save_temp_images(images, cls=None) -> list:
    """PNG files in ComfyUI's temp folder, as a preview writes them (one random prefix per
    call; images of different sizes allowed) -> the UI's 'images' entries."""
    prefix = "AFA_maps_" + "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
    out = []
    for img in images:
        out += ui.ImageSaveHelper.save_images(img, prefix, io.FolderType.temp, cls, compress_level=1)
    return out


# ---------------------------------------------------------------- the web viewer's route
_ROUTE_ADDED = []


def register_routes() -> bool:
    """Add GET /afa/maps/{run_id} to the running ComfyUI server (once); False when there is no
    server (ComfyUI used as a library)."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    if instance in _ROUTE_ADDED:
        return True
    from aiohttp import web

    async def get_maps(request):
        status, body = maps_response(request.match_info["run_id"], dict(request.rel_url.query))
        return web.json_response(body, status=status)

    instance.routes.get(ROUTE)(get_maps)
    _ROUTE_ADDED.append(instance)
    return True


NODES = [AFARecordAttention, AFAAttentionPreview]
