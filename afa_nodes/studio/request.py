"""What the Generate tab sends: the sampling settings, the ensemble (checkpoints, or DiT split
files: diffusion models sharing text encoder(s) and a VAE; every mode with its parameters),
LoRAs, img2img / inpainting and ControlNet inputs. `checked()` returns a
validated copy or raises AFAError naming the field and the fix.

LoRAs are one line per target, `name:strength` pairs separated by commas (strength 1 when
left out):

    all: style.safetensors:0.8          <- the ensemble: applied to every model
    1: detail.safetensors:0.5, b.safetensors
    2: other.safetensors:-0.3

A LoRA on the ensemble is applied to each model (model and text encoder, ComfyUI's Load
LoRA), before that model's own LoRAs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from PIL import Image, ImageOps

from ..core.errors import AFAError
from ..core.image_file import to_image
from ..core.spec import MAX_MODELS, EnsembleSpec, FullRes, Mode
from ..service import models, sampling
from . import catalog

LORA_HELP = ("One line per target: 'all: style.safetensors:0.8' (the ensemble: every model), "
             "'1: detail.safetensors:0.5, other.safetensors' (model 1; strength 1 when left out).")


@dataclass
class GenerateRequest(sampling.SampleSettings):
    checkpoints: list = field(default_factory=list)
    diffusion_models: list = field(default_factory=list)   # DiT split files, instead of checkpoints
    text_encoders: list = field(default_factory=list)
    vae: str = catalog.NONE
    clip_type: str = "auto"
    mode: str = Mode.BLOCK_AVERAGE.value
    aggregator: str = catalog.NONE
    weights: str = ""
    model_index: int = 1        # 1-based, as shown
    map_refresh: int = 1        # mode aggregator: recompute the weight maps every k steps
    precision: str = "auto"     # mode aggregator: the aggregator's compute dtype
    full_res: str = FullRes.EXACT.value   # mode aggregator: how it runs at the full-resolution points
    loras: str = ""             # see the module
    init_image: Optional[str] = None     # img2img / inpainting: an image file
    mask: Optional[str] = None           # inpainting: white = repaint
    grow_mask: int = 6
    controlnet: str = catalog.NONE
    control_image: Optional[str] = None
    control_strength: float = 1.0
    compare: bool = True        # also each model alone and the block-wise average, same seed
    record_maps: bool = True    # attention maps for the Maps tab

    def checked(self) -> "GenerateRequest":
        req = super().checked()
        checkpoints, split = catalog.check_sources(self.checkpoints, self.diffusion_models, self.text_encoders,
                                                   self.vae, self.clip_type)
        if split is not None:
            req = replace(req, diffusion_models=list(split.diffusion_models), text_encoders=list(split.text_encoders),
                          vae=split.vae, clip_type=split.clip_type)
            if str(self.loras or "").strip():
                raise AFAError("LoRAs apply to checkpoints in the studio; DiT split files take none here (use "
                               "ComfyUI's LoraLoaderModelOnly in a workflow). Clear the LoRA box.")
        else:
            req = replace(req, diffusion_models=[], text_encoders=[], vae=catalog.NONE, clip_type="auto")
        aggregator = catalog.check_aggregator(self.aggregator, self.mode)
        if not 1 <= int(self.model_index or 0) <= MAX_MODELS:
            raise AFAError(f"model_index must be between 1 and {MAX_MODELS}, got {self.model_index}.")
        req = replace(req, checkpoints=checkpoints, aggregator=aggregator, model_index=int(self.model_index),
                      map_refresh=int(self.map_refresh or 0), controlnet=self.controlnet or catalog.NONE,
                      init_image=self.init_image or None, mask=self.mask or None,
                      control_image=self.control_image or None)
        spec = req.spec().checked()
        req.lora_lists()           # names known, strengths numbers, targets in range
        req.image_inputs()         # images readable, ControlNet known
        return replace(req, mode=spec.mode.value, full_res=str(spec.full_res))

    @property
    def split(self) -> Optional[catalog.SplitFiles]:
        """The DiT split files of a checked request (None: checkpoints)."""
        if not self.diffusion_models:
            return None
        return catalog.SplitFiles(tuple(self.diffusion_models), tuple(self.text_encoders), self.vae, self.clip_type)

    @property
    def model_names(self) -> list:
        """The ensemble's models: checkpoint names, or diffusion model file names."""
        return list(self.diffusion_models or self.checkpoints)

    def spec(self) -> EnsembleSpec:
        return EnsembleSpec.from_ui(self.model_names, self.mode, self.aggregator, self.weights, self.model_index,
                                    self.map_refresh, self.precision, self.full_res)

    def lora_lists(self) -> list:
        """[LoraChoice list] per model: the ensemble's LoRAs, then the model's own."""
        return parse_loras(self.loras, len(self.model_names))

    def image_inputs(self) -> sampling.ImageInputs:
        controlnet = None if self.controlnet in (None, "", catalog.NONE) else self.controlnet
        return sampling.ImageInputs(
            init_image=load_image(self.init_image, "init image"), mask=load_mask(self.mask),
            grow_mask=int(self.grow_mask or 0), controlnet=controlnet,
            control_image=load_image(self.control_image, "control image") if controlnet else None,
            control_strength=float(self.control_strength)).checked()

    def label(self) -> str:
        extra = [w for w, on in (("img2img", self.init_image and not self.mask), ("inpaint", self.mask),
                                 ("ControlNet", self.controlnet not in (None, "", catalog.NONE)),
                                 ("LoRA", self.loras.strip())) if on]
        return (f"{len(self.model_names)} models, {self.mode}, {self.steps} steps, {self.width}x{self.height}"
                + "".join(f", {w}" for w in extra))

    def settings(self) -> dict:
        """The settings embedded in every PNG (keys as in `python -m afa_nodes generate`, plus the
        studio's extras)."""
        sample = {k: getattr(self, k) for k in sampling.SampleSettings.__dataclass_fields__}
        return dict(sample, mode=self.mode, weights=self.weights, model_index=self.model_index,
                    map_refresh=self.map_refresh, precision=self.precision, full_res=self.full_res,
                    checkpoints=list(self.checkpoints),
                    split_files=None if self.split is None else
                    {"diffusion_models": list(self.diffusion_models), "text_encoders": list(self.text_encoders),
                     "vae": self.vae, "clip_type": self.clip_type},
                    aggregator=None if self.aggregator == catalog.NONE else self.aggregator,
                    loras=[[(lo.name, lo.strength) for lo in per] for per in self.lora_lists()],
                    img2img=bool(self.init_image), inpaint=bool(self.mask),
                    controlnet=None if self.controlnet == catalog.NONE else
                    {"name": self.controlnet, "strength": self.control_strength}, app="AFA Studio")


