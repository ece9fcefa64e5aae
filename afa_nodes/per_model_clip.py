"""A CLIP that encodes the prompt with EVERY expert's own text encoder (the paper's setup).

Each expert's encoding is stacked along the feature axis: cond (batch, tokens, N*width),
pooled (batch, N*pooled). The AFA MODEL splits it back per model; a plain CLIP's
encoding (width) is shared by every model. ControlNets get expert 1's encoding through
the `cross_attn_controlnet` key, so they see the width they were trained for.
Tokenisation uses expert 1's tokenizer (models of one family share the vocabulary).
LoRAs applied to this CLIP patch expert 1's text encoder, like LoRAs on the AFA MODEL.
"""
import torch

import comfy.sd


class PerModelCLIP(comfy.sd.CLIP):
    others: list = []

    @classmethod
    def from_clips(cls, clips):
        clip = clips[0].clone()
        clip.__class__ = cls
        clip.others = [c.clone() for c in clips[1:]]
        return clip

    def clone(self):
        n = super().clone()
        n.__class__ = PerModelCLIP
        n.others = [c.clone() for c in self.others]
        return n

    def clip_layer(self, layer_idx):
        super().clip_layer(layer_idx)
        for c in self.others:
            c.clip_layer(layer_idx)

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        first = super().encode_from_tokens(tokens, return_pooled=return_pooled or True, return_dict=True)
        outs = [first] + [c.encode_from_tokens(tokens, return_pooled=return_pooled or True, return_dict=True)
                          for c in self.others]
        cond = torch.cat([o["cond"] for o in outs], dim=-1)
        pooled = None
        if all(o.get("pooled_output") is not None for o in outs):
            pooled = torch.cat([o["pooled_output"] for o in outs], dim=-1)
        if return_dict:
            out = dict(first, cond=cond, pooled_output=pooled)
            out["cross_attn_controlnet"] = first["cond"]
            return out
        if return_pooled:
            return cond, pooled
        return cond
