"""Registers the pack with ComfyUI as ONE V3 extension (`comfy_entrypoint`).

ComfyUI loads a custom node package by NODE_CLASS_MAPPINGS when the package has one and only
otherwise calls comfy_entrypoint(), so the pack defines no NODE_CLASS_MAPPINGS anywhere: every
node (nodes_ensemble, nodes_maps, nodes_train) is a V3 `io.ComfyNode` listed by
`AFAExtension.get_node_list`.

The node modules import ComfyUI's API as `comfy_api.v0_0_2`: the newest versioned API that
both v0.3.64 and v0.8.0 ship. ComfyUI keeps versioned modules for extensions written against
them, while `comfy_api.latest` is the moving target; today v0_0_2's `io`/`ui` are latest's
objects in both versions, and what only newer ComfyUIs have (io.Autogrow) is detected with
hasattr, with a fallback (nodes_ensemble).

Importing this module does nothing but define things. The work of starting the pack (the
models/afa folder, the maps viewer's HTTP route, the prompt handler that accepts both
growing-input naming styles) is `AFAExtension.on_load`. ComfyUI v0.3.64 to v0.8.0 define
`on_load` but never call it, so `get_node_list` (which ComfyUI calls once, at load) runs it
first; it is idempotent, so a ComfyUI that calls it as well does no harm.
"""
import sys

from comfy_api.v0_0_2 import ComfyExtension, io

from . import logger, nodes_ensemble, nodes_maps, nodes_train, nodes_winmap
from .service.models import register_afa_folder


def node_classes() -> list:
    """Every node of the pack, in the order of the node library."""
    train = getattr(nodes_train, "NODES", None)
    if train is None:
        raise ImportError("afa_nodes/nodes_train.py defines no NODES list of V3 nodes: AFA Train Aggregator "
                          "must be an io.ComfyNode listed in nodes_train.NODES (the pack registers V3 nodes only).")
    return [*nodes_ensemble.NODES, *train, *nodes_maps.NODES, *nodes_winmap.NODES]


def accept_both_slot_names(json_data: dict) -> dict:
    """ComfyUI on_prompt handler: growing-input slots named in the other style (a prompt saved
    before Autogrow, 'model_3'; or one saved with it, 'models.model_3') get this ComfyUI's names."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if isinstance(prompt, dict):
        renamed = nodes_ensemble.legacy_prompt_inputs(prompt)
        if renamed:
            logger.info("AFA: renamed %d input(s) of an older workflow to this ComfyUI's slot names", renamed)
    return json_data


class AFAExtension(ComfyExtension):
    def __init__(self):
        self.loaded = False

    async def on_load(self) -> None:
        if self.loaded:
            return
        register_afa_folder()
        if nodes_maps.register_routes():  # inside the ComfyUI server
            server = sys.modules["server"].PromptServer.instance
            if accept_both_slot_names not in server.on_prompt_handlers:
                server.add_on_prompt_handler(accept_both_slot_names)
        self.loaded = True

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        await self.on_load()
        return node_classes()


def comfy_entrypoint() -> AFAExtension:
    return AFAExtension()
