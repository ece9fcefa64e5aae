"""Generate tab back end: the AFA ensemble's images next to its block-wise average and each
base model's, same seed (compare mode), every checkpoint from the studio's cache (loaded once).

Runs what a ComfyUI workflow runs (service.models: checkpoints -> Load LoRA -> the AFA
ensemble; service.sampling: CLIP Text Encode, Apply ControlNet, Empty Latent Image or VAE
Encode (for Inpainting), KSampler, VAE Decode, under torch.inference_mode() as ComfyUI's
executor does), records the attention maps with `service.maps`, and saves every
image as PNG into ComfyUI's output folder (`afa_studio/`) with two text chunks: "afa"
(the settings, the same JSON as `python -m afa_nodes generate`) and "prompt" (the
equivalent ComfyUI API graph, its LoRAs, ControlNet and init image / mask included, so dropping
the file on ComfyUI loads the workflow). DiT split files (diffusion models sharing text encoder(s)
and a VAE, from the cache file by file) run the same way; their graph loads them with Load
Diffusion Model, Load CLIP / DualCLIPLoader / TripleCLIPLoader and Load VAE.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

import comfy.utils
import folder_paths

from .. import logger
from ..core.errors import AFAError
from ..core.files import atomic_write, file_sha256
from ..core.image_file import save_png
from ..core.spec import Mode
from ..service import maps, models, sampling
from . import catalog
from .cache import CheckpointCache
from .jobs import Job
from .maps_view import MapsView
from .request import GenerateRequest

OUTPUT_PREFIX = "afa_studio/afa"
INPUT_SUBFOLDER = "afa_studio"   # uploaded images the saved workflows load

Progress = Callable[[float, str], None]   # (fraction 0..1, text)


@dataclass
class Picture:
    path: Path
    caption: str


@dataclass
class GenerationResult:
    pictures: list = field(default_factory=list)   # ensemble images first, then each base model's
    maps: Optional[MapsView] = None
    seconds: float = 0.0
    note: str = ""                                 # why there are no maps, when there are none


class StageProgress:
    """ComfyUI's global progress hook -> (fraction of the whole job, text). It also checks the
    job's cancel flag at every step: a cancelled job stops within one sampler step."""

    def __init__(self, stages: list, report: Optional[Progress], job: Optional[Job] = None):
        self.stages, self.report, self.index, self.job = stages, report, 0, job

    def stage(self, index: int, text: str = ""):
        self._check()
        self.index = index
        self._emit(index / len(self.stages), f"{self.stages[index]}: {text}" if text else self.stages[index])

    def _check(self):
        if self.job is not None:
            self.job.check()

    def __call__(self, value, total, preview=None, node_id=None):
        self._check()
        total = max(1, int(total or 1))
        self._emit((self.index + min(value, total) / total) / len(self.stages),
                   f"{self.stages[self.index]}: step {value}/{total}")

    def _emit(self, fraction, text):
        if self.report is not None:
            self.report(fraction, text)

    @contextmanager
    def hooked(self):
        previous = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(self)
        try:
            yield self
        finally:
            comfy.utils.set_progress_bar_global_hook(previous)


