"""The DiT families' pieces of training (FLUX, Chroma, SD3/MMDiT, Qwen-Image), for training_host.

* `TrainingDiT`: a frozen DiT whose `bind(x, timesteps, context, y)` gives the family's adapter
  for one call (ensemble_model.dit_experts, the code sampling uses), the inputs cast to the
  model's compute dtype as ComfyUI's apply_model casts them; guidance-distilled models
  (FLUX.1 [dev] and its fine-tunes) get a fixed guidance, GUIDANCE = 3.5 (their default);
  Chroma gets 0, ComfyUI's default for it.
* `pooled_maker`: y per model = the (per-model) pooled text output (SD3's y, FLUX's vector).
* `objective_meta`: the objective's facts the aggregator file records.
* Block calls safe for autograd (`_Blocks`): ComfyUI's FLUX blocks add to their inputs in place
  (`img += ...`), which breaks backprop (a tensor saved for backward is modified) and makes
  torch's non-reentrant checkpoint recompute wrong gradients silently. FLUX/Chroma blocks run
  on a copy of their input with every tensor saved for backward copied when saved; with
  gradient checkpointing a block keeps only its inputs and is recomputed in backward
  (reentrant checkpoint, the recompute under the same copying). TrainingDiT therefore
  checkpoints its own blocks (`checkpointing`, set by core.train), not the executor.
* `differentiable_rope`: ComfyUI (since comfy_kitchen) applies FLUX's rotary embedding with a
  custom op that has no backward; while training, `comfy.ldm.flux.math` uses ComfyUI's own
  pure-torch rope instead (the same math, copied from its fallback).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from torch.utils.checkpoint import checkpoint

from .comfy_unet import split_per_model
from .core.family import Layout
from .core.train_config import NoiseSchedule
from .ensemble_model import dit_experts

GUIDANCE = 3.5   # the guidance FLUX.1 [dev]-style (guidance-distilled) experts are trained at
BLOCKS = ("double_block", "single_block", "joint_block")
INPLACE_FAMILIES = ("flux", "chroma")   # blocks that add to their inputs in place


class TrainingDiT:
    """A frozen ComfyUI DiT for the training loop: `bind` gives the family's adapter for one call,
    inputs cast to the model's compute dtype as ComfyUI's apply_model casts them."""

    def __init__(self, module, family: str, dtype, guidance: Optional[float] = None):
        self.module, self.family, self.dtype, self.guidance = module, family, dtype, guidance
        self.checkpointing = False

    def bind(self, x, timesteps, context, y):
        guidance = None if self.guidance is None else torch.full((x.shape[0],), self.guidance, device=x.device)
        cast = (lambda t: None if t is None else t.to(self.dtype))
        expert = dit_experts(self.family, [self.module], cast(x), timesteps.float(), [cast(context)], [cast(y)],
                             guidance=cast(guidance))[0]
        return _Blocks(expert, self.family in INPLACE_FAMILIES, self.checkpointing)


def _copy_saved():
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)


class _Blocks:
    """A bound adapter whose block calls are safe for autograd (see the module)."""

    def __init__(self, expert, inplace: bool, checkpointing: bool):
        self._expert, self._inplace, self._checkpointing = expert, inplace, checkpointing

    def __getattr__(self, name):
        method = getattr(self._expert, name)
        if name not in BLOCKS:
            return method

        def run(index, *tensors):
            if not torch.is_grad_enabled():
                return method(index, *tensors)
            if not self._inplace:
                return (checkpoint(lambda *a: method(index, *a), *tensors, use_reentrant=False)
                        if self._checkpointing else method(index, *tensors))

            def block(*args):
                with _copy_saved():
                    return method(index, *[t.clone() for t in args])
            if self._checkpointing and any(t.requires_grad for t in tensors):
                return checkpoint(block, *tensors, use_reentrant=True)
            return block(*tensors)
        return run


def objective_meta(experts, schedule: NoiseSchedule, layout: Layout) -> dict:
    """The training facts recorded in the aggregator file."""
    sampling = experts.patchers[0].get_model_object("model_sampling")
    meta = {"objective": schedule.objective, "schedule_steps": len(schedule)}
    if schedule.prediction == "flow":
        kinds = [c.__name__ for c in type(sampling).__bases__ if c is not object] or [type(sampling).__name__]
        meta.update(model_sampling=" + ".join(kinds), shift=float(getattr(sampling, "shift", 1.0)),
                    time_sampling="sigma = the model's shifted sigmas table at a uniform index",
                    target="noise - x0", noised="(1 - sigma) x0 + sigma noise")
    if guidance_of(layout) is not None:
        meta["guidance"] = guidance_of(layout)
    return meta


def guidance_of(layout: Layout) -> Optional[float]:
    """FLUX [dev]-style: GUIDANCE; Chroma: 0 (what ComfyUI feeds it without a FluxGuidance node)."""
    if layout.family == "chroma":
        return 0.0
    return GUIDANCE if getattr(layout, "guidance", False) else None


def pooled_width(layout: Layout) -> int:
    """Width of the pooled text input per model (SDXL's and SD3's adm, FLUX's vector), 0 when none."""
    return int(getattr(layout, "vec_dim", 0) or getattr(layout, "adm_dim", 0) or 0)


def pooled_maker(n: int, width: int):
    """DiTs (SD3's y, FLUX's vector): y per model is the (per-model) pooled text output itself."""
    return lambda pooled, item: [t.float() for t in split_per_model(pooled, n, width, "the pooled text output")]


def _apply_rope1(x, freqs_cis):
    x_ = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    x_out = freqs_cis[..., 0] * x_[..., 0]
    x_out = x_out + freqs_cis[..., 1] * x_[..., 1]
    return x_out.reshape(*x.shape).type_as(x)


def _apply_rope(xq, xk, freqs_cis):
    return _apply_rope1(xq, freqs_cis), _apply_rope1(xk, freqs_cis)


@contextmanager
def differentiable_rope():
    """FLUX (and Qwen-Image, whose module binds FLUX's apply_rope1 at import in ComfyUI >= 0.4)
    attention with a rope autograd can differentiate, for the duration of the block."""
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.qwen_image.model as qwen_model
    saved = flux_math.apply_rope, flux_math.apply_rope1
    qwen_saved = getattr(qwen_model, "apply_rope1", None)
    flux_math.apply_rope, flux_math.apply_rope1 = _apply_rope, _apply_rope1
    if qwen_saved is not None:
        qwen_model.apply_rope1 = _apply_rope1
    try:
        yield
    finally:
        flux_math.apply_rope, flux_math.apply_rope1 = saved
        if qwen_saved is not None:
            qwen_model.apply_rope1 = qwen_saved
