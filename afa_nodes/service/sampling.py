"""Sampling: the ONE sequence every front end runs to make an image from a MODEL, the same
nodes a ComfyUI workflow runs (CLIP Text Encode x2 -> Empty Latent Image -> KSampler ->
VAE Decode), under torch.inference_mode() as ComfyUI's executor runs nodes."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

import comfy.samplers

from ..core.errors import AFAError

LIMITS = {"width": (64, 4096), "height": (64, 4096), "steps": (1, 1000), "batch": (1, 16), "cfg": (0.0, 100.0),
          "seed": (0, 2**64 - 1)}


@dataclass
class SampleSettings:
    prompt: str = ""
    negative: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "euler"
    scheduler: str = "normal"
    seed: int = 0
    batch: int = 1

    def checked(self) -> "SampleSettings":
        """A validated copy (numbers in range, sizes multiples of 8, known sampler/scheduler); a
        subclass (a front end's request with more fields) keeps its type and its other fields."""
        values = asdict(self)
        for name, (lo, hi) in LIMITS.items():
            value = values[name]
            if value is None or not lo <= value <= hi:
                raise AFAError(f"{name} must be between {lo} and {hi}, got {value}.")
            values[name] = float(value) if isinstance(lo, float) else int(value)
        for name in ("width", "height"):
            if values[name] % 8:
                raise AFAError(f"{name} must be a multiple of 8 (the latent is 1/8 of the image), got {values[name]}.")
        if self.sampler not in samplers():
            raise AFAError(f"unknown sampler '{self.sampler}'; ComfyUI offers: {', '.join(samplers())}.")
        if self.scheduler not in schedulers():
            raise AFAError(f"unknown scheduler '{self.scheduler}'; ComfyUI offers: {', '.join(schedulers())}.")
        values["prompt"], values["negative"] = self.prompt or "", self.negative or ""
        return replace(self, **{k: values[k] for k in SampleSettings.__dataclass_fields__})


def samplers() -> list:
    return list(comfy.samplers.KSampler.SAMPLERS)


def schedulers() -> list:
    return list(comfy.samplers.KSampler.SCHEDULERS)


def require_text_encoder(clip, names):
    if clip is None:
        raise AFAError(f"{', '.join(names)}: no text encoder (CLIP) in the checkpoint file(s). Sampling "
                       "from a prompt needs full checkpoints (UNet + CLIP + VAE), like ComfyUI's Load Checkpoint.")


def sample(model, clip, vae, s: SampleSettings):
    """-> (LATENT dict from the sampler, IMAGE [batch, H, W, 3] float 0..1)."""
    import nodes  # ComfyUI's built-in nodes (imported once ComfyUI is booted)
    with torch.inference_mode():
        positive = nodes.CLIPTextEncode().encode(clip, s.prompt)[0]
        negative = nodes.CLIPTextEncode().encode(clip, s.negative)[0]
        latent = nodes.EmptyLatentImage().generate(s.width, s.height, s.batch)[0]
        samples = nodes.KSampler().sample(model, s.seed, s.steps, s.cfg, s.sampler, s.scheduler,
                                          positive, negative, latent)[0]
        images = nodes.VAEDecode().decode(vae, samples)[0]
    return samples, images
