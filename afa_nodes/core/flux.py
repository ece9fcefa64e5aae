"""The FLUX family (FLUX.1 dev/schnell and their fine-tunes, FLUX Kontext; FLUX.2's global
modulation) and Chroma (FLUX's blocks, modulated by its `distilled_guidance_layer`; a family of
its own): their layout, derived from the model's own structure, and their walk.

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
        return {"family": self.family, "points": self.points_signature(),
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
        return weight_group(self.points.index(point), len(self.points) - 1)

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
        points = list(enumerate(self.points))
        for point, p in [(k, p) for k, p in points if p.stage == "double"]:
            outs = engine.run(lambda e, img, txt, i=p.index: e.double_block(i, img, txt), experts,
                              private(imgs), private(txts))
            imgs, mixed = mix_tokens(engine, point, [o[0] for o in outs], grid, temb, cbar, self.text_mixing)
            txts = mix_text([o[1] for o in outs], self.text_mixing, mixed)
            imgs = hooks.after_double(p.index, imgs)
        text_tokens = txts[0].shape[1]
        seqs = _concat(txts, imgs)
        seq_grid = grid.at(text_tokens)
        for point, p in [(k, p) for k, p in points if p.stage == "single"]:
            outs = engine.run(lambda e, seq, i=p.index: e.single_block(i, seq), experts, private(seqs))
            seqs, _ = mix_tokens(engine, point, outs, seq_grid, temb, cbar, self.text_mixing)
            seqs = hooks.after_single(p.index, seqs, text_tokens)
        outs = engine.run(lambda e, seq: e.head(seq[:, seq_grid.start:seq_grid.end]), experts, seqs)
        final, _ = mix_tokens(engine, len(self.points) - 1, outs, grid.at(0), temb, cbar)
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


@dataclass(frozen=True)
class ChromaLayout(FluxLayout):
    """Chroma: FLUX's blocks without their own modulation layers (one approximator makes every
    block's modulation from timestep and guidance; no pooled vector). Blocks Chroma is told to
    skip (`skip_mmdit`, `skip_dit`) are no aggregation points. The aggregator's time input is
    the mean of the expert's modulation vectors."""
    family = "chroma"


FLUX_PARTS = ("double_blocks", "single_blocks", "img_in", "txt_in", "final_layer")


def matches(model: nn.Module) -> bool:
    return all(getattr(model, attr, None) is not None for attr in FLUX_PARTS + ("time_in",))


def matches_chroma(model: nn.Module) -> bool:
    return all(getattr(model, attr, None) is not None for attr in FLUX_PARTS + ("distilled_guidance_layer",))


def _points(model, hidden):
    skip_double, skip_single = set(getattr(model, "skip_mmdit", ())), set(getattr(model, "skip_dit", ()))
    points = [AggregationPoint("double", i, hidden) for i in range(len(model.double_blocks)) if i not in skip_double]
    points += [AggregationPoint("single", i, hidden) for i in range(len(model.single_blocks)) if i not in skip_single]
    points.append(AggregationPoint("final", len(model.single_blocks) - 1, model.final_layer.linear.out_features))
    return tuple(points)


def derive_flux_layout(model: nn.Module, what: str = "model") -> FluxLayout:
    for attr in FLUX_PARTS + ("time_in",):
        if getattr(model, attr, None) is None:
            raise IncompatibleModelsError(f"{what} has no `{attr}`: it is a {type(model).__name__}, not a FLUX model.")
    params = getattr(model, "params", None)
    hidden = model.txt_in.out_features
    vector_in = getattr(model, "vector_in", None)
    return FluxLayout(points=_points(model, hidden), context_dim=model.txt_in.in_features, time_embed_dim=hidden,
                      vec_dim=vector_in.in_layer.in_features if vector_in is not None else 0,
                      guidance=bool(getattr(params, "guidance_embed", False)),
                      patch_size=int(getattr(model, "patch_size", 2)),
                      global_modulation=bool(getattr(params, "global_modulation", False)))


def derive_chroma_layout(model: nn.Module, what: str = "model") -> ChromaLayout:
    for attr in FLUX_PARTS + ("distilled_guidance_layer",):
        if getattr(model, attr, None) is None:
            raise IncompatibleModelsError(f"{what} has no `{attr}`: it is a {type(model).__name__}, not a Chroma model.")
    hidden = model.txt_in.out_features
    return ChromaLayout(points=_points(model, hidden), context_dim=model.txt_in.in_features, time_embed_dim=hidden,
                        vec_dim=0, guidance=True, patch_size=int(getattr(model, "patch_size", 2)))
