"""ComfyUI's FLUX model (`comfy.ldm.flux.model.Flux`) and Chroma (`comfy.ldm.chroma.model.Chroma`)
as `core.flux.FluxExpert`s, and their ControlNet hooks (residuals added once per block to the
mixed image tokens).

Each expert prepares its input exactly as its own `_forward` does (patches, position ids,
FLUX Kontext reference latents: the model's own `_forward` runs with `forward_orig`
intercepted, so whatever the ComfyUI version prepares is what the expert gets), then embeds it
as `forward_orig` does (img_in, time_in, guidance_in, vector_in, txt_norm/txt_in, FLUX.2's
global modulation, `post_input` patches, rotary `pe`) and runs ComfyUI's own block modules,
through the block patches (`patches_replace["dit"]`) installed for that expert.
"""
import inspect

import torch
from einops import rearrange

from comfy.ldm.flux.layers import timestep_embedding

from .core.dit import TokenGrid
from .core.flux import FluxEmbedded, FluxHooks


def forward_orig_inputs(model, x, timesteps, context, y=None, guidance=None, ref_latents=None,
                        transformer_options=None, kwargs=None) -> dict:
    """The arguments the model's own `_forward` passes to `forward_orig` (by name)."""
    names = list(inspect.signature(model.forward_orig).parameters)
    captured = {}

    def capture(*args, **kw):
        captured.update(zip(names, args))
        captured.update(kw)
        img = args[0]
        return img.new_zeros(img.shape[0], img.shape[1], model.out_channels)

    previous = model.__dict__.get("forward_orig")   # an object patch (e.g. a cache node) stays in place
    model.forward_orig = capture
    try:
        model._forward(x, timesteps, context, y=y, guidance=guidance, ref_latents=ref_latents, control=None,
                       transformer_options=transformer_options if transformer_options is not None else {},
                       **(kwargs or {}))
    finally:
        if previous is None:
            del model.forward_orig
        else:
            model.forward_orig = previous
    return captured


class ComfyFluxExpert:
    """One FLUX model with its own copy of transformer_options and its own block patches."""

    def __init__(self, model, x, timesteps, context, y=None, guidance=None, ref_latents=None,
                 transformer_options=None, kwargs=None, block_patches=None):
        self.model = model
        self.options = dict(transformer_options or {})
        self.blocks_replace = block_patches if block_patches is not None else \
            self.options.get("patches_replace", {}).get("dit", {})
        self.x, self.timesteps, self.context, self.y, self.guidance = x, timesteps, context, y, guidance
        self.ref_latents, self.kwargs = ref_latents, dict(kwargs or {})
        p = model.patch_size
        self.shape = x.shape
        self.grid = TokenGrid((x.shape[-2] + p // 2) // p, (x.shape[-1] + p // 2) // p)

    def embed(self) -> FluxEmbedded:
        m, a = self.model, forward_orig_inputs(self.model, self.x, self.timesteps, self.context, self.y,
                                               self.guidance, self.ref_latents, self.options, self.kwargs)
        img, txt, img_ids, txt_ids = a["img"], a["txt"], a["img_ids"], a["txt_ids"]
        y, guidance, self.attn_mask = a.get("y"), a.get("guidance"), a.get("attn_mask")
        params = m.params
        img = m.img_in(img)
        vec = m.time_in(timestep_embedding(a["timesteps"], 256).to(img.dtype))
        if params.guidance_embed and guidance is not None:
            vec = vec + m.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        if getattr(m, "vector_in", None) is not None:
            if y is None:
                y = torch.zeros((img.shape[0], params.vec_in_dim), device=img.device, dtype=img.dtype)
            vec = vec + m.vector_in(y[:, :params.vec_in_dim])
        if getattr(m, "txt_norm", None) is not None:
            txt = m.txt_norm(txt)
        txt = m.txt_in(txt)
        self.vec_orig = self.vec_double = self.vec_single = vec
        if getattr(params, "global_modulation", False):
            self.vec_double = (m.double_stream_modulation_img(vec), m.double_stream_modulation_txt(vec))
            self.vec_single = m.single_stream_modulation(vec)[0]
        for patch in self.options.get("patches", {}).get("post_input", []):
            out = patch({"img": img, "txt": txt, "img_ids": img_ids, "txt_ids": txt_ids})
            img, txt, img_ids, txt_ids = out["img"], out["txt"], out["img_ids"], out["txt_ids"]
        self.pe = m.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)) if img_ids is not None else None
        return FluxEmbedded(img=img, txt=txt, temb=vec, grid=self.grid)

    def double_vec(self, index):
        return self.vec_double

    def single_vec(self, index):
        return self.vec_single

    def final_vec(self):
        return self.vec_orig

    def _options(self, kind, index, total):
        self.options.update(block_index=index, total_blocks=total, block_type=kind)
        return self.options

    def double_block(self, index, img, txt):
        block = self.model.double_blocks[index]
        options = self._options("double", index, len(self.model.double_blocks))
        patch = self.blocks_replace.get(("double_block", index))
        vec = self.double_vec(index)
        if patch is None:
            return block(img=img, txt=txt, vec=vec, pe=self.pe, attn_mask=self.attn_mask, transformer_options=options)

        def original(args):
            out = {}
            out["img"], out["txt"] = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                                           attn_mask=args.get("attn_mask"),
                                           transformer_options=args.get("transformer_options"))
            return out
        out = patch({"img": img, "txt": txt, "vec": vec, "pe": self.pe, "attn_mask": self.attn_mask,
                     "transformer_options": options}, {"original_block": original})
        return out["img"], out["txt"]

    def single_block(self, index, seq):
        block = self.model.single_blocks[index]
        options = self._options("single", index, len(self.model.single_blocks))
        patch = self.blocks_replace.get(("single_block", index))
        vec = self.single_vec(index)
        if patch is None:
            return block(seq, vec=vec, pe=self.pe, attn_mask=self.attn_mask, transformer_options=options)

        def original(args):
            return {"img": block(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                                 transformer_options=args.get("transformer_options"))}
        return patch({"img": seq, "vec": vec, "pe": self.pe, "attn_mask": self.attn_mask,
                      "transformer_options": options}, {"original_block": original})["img"]

    def head(self, img):
        return self.model.final_layer(img, self.final_vec())

    def unpatchify(self, tokens):
        p, (h, w) = self.model.patch_size, (self.grid.height, self.grid.width)
        out = rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=p, pw=p)
        return out[:, :, :self.shape[-2], :self.shape[-1]]


