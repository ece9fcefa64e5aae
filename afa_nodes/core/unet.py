"""The LDM UNet family (SD1.x, SD2.x, SDXL): its layout, derived from the UNet's own
structure, and its walk (paper Algorithm 1 in LDM block terms).

Any LDM-style UNet (ComfyUI's UNetModel) has `input_blocks`, `middle_block`,
`output_blocks`, `time_embed` and an `out` head. AFA aggregates after every input block,
after the middle block, after every output block but the last, and once more on the
predicted noise ("final": last output block + `out` head). SD1.5 -> 25 points, SDXL -> 19.
The skip stack holds the MIXED features; host hooks (ControlNet residuals, block patches)
run once per block on the mixed feature.
"""
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .errors import AFAError, IncompatibleModelsError
from .family import AggregationPoint, Layout


class UNetExpert(Protocol):
    """One frozen UNet, block by block. Shapes: h (batch, channels, height, width)."""

    def embed(self, timesteps, y, dtype): ...                        # -> emb (batch, time_embed_dim)
    def run_block(self, stage, index, h, emb, context, output_shape=None): ...
    def head(self, h): ...                                           # `out` head -> eps


class UNetHooks:
    """Per-block host hooks (ControlNet residuals, block patches), each applied ONCE per
    block. `hs` is the list of per-model streams; after a mixed point all entries are the
    same tensor. Default: no-op."""

    def after_input(self, index, hs): return hs        # -> what goes onto the skip stack
    def after_skip(self, index, hs): return hs         # -> what feeds the next block
    def after_middle(self, hs): return hs
    def before_output(self, index, hs, skips): return hs, skips


@dataclass(frozen=True)
class UNetLayout(Layout):
    points: tuple            # AggregationPoint, in execution order
    context_dim: int         # cross-attention width (text)
    time_embed_dim: int
    adm_dim: int             # width of `y` (label embedding input), 0 when absent
    family = "unet"

    def signature(self):
        # no "family" key: aggregator files written before families existed must still match
        return {"points": self.points_signature(),
                "context_dim": self.context_dim, "time_embed_dim": self.time_embed_dim,
                "adm_dim": self.adm_dim}

    def walk(self, experts, inputs, engine):
        """inputs: x (batch, C, H, W), timesteps (batch,), contexts [per model], ys [per model]
        or None, hooks (UNetHooks) or None. -> the mixed eps prediction."""
        x, timesteps, contexts = inputs["x"], inputs["timesteps"], inputs["contexts"]
        n = len(experts)
        ys = inputs.get("ys") or [None] * n
        hooks = inputs.get("hooks") or UNetHooks()
        embs = [e.embed(timesteps, y, x.dtype) for e, y in zip(experts, ys)]
        temb = embs[0] if n == 1 else torch.stack(embs).mean(0)
        cbar = contexts[0] if all(c is contexts[0] for c in contexts) else torch.stack(contexts).mean(0)
        stages = [p.stage for p in self.points]
        num_input, num_output = stages.count("input"), stages.count("output") + 1
        point = 0
        hs, skips = [x] * n, []
        for i in range(num_input):
            outs = engine.run(lambda e, h, emb, c, i=i: e.run_block("input", i, h, emb, c), experts, hs, embs, contexts)
            hs = engine.mix(point, outs, temb, cbar)
            point += 1
            hs = hooks.after_input(i, hs)
            skips.append(hs)
            hs = hooks.after_skip(i, hs)
        outs = engine.run(lambda e, h, emb, c: e.run_block("middle", 0, h, emb, c), experts, hs, embs, contexts)
        hs = hooks.after_middle(engine.mix(point, outs, temb, cbar))
        point += 1
        for i in range(num_output):
            hs, skip = hooks.before_output(i, hs, skips.pop())
            hs = _concat_streams(hs, skip)
            shape = skips[-1][0].shape if skips else None
            last = i == num_output - 1

            def block(e, h, emb, c, i=i, shape=shape, last=last):
                out = e.run_block("output", i, h, emb, c, shape)
                return e.head(out) if last else out
            hs = engine.mix(point, engine.run(block, experts, hs, embs, contexts), temb, cbar)
            point += 1
        if any(h is not hs[0] for h in hs):
            raise AFAError("the mixer left the final noise predictions unmixed")
        return hs[0]


def _concat_streams(hs, skips):
    """Per stream cat([h, skip], channels); computed once when every stream is shared."""
    if all(h is hs[0] for h in hs) and all(s is skips[0] for s in skips):
        return [torch.cat([hs[0], skips[0]], dim=1)] * len(hs)
    return [torch.cat([h, s], dim=1) for h, s in zip(hs, skips)]


UNET_PARTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "out")


def matches(model: nn.Module) -> bool:
    return all(getattr(model, attr, None) is not None for attr in UNET_PARTS)


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


def derive_unet_layout(unet: nn.Module, what: str = "model") -> UNetLayout:
    for attr in UNET_PARTS:
        if getattr(unet, attr, None) is None:
            raise IncompatibleModelsError(
                f"{what} has no `{attr}`: it is a {type(unet).__name__}, not an LDM UNet.")
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
