"""Collects every node of the pack (one V1 node style throughout, ids prefixed AFA)."""
from . import nodes_ensemble
from .nodes_ensemble import register_afa_folder

NODE_MODULES = [nodes_ensemble]

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for module in NODE_MODULES:
    NODE_CLASS_MAPPINGS.update(module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(module.NODE_DISPLAY_NAME_MAPPINGS)

register_afa_folder()