class ComfyChromaExpert(ComfyFluxExpert):
    """Chroma: every block's modulation comes from the approximator (`distilled_guidance_layer`)
    fed with timestep, guidance and the modulation index, as Chroma.forward_orig computes it."""
    MOD_INDEX_LENGTH = 344   # Chroma.forward_orig's fixed modulation table length

    def embed(self) -> FluxEmbedded:
        m, a = self.model, forward_orig_inputs(self.model, self.x, self.timesteps, self.context, None,
                                               self.guidance, None, self.options, self.kwargs)
        img, txt, self.attn_mask = m.img_in(a["img"]), a["txt"], a.get("attn_mask")
        dtype, device, n = img.dtype, img.device, self.MOD_INDEX_LENGTH
        distill_timestep = timestep_embedding(a["timesteps"].detach().clone(), 16).to(device, dtype)
        distil_guidance = timestep_embedding(a["guidance"].detach().clone(), 16).to(device, dtype)
        index = timestep_embedding(torch.arange(n, device=device), 32).to(device, dtype)
        index = index.unsqueeze(0).repeat(img.shape[0], 1, 1).to(device, dtype)
        time_guidance = torch.cat([distill_timestep, distil_guidance], dim=1).unsqueeze(1).repeat(1, n, 1).to(dtype)
        self.mod_vectors = m.distilled_guidance_layer(torch.cat([time_guidance, index], dim=-1).to(device, dtype))
        txt = m.txt_in(txt)
        self.pe = m.pe_embedder(torch.cat((a["txt_ids"], a["img_ids"]), dim=1))
        return FluxEmbedded(img=img, txt=txt, temb=self.mod_vectors.mean(1), grid=self.grid)

    def double_vec(self, index):
        return (self.model.get_modulations(self.mod_vectors, "double_img", idx=index),
                self.model.get_modulations(self.mod_vectors, "double_txt", idx=index))

    def single_vec(self, index):
        return self.model.get_modulations(self.mod_vectors, "single", idx=index)

    def final_vec(self):
        return self.model.get_modulations(self.mod_vectors, "final")


class FluxControl(FluxHooks):
    """ControlNet residuals (lists indexed by block, as Flux.forward_orig reads them), added once
    per block to the mixed image tokens (to every stream where they are not mixed)."""

    def __init__(self, control):
        self.control = control or {}

    @staticmethod
    def _add(streams, add, start):
        def one(s):
            s = s.clone()
            s[:, start:start + add.shape[1]] += add
            return s
        if all(s is streams[0] for s in streams):
            return [one(streams[0])] * len(streams)
        return [one(s) for s in streams]

    def _residual(self, name, index):
        residuals = self.control.get(name) or []
        return residuals[index] if index < len(residuals) else None

    def after_double(self, index, imgs):
        add = self._residual("input", index)
        return imgs if add is None else self._add(imgs, add, 0)

    def after_single(self, index, seqs, text_tokens):
        add = self._residual("output", index)
        return seqs if add is None else self._add(seqs, add, text_tokens)
