"""Collects every node of the pack (one V1 node style throughout, ids prefixed AFA)."""
from . import nodes_ensemble, nodes_maps, nodes_train
from .nodes_ensemble import register_afa_folder

NODE_MODULES = [nodes_ensemble, nodes_train, nodes_maps]

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for module in NODE_MODULES:
    NODE_CLASS_MAPPINGS.update(module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(module.NODE_DISPLAY_NAME_MAPPINGS)

register_afa_folder()
