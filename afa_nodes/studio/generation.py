"""Generate tab back end: the AFA ensemble's images next to each base model's, same seed.

Runs exactly what a ComfyUI workflow runs (AFA Ensemble Loader -> CLIP Text Encode ->
Empty Latent Image -> KSampler -> VAE Decode, under torch.inference_mode() as ComfyUI's
executor does), records the attention maps with `nodes_maps.record`, and saves every
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
from ..core.spec import MAX_MODELS, EnsembleSpec, Mode
from ..service import maps, models, sampling
from . import catalog
from .maps_view import MapsView

OUTPUT_PREFIX = "afa_studio/afa"

Progress = Callable[[float, str], None]   # (fraction 0..1, text)


@dataclass
class GenerateRequest(sampling.SampleSettings):
    """What the Generate tab sends: the sampling settings plus the ensemble and what to show.
    `checked()` returns a validated copy or raises AFAError."""
    checkpoints: list = field(default_factory=list)
    mode: str = Mode.BLOCK_AVERAGE.value
    aggregator: str = catalog.NONE
    weights: str = ""
    model_index: int = 1        # 1-based, as shown
    compare: bool = True        # also each base model alone, same seed
    record_maps: bool = True    # attention maps for the Maps tab

    def checked(self) -> "GenerateRequest":
        req = super().checked()
        checkpoints = catalog.check_checkpoints(self.checkpoints)
        aggregator = catalog.check_aggregator(self.aggregator, self.mode)
        if not 1 <= int(self.model_index or 0) <= MAX_MODELS:
            raise AFAError(f"model_index must be between 1 and {MAX_MODELS}, got {self.model_index}.")
        spec = EnsembleSpec.from_ui(checkpoints, self.mode, aggregator, self.weights, self.model_index).checked()
        return replace(req, checkpoints=checkpoints, aggregator=aggregator, mode=spec.mode.value,
                       model_index=int(self.model_index))

    def spec(self) -> EnsembleSpec:
        return EnsembleSpec.from_ui(self.checkpoints, self.mode, self.aggregator, self.weights, self.model_index)

    def label(self) -> str:
        return f"{len(self.checkpoints)} models, {self.mode}, {self.steps} steps, {self.width}x{self.height}"

    def settings(self) -> dict:
        """The settings embedded in every PNG (keys as in `python -m afa_nodes generate`)."""
        sample = {k: getattr(self, k) for k in sampling.SampleSettings.__dataclass_fields__}
        return dict(sample, mode=self.mode, weights=self.weights, model_index=self.model_index,
                    checkpoints=list(self.checkpoints),
                    aggregator=None if self.aggregator == catalog.NONE else self.aggregator, app="AFA Studio")


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


class ModelCache:
    """The last loaded ensemble (with its checkpoints, which compare mode samples alone: nothing is
    loaded twice), re-used while the selection and the files (size, mtime) stay the same."""

    def __init__(self):
        self._ensemble = None   # (key, service.models.LoadedEnsemble)

    def clear(self):
        self._ensemble = None

    def ensemble(self, req: GenerateRequest) -> models.LoadedEnsemble:
        key = (models.files_fingerprint("checkpoints", req.checkpoints), tuple(req.checkpoints),
               models.files_fingerprint("afa", [req.aggregator]), req.spec())
        if self._ensemble is None or self._ensemble[0] != key:
            self._ensemble = None  # free the old one before loading the new one
            self._ensemble = (key, models.load_ensemble(req.spec()))
        return self._ensemble[1]


class StageProgress:
    """ComfyUI's global progress hook -> (fraction of the whole job, text)."""

    def __init__(self, stages: list, report: Optional[Progress]):
        self.stages, self.report, self.index = stages, report, 0

    def stage(self, index: int, text: str = ""):
        self.index = index
        self._emit(index / len(self.stages), f"{self.stages[index]}: {text}" if text else self.stages[index])

    def __call__(self, value, total, preview=None, node_id=None):
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


def generate(req: GenerateRequest, cache: ModelCache, progress: Optional[Progress] = None) -> GenerationResult:
    """Sample the ensemble (and each base model when `compare`), save the PNGs, keep the maps.
    `req` comes from `GenerateRequest.checked()` (Studio.generate validates before taking the board)."""
    started = time.monotonic()
    bases = list(dict.fromkeys(req.checkpoints)) if req.compare else []  # a checkpoint chosen twice runs once
    stages = ["AFA ensemble"] + [f"base model {i + 1}/{len(bases)} ({name})" for i, name in enumerate(bases)]
    tracker = StageProgress(stages, progress)
    settings = req.settings()
    out_dir, prefix = _output_prefix(req)
    result = GenerationResult()
    with torch.inference_mode(), tracker.hooked():
        tracker.stage(0, "loading the checkpoints")
        loaded = cache.ensemble(req)
        sampling.require_text_encoder(loaded.clip, req.checkpoints)
        model, recorder = loaded.model, None
        if req.record_maps and req.spec().mode.mixes:
            model, recorder = maps.record_maps(model, points="all")
        tracker.stage(0, "sampling")
        samples, images = sampling.sample(model, loaded.clip, loaded.vae, req)
        graph = comfy_prompt(req)
        for b in range(images.shape[0]):
            path = out_dir / f"{prefix}_ensemble_{b}.png"
            save_png(images[b], path, {"afa": dict(settings, image="ensemble", batch_index=b), "prompt": graph})
            result.pictures.append(Picture(path, _ensemble_caption(req, b)))
        if recorder is not None:
            try:  # the images are saved: a maps problem (e.g. the recorder's memory cap) is only a note
                result.maps = MapsView(recorder.find_run(samples["samples"]), images, f"{req.mode}, seed {req.seed}")
            except AFAError as e:
                result.note = f"no attention maps: {e}"
        else:
            result.note = (f"no attention maps: mode '{Mode.SINGLE_MODEL}' mixes nothing." if req.record_maps
                           else "attention maps were not recorded (turn on 'record attention maps').")
        checkpoints = {c.name: c for c in loaded.checkpoints}  # compare re-uses the ensemble's checkpoints
        for i, name in enumerate(bases):
            tracker.stage(1 + i, "sampling")
            base = checkpoints[name]
            sampling.require_text_encoder(base.clip, [name])
            _, base_images = sampling.sample(base.model, base.clip, base.vae, req)
            graph = comfy_prompt(req, base=name)
            for b in range(base_images.shape[0]):
                path = out_dir / f"{prefix}_base{i + 1}_{b}.png"
                save_png(base_images[b], path, {"afa": dict(settings, image=f"base: {name}", batch_index=b),
                                                 "prompt": graph})
                result.pictures.append(Picture(path, f"base model {i + 1}: {name}" + _nth(req, b)))
    result.seconds = time.monotonic() - started
    logger.info("AFA Studio: generated %d image(s) in %.1f s into %s", len(result.pictures), result.seconds, out_dir)
    return result


def _ensemble_caption(req: GenerateRequest, b: int) -> str:
    what = f"aggregator {req.aggregator}" if req.spec().mode is Mode.AGGREGATOR else req.mode
    return f"AFA ensemble ({what})" + _nth(req, b)


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
                             "model_index": req.model_index}}
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
                         "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": OUTPUT_PREFIX}},
    }
