"""Generate tab back end: the AFA ensemble's images next to its block-wise average and each
base model's, same seed (compare mode), every checkpoint from the studio's cache (loaded once).

Runs what a ComfyUI workflow runs (service.models: checkpoints -> Load LoRA -> the AFA
ensemble; service.sampling: CLIP Text Encode, Apply ControlNet, Empty Latent Image or VAE
Encode (for Inpainting), KSampler, VAE Decode, under torch.inference_mode() as ComfyUI's
executor does), records the attention maps with `service.maps`, and saves every
image as PNG into ComfyUI's output folder (`afa_studio/`) with two text chunks: "afa"
(the settings, the same JSON as `python -m afa_nodes generate`) and "prompt" (the
equivalent ComfyUI API graph, so dropping the file on ComfyUI loads the workflow).
"""
from __future__ import annotations

import os
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
from ..core.image_file import save_png
from ..core.spec import Mode
from ..service import maps, models, sampling
from . import catalog
from .cache import CheckpointCache
from .jobs import Job
from .maps_view import MapsView
from .request import GenerateRequest

OUTPUT_PREFIX = "afa_studio/afa"

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
    settings = req.settings()
    out_dir, prefix = _output_prefix(req)
    result = GenerationResult()

    def save(images, name, what, caption, graph):
        for b in range(images.shape[0]):
            path = out_dir / f"{prefix}_{name}_{b}.png"
            save_png(images[b], path, {"afa": dict(settings, image=what, batch_index=b), "prompt": graph})
            result.pictures.append(Picture(path, caption + _nth(req, b)))

    with torch.inference_mode(), tracker.hooked():
        tracker.stage(0, "loading the checkpoints")
        patched = _patched_experts(cache, experts)
        ckpts = [patched[key] for key in experts]
        loaded = models.ensemble_of_checkpoints(ckpts, spec)
        sampling.require_text_encoder(loaded.clip, req.checkpoints)
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
            plain = models.ensemble_of_checkpoints(ckpts, replace(spec, mode=Mode.BLOCK_AVERAGE, aggregator=None))
            images = sampling.sample(plain.model, plain.clip, plain.vae, req, inputs)[1]
            save(images, "average", str(Mode.BLOCK_AVERAGE), f"{Mode.BLOCK_AVERAGE} ({len(ckpts)} models)",
                 comfy_prompt(replace(req, mode=Mode.BLOCK_AVERAGE.value, aggregator=catalog.NONE)))
        for i, key in enumerate(alone):
            tracker.stage(1 + average + i, "sampling")
            base = patched[key]
            sampling.require_text_encoder(base.clip, [key[0]])
            images = sampling.sample(base.model, base.clip, base.vae, req, inputs)[1]
            save(images, f"base{i + 1}", f"base: {key[0]}", f"base model {i + 1}: {key[0]}" + _loras_note(key[1]),
                 comfy_prompt(req, base=key[0]))
    result.seconds = time.monotonic() - started
    logger.info("AFA Studio: generated %d image(s) in %.1f s into %s", len(result.pictures), result.seconds, out_dir)
    return result


def _expert_keys(req: GenerateRequest) -> list:
    """(checkpoint, its LoRAs) per model: one key per distinct patched model."""
    return [(name, tuple(loras)) for name, loras in zip(req.checkpoints, req.lora_lists())]


def _patched_experts(cache: CheckpointCache, keys: list) -> dict:
    """Key -> the cached checkpoint with its LoRAs (one patched clone per distinct key, so one file
    with the same LoRAs twice is one model, as ComfyUI requires)."""
    loaded = dict(zip([k[0] for k in keys], cache.checkpoints([k[0] for k in keys])))
    return {key: models.with_loras(loaded[key[0]], key[1]) for key in dict.fromkeys(keys)}


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


def comfy_prompt(req: GenerateRequest, base: Optional[str] = None) -> dict:
    """The ComfyUI API graph that makes the same image (the ensemble's, or one base model's)."""
    if base is None:
        loader = {"class_type": "AFAEnsembleLoader",
                  "inputs": {**{f"ckpt_{i + 1}": n for i, n in enumerate(req.checkpoints)},
                             "aggregator": req.aggregator, "mode": req.mode, "weights": req.weights,
                             "model_index": req.model_index, "map_refresh": req.map_refresh}}
    else:
        loader = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base}}
    return {
        "1": loader,
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": req.prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": req.negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage",
              "inputs": {"width": req.width, "height": req.height, "batch_size": req.batch}},
        "5": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "seed": req.seed, "steps": req.steps, "cfg": req.cfg,
                         "sampler_name": req.sampler, "scheduler": req.scheduler, "positive": ["2", 0],
                         "negative": ["3", 0], "latent_image": ["4", 0], "denoise": req.denoise}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": OUTPUT_PREFIX}},
    }
