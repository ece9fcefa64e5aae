"""Aggregation points, derived from the UNet's own structure (no per-family tables).

Any LDM-style UNet (ComfyUI's UNetModel, SD1.x/2.x/SDXL) has `input_blocks`,
`middle_block`, `output_blocks`, `time_embed` and an `out` head. AFA aggregates after
every input block, after the middle block, after every output block but the last,
and once more on the predicted noise ("final": last output block + `out` head).
SD1.5 -> 25 points, SDXL -> 19.
"""
from dataclasses import asdict, dataclass

from torch import nn

from .errors import IncompatibleModelsError


@dataclass(frozen=True)
class AggregationPoint:
    stage: str       # "input" | "middle" | "output" | "final"
    index: int       # block index within the stage (final: index of the last output block)
    channels: int    # feature width of one model at this point

    @property
    def name(self) -> str:
        return self.stage if self.stage in ("middle", "final") else f"{self.stage} {self.index}"

    def to_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class UNetLayout:
    points: tuple            # AggregationPoint, in execution order
    context_dim: int         # cross-attention width (text)
    time_embed_dim: int
    adm_dim: int             # width of `y` (label embedding input), 0 when absent

    @property
    def point_channels(self):
        return [p.channels for p in self.points]

    @property
    def point_names(self):
        return [p.name for p in self.points]

    def signature(self):
        """What must match between experts, and between an aggregator file and a MODEL."""
        return {"points": [[p.stage, p.index, p.channels] for p in self.points],
                "context_dim": self.context_dim, "time_embed_dim": self.time_embed_dim,
                "adm_dim": self.adm_dim}


def _block_out_channels(block: nn.Module, where: str) -> int:
    """Output width of a block: its last layer's `out_channels`, or `in_channels` for
    width-preserving layers (spatial transformers)."""
    for layer in reversed(list(block.children()) or [block]):
        for attr in ("out_channels", "in_channels"):
            value = getattr(layer, attr, None)
            if isinstance(value, int):
                return value
    raise IncompatibleModelsError(f"cannot tell the output channels of {where} ({type(block).__name__}); "
                                  "AFA supports LDM UNets (SD1.x, SD2.x, SDXL).")


def _context_dim(unet: nn.Module) -> int:
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            return module.to_k.in_features
    return 0


def derive_layout(unet: nn.Module, what: str = "model") -> UNetLayout:
    for attr in ("input_blocks", "middle_block", "output_blocks", "time_embed", "out"):
        if getattr(unet, attr, None) is None:
            raise IncompatibleModelsError(
                f"{what} has no `{attr}`: it is a {type(unet).__name__}, not an LDM UNet. "
                "AFA supports SD1.x, SD2.x and SDXL UNets; DiT models (FLUX, SD3) are not supported yet.")
    points = [AggregationPoint("input", i, _block_out_channels(b, f"input block {i}"))
              for i, b in enumerate(unet.input_blocks)]
    points.append(AggregationPoint("middle", 0, _block_out_channels(unet.middle_block, "middle block")))
    last = len(unet.output_blocks) - 1
    points += [AggregationPoint("output", i, _block_out_channels(b, f"output block {i}"))
               for i, b in enumerate(unet.output_blocks) if i < last]
    points.append(AggregationPoint("final", last, _block_out_channels(unet.out, "out head")))
    label_emb = getattr(unet, "label_emb", None)
    adm_dim = 0
    if label_emb is not None:
        first_linear = next(m for m in label_emb.modules() if isinstance(m, nn.Linear))
        adm_dim = first_linear.in_features
    return UNetLayout(points=tuple(points), context_dim=_context_dim(unet),
                      time_embed_dim=unet.time_embed[-1].out_features, adm_dim=adm_dim)


def check_same_layout(layouts, names):
    """All experts must share one layout; otherwise their block features cannot be mixed."""
    first = layouts[0].signature()
    for layout, name in zip(layouts[1:], names[1:]):
        other = layout.signature()
        if other == first:
            continue
        diffs = [k for k in first if first[k] != other[k]]
        raise IncompatibleModelsError(
            f"'{name}' does not match '{names[0]}' ({', '.join(diffs)} differ: "
            f"{_describe(layouts[0])} vs {_describe(layout)}). AFA mixes block features, so all "
            "models must share one architecture (e.g. all SD1.5 or all SDXL fine-tunes).")


def _describe(layout: UNetLayout) -> str:
    return (f"{len(layout.points)} points, context {layout.context_dim}, "
            f"channels {'/'.join(str(c) for c in sorted(set(layout.point_channels)))}")
