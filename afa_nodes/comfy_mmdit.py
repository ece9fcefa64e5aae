"""ComfyUI's MMDiT (SD3 / SD3.5: `comfy.ldm.modules.diffusionmodules.mmdit.MMDiT`) as a
`core.mmdit.MMDiTExpert`, and its ControlNet hooks.

Each expert embeds its input exactly as `MMDiT.forward` does (context_processor, x_embedder +
cropped positional embedding, t_embedder + y_embedder, context_embedder, register tokens),
then runs ComfyUI's own joint blocks through the block patches (`patches_replace["dit"]`,
keys ("double_block", i)) installed for that expert, and its own final layer.

MMDiT's forward has no DIFFUSION_MODEL wrapper hook (FLUX's and the UNet's have), so the
ensemble enters through an APPLY_MODEL wrapper that swaps expert 1's `forward` for the
duration of one call (`swapped_forward`).
"""
from contextlib import contextmanager

import torch
from einops import repeat

import comfy.ops

from .core.dit import TokenGrid
from .core.mmdit import MMDiTEmbedded, MMDiTHooks


class ComfyMMDiTExpert:
    """One MMDiT with its own copy of transformer_options and its own block patches."""

    def __init__(self, model, x, timesteps, context, y=None, transformer_options=None, block_patches=None):
        self.model = model
        self.options = dict(transformer_options or {})
        self.blocks_replace = block_patches if block_patches is not None else \
            self.options.get("patches_replace", {}).get("dit", {})
        self.x, self.timesteps, self.context, self.y = x, timesteps, context, y
        p = model.x_embedder.patch_size[0]
        self.hw = x.shape[-2:]
        self.grid = TokenGrid(-(-x.shape[-2] // p), -(-x.shape[-1] // p))

    def embed(self) -> MMDiTEmbedded:
        m, x, context, y = self.model, self.x, self.context, self.y
        if getattr(m, "context_processor", None) is not None:
            context = m.context_processor(context)
        x = m.x_embedder(x) + comfy.ops.cast_to_input(m.cropped_pos_embed(self.hw, device=x.device), x)
        c = m.t_embedder(self.timesteps, dtype=x.dtype)
        if y is not None and m.y_embedder is not None:
            c = c + m.y_embedder(y)
        if context is not None:
            context = m.context_embedder(context)
        if m.register_length > 0:
            register = repeat(m.register, "1 ... -> b ...", b=x.shape[0])
            context = torch.cat((register, context if context is not None else torch.Tensor([]).type_as(x)), 1)
        self.c = c
        return MMDiTEmbedded(x=x, context=context, temb=c, grid=self.grid)

    def joint_block(self, index, x, context):
        m = self.model
        block = m.joint_blocks[index]
        self.options.update(block_index=index, total_blocks=len(m.joint_blocks), block_type="double")
        patch = self.blocks_replace.get(("double_block", index))
        if patch is None:
            context, x = block(context, x, c=self.c, use_checkpoint=m.use_checkpoint, transformer_options=self.options)
            return x, context

        def original(args):
            out = {}
            out["txt"], out["img"] = block(args["txt"], args["img"], c=args["vec"],
                                           transformer_options=args["transformer_options"])
            return out
        out = patch({"img": x, "txt": context, "vec": self.c, "transformer_options": self.options},
                    {"original_block": original})
        return out["img"], out["txt"]

    def head(self, x):
        return self.model.final_layer(x, self.c)

    def unpatchify(self, tokens):
        return self.model.unpatchify(tokens, hw=self.hw)[:, :, :self.hw[-2], :self.hw[-1]]


class MMDiTControl(MMDiTHooks):
    """ControlNet residuals (control["output"][i], as MMDiT reads them), added once per joint
    block to the mixed image tokens (to every stream where they are not mixed)."""

    def __init__(self, control):
        self.control = control or {}

    def after_joint(self, index, xs):
        residuals = self.control.get("output") or []
        add = residuals[index] if index < len(residuals) else None
        if add is None:
            return xs
        if all(x is xs[0] for x in xs):
            return [xs[0] + add] * len(xs)
        return [x + add for x in xs]


@contextmanager
def swapped_forward(module, forward):
    """`module(...)` calls `forward` inside the block (an instance attribute, removed after)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous
