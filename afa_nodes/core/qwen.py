"""The Qwen-Image family (Qwen-Image, Qwen-Image-Edit and their fine-tunes): its layout, derived
from the model's own structure. Its walk is the MMDiT walk (core/mmdit.py).

ComfyUI's `QwenImageTransformer2DModel` embeds the latent patches (`img_in`; Qwen-Image-Edit's
reference latents are appended to the image tokens), the timestep (`time_text_embed` -> temb)
and the text (`txt_norm`, `txt_in`), then runs `transformer_blocks`: double-stream blocks with
joint attention over text and image tokens, as SD3's joint blocks (Qwen-Image is an MMDiT),
each returning both streams, then `norm_out` + `proj_out` on the image tokens. So the family is
an MMDiT layout of its own name: points "joint i" after every transformer block and "final"
on the prediction; every expert computes its own embeddings and temb; text tokens (and
reference-image tokens) follow `text_mixing` (core/dit.py). No pooled text vector (adm_dim 0).
"""
from dataclasses import dataclass

from torch import nn

from .errors import IncompatibleModelsError
from .family import AggregationPoint
from .mmdit import MMDiTLayout


@dataclass(frozen=True)
class QwenLayout(MMDiTLayout):
    """points: joint i (transformer_blocks[i]), final; context_dim: the text encoder width
    (txt_in input; Qwen2.5-VL 7B: 3584); additional_t_cond: Qwen-Image-Layered's extra time
    embedding."""
    additional_t_cond: bool = False
    family = "qwen_image"

    def signature(self):
        return {"family": self.family, "points": self.points_signature(), "context_dim": self.context_dim,
                "time_embed_dim": self.time_embed_dim, "patch_size": self.patch_size,
                "additional_t_cond": self.additional_t_cond, "text_mixing": self.text_mixing}

    def describe(self):
        return (f"{self.family} (Qwen-Image): {self.num_blocks} transformer blocks of width {self.time_embed_dim}, "
                f"text {self.context_dim}{', additional time condition' if self.additional_t_cond else ''}")


QWEN_PARTS = ("transformer_blocks", "img_in", "txt_norm", "txt_in", "time_text_embed", "norm_out", "proj_out")


def matches(model: nn.Module) -> bool:
    return all(getattr(model, attr, None) is not None for attr in QWEN_PARTS)


def derive_qwen_layout(model: nn.Module, what: str = "model") -> QwenLayout:
    for attr in QWEN_PARTS:
        if getattr(model, attr, None) is None:
            raise IncompatibleModelsError(f"{what} has no `{attr}`: it is a {type(model).__name__}, "
                                          "not a Qwen-Image model with its own final layer.")
    hidden = model.img_in.out_features
    blocks = len(model.transformer_blocks)
    points = [AggregationPoint("joint", i, hidden) for i in range(blocks)]
    points.append(AggregationPoint("final", blocks - 1, model.proj_out.out_features))
    return QwenLayout(points=tuple(points), context_dim=model.txt_in.in_features, time_embed_dim=hidden,
                      adm_dim=0, patch_size=int(model.patch_size),
                      additional_t_cond=bool(getattr(model.time_text_embed, "use_additional_t_cond", False)))