def generate(req: GenerateRequest, cache: CheckpointCache, progress: Optional[Progress] = None,
             job: Optional[Job] = None) -> GenerationResult:
    """Sample the ensemble (and, with `compare`, its block-wise average and each model alone: same
    seed, same checkpoints from the cache), save the PNGs, keep the maps. `req` comes from
    `GenerateRequest.checked()`; `job` (optional) cancels between and within steps."""
    started = time.monotonic()
    spec = req.spec()
    experts = _expert_keys(req)
    alone = list(dict.fromkeys(experts)) if req.compare else []    # a model chosen twice runs once
    average = req.compare and spec.mode is not Mode.BLOCK_AVERAGE
    stages = (["AFA ensemble"] + ([str(Mode.BLOCK_AVERAGE)] if average else [])
              + [f"base model {i + 1}/{len(alone)} ({key[0]})" for i, key in enumerate(alone)])
    tracker = StageProgress(stages, progress, job)
    inputs = req.image_inputs()
    out_dir, prefix = _output_prefix(req)
    result = GenerationResult()

    def save(images, name, what, caption, graph):
        for b in range(images.shape[0]):
            path = out_dir / f"{prefix}_{name}_{b}.png"
            save_png(images[b], path, {"afa": dict(settings, image=what, batch_index=b), "prompt": graph})
            result.pictures.append(Picture(path, caption + _nth(req, b)))

    with torch.inference_mode(), tracker.hooked():
        tracker.stage(0, "loading the checkpoints" if req.split is None else
                      "loading the diffusion models, text encoder(s) and VAE")
        patched, clip_type = _patched_experts(cache, experts, req.split)
        if clip_type is not None:
            req = replace(req, clip_type=clip_type)   # "auto" resolved: the graph's CLIP loader type
        settings = req.settings()
        ckpts = [patched[key] for key in experts]
        shared = req.split is not None
        loaded = models.ensemble_of_checkpoints(ckpts, spec, shared_clip=shared)
        sampling.require_text_encoder(loaded.clip, req.model_names)
        model, recorder = loaded.model, None
        if req.record_maps and spec.mode.mixes:
            model, recorder = maps.record_maps(model, points="all")
        tracker.stage(0, "sampling")
        samples, images = sampling.sample(model, loaded.clip, loaded.vae, req, inputs)
        save(images, "ensemble", "ensemble", _ensemble_caption(req, spec), comfy_prompt(req))
        if recorder is not None:
            try:  # the images are saved: a maps problem (e.g. the recorder's memory cap) is only a note
                result.maps = MapsView(recorder.find_run(samples["samples"]), images, f"{req.mode}, seed {req.seed}")
            except AFAError as e:
                result.note = f"no attention maps: {e}"
        else:
            result.note = (f"no attention maps: mode '{Mode.SINGLE_MODEL}' mixes nothing." if req.record_maps
                           else "attention maps were not recorded (turn on 'record attention maps').")
        if average:
            tracker.stage(1, "sampling")
            plain = models.ensemble_of_checkpoints(ckpts, replace(spec, mode=Mode.BLOCK_AVERAGE, aggregator=None),
                                                   shared_clip=shared)
            images = sampling.sample(plain.model, plain.clip, plain.vae, req, inputs)[1]
            save(images, "average", str(Mode.BLOCK_AVERAGE), f"{Mode.BLOCK_AVERAGE} ({len(ckpts)} models)",
                 comfy_prompt(replace(req, mode=Mode.BLOCK_AVERAGE.value, aggregator=catalog.NONE)))
        for i, key in enumerate(alone):
            tracker.stage(1 + average + i, "sampling")
            base = patched[key]
            sampling.require_text_encoder(base.clip, [key[0]])
            images = sampling.sample(base.model, base.clip, base.vae, req, inputs)[1]
            save(images, f"base{i + 1}", f"base: {key[0]}", f"base model {i + 1}: {key[0]}" + _loras_note(key[1]),
                 comfy_prompt(req, base=key[0], base_loras=key[1]))
    result.seconds = time.monotonic() - started
    logger.info("AFA Studio: generated %d image(s) in %.1f s into %s", len(result.pictures), result.seconds, out_dir)
    return result


def _expert_keys(req: GenerateRequest) -> list:
    """(checkpoint or diffusion model, its LoRAs) per model: one key per distinct patched model."""
    return [(name, tuple(loras)) for name, loras in zip(req.model_names, req.lora_lists())]


def _patched_experts(cache: CheckpointCache, keys: list, split=None) -> tuple:
    """(key -> the cached checkpoint with its LoRAs (one patched clone per distinct key, so one file
    with the same LoRAs twice is one model, as ComfyUI requires), the text encoder type of `split`
    (DiT split files: each diffusion model with the shared text encoder and VAE; None: checkpoints))."""
    names, clip_type = [k[0] for k in keys], None
    if split is not None:
        ckpts, clip_type = cache.split_files(split)
        loaded = dict(zip(split.diffusion_models, ckpts))
    else:
        loaded = dict(zip(names, cache.checkpoints(names)))
    return {key: models.with_loras(loaded[key[0]], key[1]) for key in dict.fromkeys(keys)}, clip_type


