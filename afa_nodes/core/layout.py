"""Which family a diffusion model belongs to, its layout derived from its own structure, and
whether experts match. Families today: "unet" (LDM UNets: SD1.x, SD2.x, SDXL, core/unet.py).
A new family adds its `matches` / `derive` pair to FAMILIES (see core/family.py for what a
family provides).
"""
from torch import nn

from . import unet
from .errors import IncompatibleModelsError
from .family import AggregationPoint, Layout, signature_family  # noqa: F401  (the layout vocabulary)
from .unet import UNetLayout  # noqa: F401

# (matches(model) -> bool, derive(model, what) -> Layout), tried in order
FAMILIES = [(unet.matches, unet.derive_unet_layout)]


def derive_layout(model: nn.Module, what: str = "model") -> Layout:
    """The layout of a diffusion model (ComfyUI's `diffusion_model` module), from its structure."""
    for matches, derive in FAMILIES:
        if matches(model):
            return derive(model, what)
    raise IncompatibleModelsError(
        f"{what} is a {type(model).__name__}, which AFA cannot ensemble yet: supported are LDM UNets "
        "(SD1.x, SD2.x, SDXL). DiT models (FLUX, SD3) are not supported yet.")


def check_same_layout(layouts, names):
    """All experts must share one layout; otherwise their block features cannot be mixed."""
    first = layouts[0].signature()
    for layout, name in zip(layouts[1:], names[1:]):
        other = layout.signature()
        if other == first:
            continue
        diffs = [k for k in first if first[k] != other.get(k)]
        raise IncompatibleModelsError(
            f"'{name}' does not match '{names[0]}' ({', '.join(diffs) or 'family'} differ: "
            f"{layouts[0].describe()} vs {layout.describe()}). AFA mixes block features, so all "
            "models must share one architecture (e.g. all SD1.5 or all SDXL fine-tunes).")
