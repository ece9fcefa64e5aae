"""ComfyUI-AFA: ensembling diffusion models via Adaptive Feature Aggregation.

`afa_nodes.core` is host-free torch code; everything else adapts it to ComfyUI.
"""
import logging

logger = logging.getLogger("ComfyUI-AFA")