def _loras_note(loras) -> str:
    return f" + LoRA {', '.join(f'{lo.name}:{lo.strength:g}' for lo in loras)}" if loras else ""


def _ensemble_caption(req: GenerateRequest, spec) -> str:
    what = f"aggregator {req.aggregator}" if spec.mode is Mode.AGGREGATOR else req.mode
    return f"AFA ensemble ({what})"


def _nth(req: GenerateRequest, b: int) -> str:
    return f", image {b + 1}/{req.batch}" if req.batch > 1 else ""


def _output_prefix(req: GenerateRequest):
    """(folder, "afa_00012") in ComfyUI's output directory, numbered like SaveImage."""
    out = folder_paths.get_output_directory()
    folder, filename, counter, _, _ = folder_paths.get_save_image_path(OUTPUT_PREFIX, out, req.width, req.height)
    os.makedirs(folder, exist_ok=True)
    return Path(folder), f"{filename}_{counter:05}"


def comfy_prompt(req: GenerateRequest, base: Optional[str] = None, base_loras=()) -> dict:
    """The ComfyUI API graph that makes the same image (the ensemble's, or one base model's with
    `base_loras`): its LoRAs, ControlNet and init image / mask included. Uploaded images are copied
    into ComfyUI's input folder (`afa_studio/`), where the graph's Load Image nodes find them."""
    graph = {}

    def add(class_type, **inputs) -> str:
        key = str(len(graph) + 1)
        graph[key] = {"class_type": class_type, "inputs": inputs}
        return key
    loras = req.lora_lists()
    if req.split is not None:
        model, clip, vae = _split_loaders(add, req, base)
    elif base is None and not any(loras):
        loader = add("AFAEnsembleLoader", **{f"ckpt_{i + 1}": n for i, n in enumerate(req.checkpoints)},
                     aggregator=req.aggregator, **_ensemble_inputs(req))
        model, clip, vae = [loader, 0], [loader, 1], [loader, 2]
    else:  # each model: Load Checkpoint -> its Load LoRA chain; then AFA Ensemble + AFA CLIP Merge
        chains = [_lora_chain(add, name, own) for name, own in
                  ([(base, base_loras)] if base is not None else zip(req.checkpoints, loras))]
        model, clip, vae = chains[0]
        if base is None:
            model = _ensemble_node(add, req, [c[0] for c in chains])
            clip = [add("AFACLIPMerge", **{f"clips.clip_{i + 1}": c[1] for i, c in enumerate(chains)}), 0]
    positive = [add("CLIPTextEncode", text=req.prompt, clip=clip), 0]
    negative = [add("CLIPTextEncode", text=req.negative, clip=clip), 0]
    if req.controlnet not in (None, "", catalog.NONE) and req.control_image:
        control = add("ControlNetApplyAdvanced", positive=positive, negative=negative,
                      control_net=[add("ControlNetLoader", control_net_name=req.controlnet), 0],
                      image=_scaled(add, req, req.control_image), strength=req.control_strength,
                      start_percent=0.0, end_percent=1.0, vae=vae)
        positive, negative = [control, 0], [control, 1]
    if not req.init_image:
        latent = [add("EmptyLatentImage", width=req.width, height=req.height, batch_size=req.batch), 0]
    else:
        pixels = _scaled(add, req, req.init_image)
        if req.mask:
            mask = [add("LoadImageMask", image=_input_copy(req.mask), channel=_mask_channel(req.mask)), 0]
            latent = [add("VAEEncodeForInpaint", pixels=pixels, vae=vae, mask=mask, grow_mask_by=req.grow_mask), 0]
        else:
            latent = [add("VAEEncode", pixels=pixels, vae=vae), 0]
        if req.batch > 1:
            latent = [add("RepeatLatentBatch", samples=latent, amount=req.batch), 0]
    samples = add("KSampler", model=model, seed=req.seed, steps=req.steps, cfg=req.cfg, sampler_name=req.sampler,
                  scheduler=req.scheduler, positive=positive, negative=negative, latent_image=latent,
                  denoise=req.denoise)
    add("SaveImage", images=[add("VAEDecode", samples=[samples, 0], vae=vae), 0], filename_prefix=OUTPUT_PREFIX)
    return graph