def parse_loras(text: str, n: int) -> list:
    """The LoRA text (see the module) -> [LoraChoice list] per model, each checked."""
    shared, own = [], [[] for _ in range(n)]
    known = None
    for number, line in enumerate(str(text or "").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        target, sep, rest = line.partition(":")
        target = target.strip().lower().removeprefix("model").strip()
        if not sep or not (target in ("all", "ensemble") or target.isdigit()):
            raise AFAError(f"LoRA line {number} '{line}': start with 'all:' or a model number '1:'. {LORA_HELP}")
        if target.isdigit() and not 1 <= int(target) <= n:
            raise AFAError(f"LoRA line {number}: model {target} is not in the ensemble (models 1 to {n}).")
        choices = []
        for item in filter(None, (i.strip() for i in rest.split(","))):
            name, strength = item, 1.0
            match = re.fullmatch(r"(.+?):\s*([-+]?\d*\.?\d+)", item)
            if match:
                name, strength = match.group(1).strip(), float(match.group(2))
            if not -10.0 <= strength <= 10.0:
                raise AFAError(f"LoRA '{name}': strength must be between -10 and 10, got {strength}.")
            known = models.lora_names() if known is None else known
            if name not in known:
                raise AFAError(f"LoRA '{name}' (line {number}) not found in ComfyUI's loras folders; "
                               f"available: {', '.join(known) or 'none'}.")
            choices.append(models.LoraChoice(name, strength))
        (shared if not target.isdigit() else own[int(target) - 1]).extend(choices)
    return [shared + mine for mine in own]


def load_image(path, what: str) -> Optional[torch.Tensor]:
    if not path:
        return None
    try:
        with Image.open(path) as im:
            return to_image(ImageOps.exif_transpose(im))
    except (OSError, ValueError) as e:
        raise AFAError(f"the {what} could not be read ({e}); upload a PNG or JPEG.") from None


def load_mask(path) -> Optional[torch.Tensor]:
    """A mask image -> MASK [1, H, W], 1 = repaint: its alpha channel when it has transparency
    (transparent = repaint), else its brightness (white = repaint)."""
    if not path:
        return None
    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "LA") and im.getextrema()[-1][0] < 255:
                gray = ImageOps.invert(im.getchannel("A"))
            else:
                gray = im.convert("L")
            return to_image(gray)[..., 0]
    except (OSError, ValueError) as e:
        raise AFAError(f"the mask could not be read ({e}); upload a black-and-white PNG (white = repaint).") from None
