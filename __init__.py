"""ComfyUI-AFA: ensemble 2-6 diffusion models with Adaptive Feature Aggregation (ICLR 2025)."""
import importlib.util
import os
import sys

# Import the pack as top-level `afa_nodes`, the same module the CLI and tests use, so that
# one process never holds two copies of its classes and state.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
if importlib.util.find_spec("comfy") is not None:  # outside ComfyUI (pytest, pip) there are no nodes
    from afa_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
