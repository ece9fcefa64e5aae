"""Sampling: the ONE sequence every front end runs to make an image from a MODEL, the same
nodes a ComfyUI workflow runs (CLIP Text Encode x2 -> Empty Latent Image -> KSampler ->
VAE Decode), under torch.inference_mode() as ComfyUI's executor runs nodes.

`ImageInputs` adds what a WebUI user reaches for, through ComfyUI's own nodes: img2img (Upscale
Image to the size -> VAE Encode -> KSampler's denoise), inpainting (VAE Encode (for Inpainting)
with a mask) and a ControlNet (Load ControlNet Model -> Apply ControlNet on both prompts)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

import comfy.samplers

from ..core.errors import AFAError

LIMITS = {"width": (64, 4096), "height": (64, 4096), "steps": (1, 1000), "batch": (1, 16), "cfg": (0.0, 100.0),
          "seed": (0, 2**64 - 1), "denoise": (0.0, 1.0)}


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
    denoise: float = 1.0     # below 1: img2img / inpainting keep that much of the init image

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


@dataclass
class ImageInputs:
    """Images a sampling run starts from or is guided by (None: not used). Images are ComfyUI
    IMAGEs [1, H, W, 3] float 0..1 of any size (scaled to the run's size); the mask is a MASK
    [1, H, W], 1 = repaint."""
    init_image: Optional[torch.Tensor] = None   # img2img / inpainting source
    mask: Optional[torch.Tensor] = None         # inpainting (needs init_image)
    grow_mask: int = 6                          # VAE Encode (for Inpainting)'s grow_mask_by
    controlnet: Optional[str] = None            # a name in ComfyUI's controlnet folders
    control_image: Optional[torch.Tensor] = None
    control_strength: float = 1.0

    def checked(self) -> "ImageInputs":
        import folder_paths
        if self.mask is not None and self.init_image is None:
            raise AFAError("inpainting needs an init image as well as the mask.")
        if self.controlnet:
            names = folder_paths.get_filename_list("controlnet")
            if self.controlnet not in names:
                raise AFAError(f"ControlNet '{self.controlnet}' not found in ComfyUI's controlnet folders "
                               f"({', '.join(folder_paths.get_folder_paths('controlnet'))}).")
            if self.control_image is None:
                raise AFAError(f"ControlNet '{self.controlnet}' needs a control image.")
            if not 0.0 <= float(self.control_strength) <= 10.0:
                raise AFAError(f"control strength must be between 0 and 10, got {self.control_strength}.")
        if not 0 <= int(self.grow_mask) <= 64:
            raise AFAError(f"grow mask must be between 0 and 64 pixels, got {self.grow_mask}.")
        return self


def sample(model, clip, vae, s: SampleSettings, inputs: Optional[ImageInputs] = None):
    """-> (LATENT dict from the sampler, IMAGE [batch, H, W, 3] float 0..1)."""
    import nodes  # ComfyUI's built-in nodes (imported once ComfyUI is booted)
    inputs = inputs or ImageInputs()
    with torch.inference_mode():
        positive = nodes.CLIPTextEncode().encode(clip, s.prompt)[0]
        negative = nodes.CLIPTextEncode().encode(clip, s.negative)[0]
        if inputs.controlnet:
            control = nodes.ControlNetLoader().load_controlnet(inputs.controlnet)[0]
            positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
                positive, negative, control, _fit(inputs.control_image, s), float(inputs.control_strength),
                0.0, 1.0, vae=vae)[:2]
        latent = _start_latent(vae, s, inputs)
        samples = nodes.KSampler().sample(model, s.seed, s.steps, s.cfg, s.sampler, s.scheduler,
                                          positive, negative, latent, denoise=s.denoise)[0]
        images = nodes.VAEDecode().decode(vae, samples)[0]
    return samples, images


def _fit(image: torch.Tensor, s: SampleSettings) -> torch.Tensor:
    """Upscale Image to the run's width x height (one image)."""
    import nodes
    return nodes.ImageScale().upscale(image[:1], "bilinear", s.width, s.height, "disabled")[0]


def _start_latent(vae, s: SampleSettings, inputs: ImageInputs) -> dict:
    """Empty Latent Image, or the init image encoded (with its mask for inpainting), batch times."""
    import nodes
    if inputs.init_image is None:
        return nodes.EmptyLatentImage().generate(s.width, s.height, s.batch)[0]
    pixels = _fit(inputs.init_image, s)
    if inputs.mask is not None:
        latent = nodes.VAEEncodeForInpaint().encode(vae, pixels, inputs.mask[:1], int(inputs.grow_mask))[0]
    else:
        latent = nodes.VAEEncode().encode(vae, pixels)[0]
    return nodes.RepeatLatentBatch().repeat(latent, s.batch)[0] if s.batch > 1 else latent
