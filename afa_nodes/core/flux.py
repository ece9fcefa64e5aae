"""The FLUX family (FLUX.1 dev/schnell and their fine-tunes, FLUX Kontext; FLUX.2's global
modulation): its layout, derived from the model's own structure, and its walk.

ComfyUI's `Flux` embeds the latent patches (`img_in`), the time / guidance / pooled vector
(`time_in`, `guidance_in`, `vector_in`) and the text (`txt_in`), then runs `double_blocks`
(image and text streams side by side) and `single_blocks` (one sequence: text tokens, then
image tokens), then `final_layer` on the image tokens. In the ensemble every expert computes
its own embeddings and its own modulation vector; AFA mixes the image tokens (as a grid)
after every double block, after every single block, and once more on the prediction
("final"). Text tokens follow the layout's `text_mixing` (core/dit.py).
"""
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .dit import TokenGrid, mean_of, mix_text, mix_tokens, private, shared, weight_group
from .errors import AFAError, IncompatibleModelsError
from .family import AggregationPoint, Layout


@dataclass
class FluxEmbedded:
    """One expert's embeddings: img (batch, grid + reference tokens, width), txt (batch, text
    tokens, width), temb (batch, width) (its modulation input `vec`, for the aggregator)."""
    img: torch.Tensor
    txt: torch.Tensor
    temb: torch.Tensor
    grid: TokenGrid


class FluxExpert(Protocol):
    """One frozen FLUX model, block by block, with its own embeddings and block patches."""

    def embed(self) -> FluxEmbedded: ...
    def double_block(self, index, img, txt): ...      # -> (img, txt)
    def single_block(self, index, seq): ...           # seq = cat(txt, img) -> seq
    def head(self, img): ...                          # final_layer on the grid tokens
    def unpatchify(self, tokens): ...                 # (batch, grid, p*p*C) -> (batch, C, H, W)


class FluxHooks:
    """Per-block host hooks (ControlNet residuals), applied once per block on the mixed
    streams (per stream where the streams are not mixed). Default: no-op."""

    def after_double(self, index, imgs): return imgs
    def after_single(self, index, seqs, text_tokens): return seqs


