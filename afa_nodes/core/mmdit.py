"""The MMDiT family (SD3, SD3.5 medium/large/turbo and their fine-tunes): its layout, derived
from the model's own structure, and its walk.

ComfyUI's `MMDiT` embeds the latent patches (`x_embedder` + positional embedding), the time
and pooled vector (`t_embedder` + `y_embedder` -> `c`) and the text (`context_embedder`),
then runs `joint_blocks` (image stream x and text stream context through joint attention; the
last block updates x only), then `final_layer`. In the ensemble every expert computes its own
embeddings and `c`; AFA mixes the image tokens (as a grid) after every joint block and once
more on the prediction ("final"). Text tokens follow the layout's `text_mixing` (core/dit.py).
"""
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .dit import TokenGrid, mean_of, mix_text, mix_tokens, private, shared, weight_group
from .errors import AFAError, IncompatibleModelsError
from .family import AggregationPoint, Layout


@dataclass
class MMDiTEmbedded:
    """One expert's embeddings: x (batch, grid tokens, width), context (batch, text tokens,
    width) or None, temb (batch, width) (its modulation input `c`, for the aggregator)."""
    x: torch.Tensor
    context: object
    temb: torch.Tensor
    grid: TokenGrid


class MMDiTExpert(Protocol):
    """One frozen MMDiT, block by block, with its own embeddings and block patches."""

    def embed(self) -> MMDiTEmbedded: ...
    def joint_block(self, index, x, context): ...   # -> (x, context); context None after the last
    def head(self, x): ...                          # final_layer -> (batch, grid, p*p*C)
    def unpatchify(self, tokens): ...               # -> (batch, C, H, W)


class MMDiTHooks:
    """Per-block host hooks (ControlNet residuals), once per block on the mixed image stream."""

    def after_joint(self, index, xs): return xs


@dataclass(frozen=True)
class MMDiTLayout(Layout):
    points: tuple                 # AggregationPoint: joint i, final
    context_dim: int              # text encoder width (context_embedder input; SD3: 4096)
    time_embed_dim: int           # width of the modulation vector c = hidden size
    adm_dim: int                  # pooled text width (y_embedder input; SD3: 2048), 0 when absent
    patch_size: int
    self_attn_blocks: tuple = ()  # blocks with the extra image self-attention (SD3.5 medium)
    text_mixing: str = "own"
    family = "mmdit"

    @property
    def num_blocks(self):
        return sum(p.stage == "joint" for p in self.points)

    def signature(self):
        return {"family": self.family, "points": self.points_signature(),
                "context_dim": self.context_dim, "time_embed_dim": self.time_embed_dim,
                "adm_dim": self.adm_dim, "patch_size": self.patch_size,
                "self_attn_blocks": list(self.self_attn_blocks), "text_mixing": self.text_mixing}

    def describe(self):
        return (f"{self.family} (SD3): {self.num_blocks} joint blocks of width {self.time_embed_dim}, "
                f"text {self.context_dim}, pooled {self.adm_dim}")

    def weight_group(self, point: AggregationPoint) -> str:
        return "output" if point.stage == "final" else weight_group(point.index, self.num_blocks)

    def walk(self, experts, inputs, engine):
        """inputs: contexts [per model] (raw text encodings, for the aggregator's text input),
        hooks (MMDiTHooks) or None. -> the mixed prediction (batch, C, H, W)."""
        hooks = inputs.get("hooks") or MMDiTHooks()
        embedded = [e.embed() for e in experts]
        grid = embedded[0].grid
        if any(e.grid != grid for e in embedded):
            raise AFAError("the experts embedded the input into different token grids; they must share the patch size.")
        temb = mean_of([e.temb for e in embedded])
        cbar = mean_of(inputs["contexts"])
        xs, contexts = [e.x for e in embedded], [e.context for e in embedded]
        for i in range(self.num_blocks):
            outs = engine.run(lambda e, x, c, i=i: e.joint_block(i, x, c), experts, private(xs), private(contexts))
            xs, mixed = mix_tokens(engine, i, [o[0] for o in outs], grid, temb, cbar, self.text_mixing)
            contexts = mix_text([o[1] for o in outs], self.text_mixing, mixed)
            xs = hooks.after_joint(i, xs)
        outs = engine.run(lambda e, x: e.head(x), experts, xs)
        final, _ = mix_tokens(engine, self.num_blocks, outs, grid, temb, cbar)
        if not shared(final):
            raise AFAError("the mixer left the final predictions unmixed")
        return experts[0].unpatchify(final[0])


MMDIT_PARTS = ("joint_blocks", "x_embedder", "t_embedder", "final_layer")


def matches(model: nn.Module) -> bool:
    return all(getattr(model, attr, None) is not None for attr in MMDIT_PARTS)


def derive_mmdit_layout(model: nn.Module, what: str = "model") -> MMDiTLayout:
    for attr in MMDIT_PARTS:
        if getattr(model, attr, None) is None:
            raise IncompatibleModelsError(f"{what} has no `{attr}`: it is a {type(model).__name__}, not an MMDiT (SD3).")
    hidden = model.hidden_size
    blocks = len(model.joint_blocks)
    points = [AggregationPoint("joint", i, hidden) for i in range(blocks)]
    points.append(AggregationPoint("final", blocks - 1, model.final_layer.linear.out_features))
    embedder = model.context_embedder
    y_embedder = getattr(model, "y_embedder", None)
    return MMDiTLayout(points=tuple(points),
                       context_dim=int(getattr(embedder, "in_features", hidden)),
                       time_embed_dim=hidden,
                       adm_dim=y_embedder.mlp[0].in_features if y_embedder is not None else 0,
                       patch_size=int(model.patch_size),
                       self_attn_blocks=tuple(i for i, b in enumerate(model.joint_blocks)
                                              if getattr(b.x_block, "x_block_self_attn", False)))