def _ensemble_node(add, req: GenerateRequest, models_in: list) -> list:
    """AFA Ensemble of the MODEL links (+ AFA Load Aggregator); -> its MODEL link."""
    extra = {"aggregator": [add("AFALoadAggregator", aggregator=req.aggregator), 0]} \
        if req.aggregator != catalog.NONE else {}
    return [add("AFAEnsemble", **{f"models.model_{i + 1}": m for i, m in enumerate(models_in)},
                **_ensemble_inputs(req), **extra), 0]


def _split_loaders(add, req: GenerateRequest, base: Optional[str]) -> tuple:
    """DiT split files: Load Diffusion Model per model (-> AFA Ensemble, unless `base`), Load CLIP /
    DualCLIPLoader / TripleCLIPLoader by the number of text encoder files, Load VAE; -> (MODEL,
    CLIP, VAE) links."""
    unets = [[add("UNETLoader", unet_name=n, weight_dtype="default"), 0]
             for n in ([base] if base is not None else req.diffusion_models)]
    files = list(req.text_encoders)
    if len(files) == 1:
        clip = add("CLIPLoader", clip_name=files[0], type=req.clip_type)
    elif len(files) == 2:
        clip = add("DualCLIPLoader", clip_name1=files[0], clip_name2=files[1], type=req.clip_type)
    else:   # ComfyUI's TripleCLIPLoader has no type: SD3 / SD3.5's three text encoders
        clip = add("TripleCLIPLoader", **{f"clip_name{i + 1}": n for i, n in enumerate(files)})
    vae = add("VAELoader", vae_name=req.vae)
    model = unets[0] if base is not None else _ensemble_node(add, req, unets)
    return model, [clip, 0], [vae, 0]


def _ensemble_inputs(req: GenerateRequest) -> dict:
    return {"mode": req.mode, "weights": req.weights, "model_index": req.model_index, "map_refresh": req.map_refresh,
            "full_res": req.full_res}


def _lora_chain(add, name: str, loras) -> tuple:
    """Load Checkpoint -> Load LoRA per LoRA; -> (MODEL, CLIP, VAE) links."""
    ckpt = add("CheckpointLoaderSimple", ckpt_name=name)
    model, clip = [ckpt, 0], [ckpt, 1]
    for lo in loras:
        lora = add("LoraLoader", model=model, clip=clip, lora_name=lo.name, strength_model=lo.strength,
                   strength_clip=lo.strength)
        model, clip = [lora, 0], [lora, 1]
    return model, clip, [ckpt, 2]


def _scaled(add, req: GenerateRequest, path) -> list:
    """Load Image -> Upscale Image to the run's size (as service.sampling does)."""
    image = add("LoadImage", image=_input_copy(path))
    return [add("ImageScale", image=[image, 0], upscale_method="bilinear", width=req.width, height=req.height,
                crop="disabled"), 0]


def _input_copy(path) -> str:
    """An uploaded image copied (once, named by its content) into ComfyUI's input folder."""
    name = f"{file_sha256(path)[:16]}{Path(path).suffix or '.png'}"
    target = Path(folder_paths.get_input_directory()) / INPUT_SUBFOLDER / name
    if not target.exists():
        atomic_write(target, lambda tmp: shutil.copyfile(path, tmp))
    return f"{INPUT_SUBFOLDER}/{name}"


def _mask_channel(path) -> str:
    """Load Image (as Mask)'s channel for the mask as request.load_mask reads it."""
    from PIL import Image
    with Image.open(path) as im:
        return "alpha" if im.mode in ("RGBA", "LA") and im.getextrema()[-1][0] < 255 else "red"