@dataclass(frozen=True)
class FluxLayout(Layout):
    points: tuple                 # AggregationPoint: double i, single i, final
    context_dim: int              # text encoder width (txt_in input; T5-XXL: 4096)
    time_embed_dim: int           # width of the modulation vector = hidden size
    vec_dim: int                  # pooled text width (vector_in input; CLIP-L: 768), 0 when absent
    guidance: bool                # guidance-distilled (dev) vs not (schnell)
    patch_size: int
    global_modulation: bool = False
    text_mixing: str = "own"
    family = "flux"

    @property
    def num_double(self):
        return sum(p.stage == "double" for p in self.points)

    @property
    def num_single(self):
        return sum(p.stage == "single" for p in self.points)

    def signature(self):
        return {"family": self.family, "points": [[p.stage, p.index, p.channels] for p in self.points],
                "context_dim": self.context_dim, "time_embed_dim": self.time_embed_dim,
                "vec_dim": self.vec_dim, "guidance": self.guidance, "patch_size": self.patch_size,
                "global_modulation": self.global_modulation, "text_mixing": self.text_mixing}

    def describe(self):
        return (f"{self.family}: {self.num_double} double + {self.num_single} single blocks of width "
                f"{self.time_embed_dim}, text {self.context_dim}, pooled {self.vec_dim}"
                f"{', guidance' if self.guidance else ''}")

    def weight_group(self, point: AggregationPoint) -> str:
        if point.stage == "final":
            return "output"
        position = point.index + (self.num_double if point.stage == "single" else 0)
        return weight_group(position, self.num_double + self.num_single)

    def walk(self, experts, inputs, engine):
        """inputs: contexts [per model] (raw text encodings, for the aggregator's text input),
        hooks (FluxHooks) or None. -> the mixed prediction (batch, C, H, W)."""
        hooks = inputs.get("hooks") or FluxHooks()
        embedded = [e.embed() for e in experts]
        grid = embedded[0].grid
        if any(e.grid != grid or e.txt.shape != embedded[0].txt.shape for e in embedded):
            raise AFAError("the experts embedded the input into different token grids; "
                           "they must share patch size and text length.")
        temb = mean_of([e.temb for e in embedded])
        cbar = mean_of(inputs["contexts"])
        imgs, txts = [e.img for e in embedded], [e.txt for e in embedded]
        point = 0
        for i in range(self.num_double):
            outs = engine.run(lambda e, img, txt, i=i: e.double_block(i, img, txt), experts,
                              private(imgs), private(txts))
            imgs, mixed = mix_tokens(engine, point, [o[0] for o in outs], grid, temb, cbar, self.text_mixing)
            txts = mix_text([o[1] for o in outs], self.text_mixing, mixed)
            imgs = hooks.after_double(i, imgs)
            point += 1
        text_tokens = txts[0].shape[1]
        seqs = _concat(txts, imgs)
        seq_grid = grid.at(text_tokens)
        for i in range(self.num_single):
            outs = engine.run(lambda e, seq, i=i: e.single_block(i, seq), experts, private(seqs))
            seqs, _ = mix_tokens(engine, point, outs, seq_grid, temb, cbar, self.text_mixing)
            seqs = hooks.after_single(i, seqs, text_tokens)
            point += 1
        outs = engine.run(lambda e, seq: e.head(seq[:, seq_grid.start:seq_grid.end]), experts, seqs)
        final, _ = mix_tokens(engine, point, outs, grid.at(0), temb, cbar)
        if not shared(final):
            raise AFAError("the mixer left the final predictions unmixed")
        return experts[0].unpatchify(final[0])


def _concat(txts, imgs):
    """Per stream cat(txt, img) (what FLUX's single blocks run on); once when both are shared.
    fp16 image streams are cleaned of inf/NaN first, as ComfyUI's forward does."""
    if imgs[0].dtype == torch.float16:
        imgs = _each(imgs, lambda img: torch.nan_to_num(img, nan=0.0, posinf=65504, neginf=-65504))
    if shared(txts) and shared(imgs):
        return [torch.cat((txts[0], imgs[0]), 1)] * len(imgs)
    return [torch.cat((t, i), 1) for t, i in zip(txts, imgs)]


def _each(streams, fn):
    return [fn(streams[0])] * len(streams) if shared(streams) else [fn(s) for s in streams]


FLUX_PARTS = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "final_layer")


def matches(model: nn.Module) -> bool:
    return all(getattr(model, attr, None) is not None for attr in FLUX_PARTS)


def derive_flux_layout(model: nn.Module, what: str = "model") -> FluxLayout:
    for attr in FLUX_PARTS:
        if getattr(model, attr, None) is None:
            raise IncompatibleModelsError(f"{what} has no `{attr}`: it is a {type(model).__name__}, not a FLUX model.")
    params = getattr(model, "params", None)
    hidden = model.txt_in.out_features
    final = model.final_layer.linear.out_features
    points = [AggregationPoint("double", i, hidden) for i in range(len(model.double_blocks))]
    points += [AggregationPoint("single", i, hidden) for i in range(len(model.single_blocks))]
    points.append(AggregationPoint("final", len(model.single_blocks) - 1, final))
    vector_in = getattr(model, "vector_in", None)
    return FluxLayout(points=tuple(points), context_dim=model.txt_in.in_features, time_embed_dim=hidden,
                      vec_dim=vector_in.in_layer.in_features if vector_in is not None else 0,
                      guidance=bool(getattr(params, "guidance_embed", False)),
                      patch_size=int(getattr(model, "patch_size", 2)),
                      global_modulation=bool(getattr(params, "global_modulation", False)))
