"""ComfyUI's LDM UNet as a `core.ensemble.Expert`, its per-block hooks (ControlNet residuals,
block patches: once per block, on the mixed feature) and the per-model split of the
conditioning that the AFA CLIP stacks (text context, SDXL label input y)."""
import torch

from comfy.ldm.modules.diffusionmodules.openaimodel import apply_control, forward_timestep_embed
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

from .core.unet import UNetHooks
from .core.errors import AFAError


class ComfyExpert:
    """core.unet.UNetExpert for a ComfyUI UNetModel, with its own transformer_options copy
    (own transformer_index, so block/index-keyed attention patches hit each UNet once)."""

    def __init__(self, unet, transformer_options, x, kwargs):
        self.unet = unet
        self.options = dict(transformer_options)
        self.options["original_shape"] = list(x.shape)
        self.options["transformer_index"] = 0
        self.patches = self.options.get("patches", {})
        self.dtype = x.dtype
        self.extra = dict(time_context=kwargs.get("time_context"),
                          num_video_frames=kwargs.get("num_video_frames", getattr(unet, "default_num_video_frames", None)),
                          image_only_indicator=kwargs.get("image_only_indicator"))

    def embed(self, timesteps, y, dtype):
        unet = self.unet
        emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(dtype))
        for patch in self.patches.get("emb_patch", []):
            emb = patch(emb, unet.model_channels, self.options)
        if unet.num_classes is not None:
            emb = emb + unet.label_emb(y)
        return emb

    def run_block(self, stage, index, h, emb, context, output_shape=None):
        self.options["block"] = (stage, index)
        module = {"input": lambda: self.unet.input_blocks[index], "middle": lambda: self.unet.middle_block,
                  "output": lambda: self.unet.output_blocks[index]}[stage]()
        return forward_timestep_embed(module, h, emb, context, self.options, output_shape, **self.extra)

    def head(self, h):
        return self.unet.out(h.type(self.dtype))


class ComfyHooks(UNetHooks):
    """ControlNet residuals and block patches, applied ONCE per block to the mixed feature
    (per stream where the streams are not mixed). apply_control pops: call it once."""

    def __init__(self, control, transformer_options):
        self.control, self.options = control, transformer_options
        self.patches = transformer_options.get("patches", {})

    def _control(self, hs, name):
        if not self.control or not self.control.get(name):
            return hs
        residual = self.control[name].pop()
        if residual is None:
            return hs
        return _per_stream(hs, lambda h: apply_control(h.clone(), {name: [residual]}, name))

    def after_input(self, index, hs):
        self.options["block"] = ("input", index)
        hs = self._control(hs, "input")
        for patch in self.patches.get("input_block_patch", []):
            hs = _per_stream(hs, lambda h: patch(h, self.options))
        return hs

    def after_skip(self, index, hs):
        for patch in self.patches.get("input_block_patch_after_skip", []):
            hs = _per_stream(hs, lambda h: patch(h, self.options))
        return hs

    def after_middle(self, hs):
        return self._control(hs, "middle")

    def before_output(self, index, hs, skips):
        self.options["block"] = ("output", index)
        skips = self._control(skips, "output")
        for patch in self.patches.get("output_block_patch", []):
            pairs = [patch(h, s, self.options) for h, s in zip(hs, skips)]
            hs, skips = [p[0] for p in pairs], [p[1] for p in pairs]
        return hs, skips


def _per_stream(hs, fn):
    if all(h is hs[0] for h in hs):
        return [fn(hs[0])] * len(hs)
    return [fn(h) for h in hs]


def split_per_model(tensor, n, width, what):
    """AFA CLIP stacks each model's encoding along the last dim (n*width); a plain CLIP
    gives width (shared by every model). Anything else is refused."""
    if tensor is None:
        return [None] * n
    size = tensor.shape[-1]
    if size == width:
        return [tensor] * n
    if size == n * width:
        return list(tensor.chunk(n, dim=-1))
    raise AFAError(f"{what} has width {size}; this {n}-model ensemble expects {width} (one shared "
                   f"encoding) or {n * width} (one per model, from the AFA loader's CLIP). Encode the "
                   "prompt with the CLIP from the same AFA loader, or with a plain CLIP of this architecture.")


def split_adm(y, n, adm_dim):
    """SDXL `y` = [pooled (n*P if per model), size embeddings]: one y per model."""
    if y is None or y.shape[-1] == adm_dim:
        return [y] * n
    extra = y.shape[-1] - adm_dim
    if extra <= 0 or extra % (n - 1):
        raise AFAError(f"label input y has width {y.shape[-1]}, expected {adm_dim} or a per-model stack.")
    pooled = (y.shape[-1] - adm_dim) // (n - 1)
    rest = y[:, n * pooled:]
    return [torch.cat([y[:, i * pooled:(i + 1) * pooled], rest], dim=1) for i in range(n)]
