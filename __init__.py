"""ComfyUI-AFA: ensemble 2-6 diffusion models with Adaptive Feature Aggregation (ICLR 2025).

ComfyUI loads the pack through `comfy_entrypoint` (V3 nodes, afa_nodes/nodes.py). There is
deliberately no NODE_CLASS_MAPPINGS here: ComfyUI would then ignore comfy_entrypoint.
"""
import os
import sys

# Import the pack as top-level `afa_nodes`, the same module the CLI and tests use, so that
# one process never holds two copies of its classes and state.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

WEB_DIRECTORY = "./web"


def comfy_entrypoint():
    """ComfyUI's V3 entry point (imports ComfyUI's API only when ComfyUI calls it)."""
    from afa_nodes.nodes import comfy_entrypoint as entrypoint
    return entrypoint()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
