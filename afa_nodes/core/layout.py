"""Which family a diffusion model belongs to, its layout derived from its own structure, and
whether experts match. Families: "unet" (LDM UNets: SD1.x, SD2.x, SDXL, core/unet.py),
"flux" (FLUX.1 dev/schnell and fine-tunes) and "chroma" (core/flux.py), "mmdit" (SD3/SD3.5,
core/mmdit.py), "qwen_image" (Qwen-Image, core/qwen.py).
A new family adds its `matches` / `derive` pair to FAMILIES (see core/family.py for what a
family provides).
"""
from torch import nn

from . import flux, mmdit, qwen, unet
from .errors import IncompatibleModelsError
from .family import AggregationPoint, Layout, signature_family  # noqa: F401  (the layout vocabulary)
from .flux import ChromaLayout, FluxLayout  # noqa: F401
from .mmdit import MMDiTLayout  # noqa: F401
from .qwen import QwenLayout  # noqa: F401
from .unet import UNetLayout  # noqa: F401

# (matches(model) -> bool, derive(model, what) -> Layout), tried in order
FAMILIES = [(unet.matches, unet.derive_unet_layout),
            (flux.matches, flux.derive_flux_layout),
            (flux.matches_chroma, flux.derive_chroma_layout),
            (mmdit.matches, mmdit.derive_mmdit_layout),
            (qwen.matches, qwen.derive_qwen_layout)]
FAMILY_NAMES = {"unet": "an LDM UNet (SD1.x, SD2.x, SDXL)", "flux": "a FLUX model (FLUX.1 dev/schnell, fine-tunes)",
                "chroma": "a Chroma model", "mmdit": "an MMDiT (SD3, SD3.5)",
                "qwen_image": "a Qwen-Image model"}


def derive_layout(model: nn.Module, what: str = "model") -> Layout:
    """The layout of a diffusion model (ComfyUI's `diffusion_model` module), from its structure."""
    for matches, derive in FAMILIES:
        if matches(model):
            return derive(model, what)
    raise IncompatibleModelsError(
        f"{what} is a {type(model).__name__}, which AFA cannot ensemble yet: supported are "
        f"{', '.join(FAMILY_NAMES.values())}.")


def check_same_layout(layouts, names):
    """All experts must share one layout; otherwise their block features cannot be mixed."""
    first = layouts[0].signature()
    for layout, name in zip(layouts[1:], names[1:]):
        other = layout.signature()
        if other == first:
            continue
        if layout.family != layouts[0].family:
            raise IncompatibleModelsError(
                f"'{name}' is {FAMILY_NAMES.get(layout.family, layout.family)} but '{names[0]}' is "
                f"{FAMILY_NAMES.get(layouts[0].family, layouts[0].family)}: AFA mixes block features, so all "
                "models must share one architecture (one family, one size). Ensemble models of one family.")
        diffs = [k for k in first if first[k] != other.get(k)]
        raise IncompatibleModelsError(
            f"'{name}' does not match '{names[0]}' ({', '.join(diffs) or 'family'} differ: "
            f"{layouts[0].describe()} vs {layout.describe()}). AFA mixes block features, so all "
            "models must share one architecture (e.g. all SD1.5 or all SDXL fine-tunes).")
