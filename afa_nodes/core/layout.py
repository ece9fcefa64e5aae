"""Aggregation points and layouts, architecture-neutral.

A *layout* is one architecture family's program for the ensemble: its aggregation points
(in execution order, with each point's feature width), what must match between experts
(`signature()`), and `walk(experts, inputs, engine)`: how each block is called and what is
carried between blocks (the skip stack of a UNet; image and text streams of a DiT). The
executor (core.ensemble) supplies the engine: it runs a block on every expert and mixes
the outputs at a point. A new model family is a new layout class plus a `derive` function
registered in FAMILIES; the engine and the mixers stay as they are.

Families today: "unet" (LDM UNets: SD1.x, SD2.x, SDXL), see core/unet.py.
"""
from dataclasses import asdict, dataclass

from torch import nn

from .errors import IncompatibleModelsError


@dataclass(frozen=True)
class AggregationPoint:
    stage: str       # family-specific block group, e.g. "input" | "middle" | "output" | "final"
    index: int       # block index within the stage (final: index of the last block)
    channels: int    # feature width of one model at this point

    @property
    def name(self) -> str:
        return self.stage if self.stage in ("middle", "final") else f"{self.stage} {self.index}"

    def to_dict(self):
        return asdict(self)


class Layout:
    """Base of every family's layout (a frozen dataclass with at least `points`,
    `context_dim` and `time_embed_dim`)."""
    family = "?"

    @property
    def point_channels(self):
        return [p.channels for p in self.points]

    @property
    def point_names(self):
        return [p.name for p in self.points]

    def signature(self) -> dict:
        """What must match between experts, and between an aggregator file and a MODEL."""
        raise NotImplementedError

    def describe(self) -> str:
        return (f"{self.family}: {len(self.points)} points, context {self.context_dim}, "
                f"channels {'/'.join(str(c) for c in sorted(set(self.point_channels)))}")

    def walk(self, experts, inputs: dict, engine):
        """Run the ensemble once: `inputs` holds the family's model inputs (x, timesteps,
        contexts, ...); `engine.run_block` / `engine.mix` run and mix one block. -> prediction."""
        raise NotImplementedError


def signature_family(signature: dict) -> str:
    """Aggregator files written before families existed hold UNet signatures without the key."""
    return signature.get("family", "unet")


def _families():
    from . import unet
    return [(unet.matches, unet.derive_unet_layout)]


def derive_layout(model: nn.Module, what: str = "model") -> Layout:
    """The layout of a diffusion model (ComfyUI's `diffusion_model` module), from its structure."""
    for matches, derive in _families():
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


def __getattr__(name):
    """`UNetLayout` lives in core/unet.py (which imports this module); reachable here too."""
    if name == "UNetLayout":
        from .unet import UNetLayout
        return UNetLayout
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
