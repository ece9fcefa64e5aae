"""ComfyUI's Qwen-Image (`comfy.ldm.qwen_image.model.QwenImageTransformer2DModel`) as an MMDiT
expert (`core.mmdit.MMDiTExpert`; the family's layout is core/qwen.py), and its ControlNet hooks.

Each expert embeds its input with the model's own `_forward`, stopped at its first transformer
block: a block patch on ("double_block", 0) receives exactly what the blocks get (image tokens
incl. Qwen-Image-Edit's reference latents, text tokens, temb, rotary embedding), records it
and ends the call. So whatever this ComfyUI version prepares (patchify, position ids, the
reference-latent method, Qwen-Image-Layered's extra time condition) is what the expert gets.
The expert then runs ComfyUI's own blocks, through the block patches (`patches_replace["dit"]`,
keys ("double_block", i)) and `patches["double_block"]` installed for that expert, and its own
norm_out / proj_out, and unpatchifies as `_forward` does. A 4-D latent (training, which
encodes images as (batch, 16, h, w)) is run as one frame and returned 4-D.
"""
import inspect

import torch

from .core.dit import TokenGrid
from .comfy_flux import FluxControl
from .core.mmdit import MMDiTEmbedded, MMDiTHooks


class _Embedded(Exception):
    """Ends the model's `_forward` at its first block, carrying that block's inputs."""

    def __init__(self, captured):
        super().__init__("embedded")
        self.captured = captured


def forward_arguments(model, x, timesteps, context, *args, **kwargs) -> dict:
    """The call to the model's `_forward` (as ComfyUI's DIFFUSION_MODEL executor makes it, whose
    positional order differs between versions) by parameter name."""
    bound = inspect.signature(model._forward).bind(x, timesteps, context, *args, **kwargs)
    named = dict(bound.arguments)
    named.update(named.pop("kwargs", {}))
    return named


class ComfyQwenExpert:
    """One Qwen-Image model with its own copy of transformer_options and its own block patches.
    `extra`: the rest of the `_forward` call by name (attention_mask, ref_latents, ...)."""

    def __init__(self, model, x, timesteps, context, transformer_options=None, extra=None, block_patches=None):
        self.model = model
        self.options = dict(transformer_options or {})
        self.blocks_replace = block_patches if block_patches is not None else \
            self.options.get("patches_replace", {}).get("dit", {})
        self.frames = x.ndim == 4
        self.x = x.unsqueeze(2) if self.frames else x
        self.timesteps, self.context = timesteps, context
        self.extra = {k: v for k, v in (extra or {}).items()
                      if k not in ("x", "timesteps", "context", "transformer_options", "control")}
        p = model.patch_size
        b, c, t, h, w = self.x.shape
        self.grid = TokenGrid(t * ((h + p // 2) // p), (w + p // 2) // p)

    def embed(self) -> MMDiTEmbedded:
        def capture(args, extra):
            raise _Embedded(args)
        options = {**self.options, "patches_replace": {"dit": {("double_block", 0): capture}}}
        try:
            self.model._forward(self.x, self.timesteps, self.context, transformer_options=options, control=None,
                                **self.extra)
        except _Embedded as done:
            a = done.captured
        else:
            raise RuntimeError(f"{type(self.model).__name__}._forward did not reach its first block")
        img, txt, temb, self.pe = a["img"], a["txt"], a["vec"], a["pe"]
        self.mask = self.extra.get("attention_mask")
        # Qwen-Image-Edit 2511 ("index_timestep_zero"): reference tokens modulated at timestep 0
        self.zero_index = self.grid.end if temb.shape[0] == 2 * img.shape[0] else None
        self.temb = temb
        return MMDiTEmbedded(x=img, context=txt, temb=temb[:img.shape[0]], grid=self.grid)

    def _block(self, block, img, txt, vec, pe, options):
        extra = {} if self.zero_index is None else {"timestep_zero_index": self.zero_index}
        return block(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=self.mask,
                     temb=vec, image_rotary_emb=pe, transformer_options=options, **extra)

    def joint_block(self, index, x, context):
        m = self.model
        block = m.transformer_blocks[index]
        self.options.update(block_index=index, total_blocks=len(m.transformer_blocks), block_type="double")
        patch = self.blocks_replace.get(("double_block", index))
        if patch is None:
            context, x = self._block(block, x, context, self.temb, self.pe, self.options)
        else:
            def original(args):
                out = {}
                out["txt"], out["img"] = self._block(block, args["img"], args["txt"], args["vec"], args["pe"],
                                                     args["transformer_options"])
                return out
            out = patch({"img": x, "txt": context, "vec": self.temb, "pe": self.pe,
                         "transformer_options": self.options}, {"original_block": original})
            x, context = out["img"], out["txt"]
        for p in self.options.get("patches", {}).get("double_block", []):
            out = p({"img": x, "txt": context, "x": self.x, "block_index": index, "transformer_options": self.options})
            x, context = out["img"], out["txt"]
        return x, context

    def head(self, x):
        temb = self.temb if self.zero_index is None else self.temb.chunk(2, dim=0)[0]
        return self.model.proj_out(self.model.norm_out(x, temb))[:, :self.grid.end]

    def unpatchify(self, tokens):
        p = self.model.patch_size
        b, c, t, h, w = self.x.shape
        hp, wp = -(-h // p), -(-w // p)
        out = tokens.view(b, t, hp, wp, -1, p, p).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, -1, t, hp * p, wp * p)
        out = out[:, :, :, :h, :w]
        return out.squeeze(2) if self.frames else out


class QwenControl(FluxControl, MMDiTHooks):
    """ControlNet residuals (control["input"][i], as Qwen-Image's forward reads them), added once
    per block to the first tokens of the mixed image stream (to every stream where they are not
    mixed): what FluxControl does after a FLUX double block."""

    def after_joint(self, index, xs):
        return self.after_double(index, xs)
