"""AFA Train Aggregator: trains the SABW aggregator of an AFA MODEL inside ComfyUI."""
import hashlib
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import comfy.model_management
import comfy.utils
import folder_paths

from . import logger
from .core.aggregator_file import load_aggregator
from .core.errors import DatasetError, TrainingError
from .core.train import TrainConfig
from .training_host import train_from_comfy

CATEGORY = "AFA"
CROP_MODES = ["center", "random"]
DEFAULT_CROP_VARIANTS = 4
CURVE_SIZE = (640, 360)
TEXT_EVERY = 0.5  # seconds between progress-text updates


def resolve_dataset_folder(name: str) -> Path:
    """`name` as a folder inside ComfyUI's input directory; refuses absolute paths and `..`."""
    base = os.path.abspath(folder_paths.get_input_directory())
    name = (name or "").strip()
    if not name:
        raise DatasetError(f"give the dataset folder: the name of a subfolder of ComfyUI's input directory ({base}).")
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise DatasetError(f"dataset folder '{name}' must be a subfolder of ComfyUI's input directory ({base}), "
                           "given relative to it, without '..'. Move or link the dataset into the input folder.")
    path = os.path.abspath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base or path == base:
        raise DatasetError(f"dataset folder '{name}' is outside ComfyUI's input directory ({base}).")
    if not os.path.isdir(path):
        raise DatasetError(f"dataset folder '{name}' does not exist: create {path} with images and same-name "
                           ".txt captions (or a metadata.jsonl).")
    return Path(path)


def aggregator_save_path(save_name: str) -> Path:
    """models/afa/<save_name>.safetensors (the first 'afa' model folder)."""
    name = (save_name or "").strip()
    if name.endswith(".safetensors"):
        name = name[:-len(".safetensors")]
    if not re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9_\-. ]*", name):
        raise TrainingError(f"save name '{save_name}' must be a plain file name (letters, digits, '_', '-', '.', "
                            "spaces; no folders): the aggregator is written to models/afa/<name>.safetensors.")
    return Path(folder_paths.get_folder_paths("afa")[0]) / f"{name}.safetensors"


def train_arguments(dataset_folder, save_name, steps, batch_size, learning_rate, resolution, seed, save_every,
                    resume, gradient_checkpointing, caption_dropout, validation_fraction, gradient_accumulation=1,
                    crop="center", crop_variants=DEFAULT_CROP_VARIANTS, buckets=False):
    """The options of AFA Train Aggregator (its widget inputs) -> (TrainConfig, the other keywords of
    train_from_comfy: the checked dataset folder and aggregator path included). The node and AFA
    Studio's Train tab both train through this."""
    config = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=gradient_accumulation, lr=learning_rate,
                         seed=seed, save_every=save_every, caption_dropout=caption_dropout,
                         gradient_checkpointing=gradient_checkpointing)
    host = {"dataset_folder": resolve_dataset_folder(dataset_folder), "out_path": aggregator_save_path(save_name),
            "resolution": resolution, "val_fraction": validation_fraction, "resume": resume, "crop": crop,
            "crop_variants": crop_variants, "buckets": buckets}
    return config, host


def render_loss_curve(history, val_history, title="AFA aggregator training", size=CURVE_SIZE) -> torch.Tensor:
    """Train loss (line) and validation loss (dots) per step -> IMAGE [1, H, W, 3] float 0..1."""
    w, h = size
    img = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 64, 16, 30, 40
    draw.text((left, 8), title, fill=(25, 25, 25), font=font)
    points = [(s, v) for s, v in list(history) + list(val_history) if v is not None and math.isfinite(v)]
    if not points:
        draw.text((left, h // 2), "no steps trained yet", fill=(90, 90, 90), font=font)
        return _to_image(img)
    log = min(v for _, v in points) > 0 and max(v for _, v in points) / min(v for _, v in points) > 20
    tf = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = min(tf(v) for _, v in points), max(tf(v) for _, v in points)
    hi = hi if hi > lo else lo + 1e-6
    s_max = max(1, max(s for s, _ in points))

    def xy(s, v):
        return (left + (w - left - right) * s / s_max, top + (h - top - bottom) * (1 - (tf(v) - lo) / (hi - lo)))
    draw.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    for frac in (0.0, 0.5, 1.0):
        value = lo + (hi - lo) * frac
        label = f"{10 ** value:.3g}" if log else f"{value:.3g}"
        y = top + (h - top - bottom) * (1 - frac)
        draw.text((4, y - 6), label, fill=(60, 60, 60), font=font)
    draw.text((left, h - bottom + 6), "0", fill=(60, 60, 60), font=font)
    draw.text((w - right - 40, h - bottom + 6), f"step {s_max}", fill=(60, 60, 60), font=font)
    train = [xy(s, v) for s, v in history if v is not None and math.isfinite(v)]
    if len(train) > 1:
        draw.line(train, fill=(31, 119, 180), width=2)
    elif train:
        draw.ellipse([train[0][0] - 2, train[0][1] - 2, train[0][0] + 2, train[0][1] + 2], fill=(31, 119, 180))
    for s, v in val_history:
        x, y = xy(s, v)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(255, 127, 14))
    draw.text((left + 8, h - 18), "train loss (line)   validation loss (dots)", fill=(60, 60, 60), font=font)
    return _to_image(img)


def _to_image(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def _progress_text(text, node_id):
    try:
        from server import PromptServer
        server = getattr(PromptServer, "instance", None)
        if server is not None and node_id is not None and hasattr(server, "send_progress_text"):
            server.send_progress_text(text, node_id)
    except Exception as e:  # the UI text is a nicety; training must not fail on it
        logger.debug("progress text not sent: %s", e)


class AFATrainAggregator:
    DESCRIPTION = ("Trains the AFA aggregator (SABW) of an AFA ensemble on a folder of captioned images "
                   "(ComfyUI/input/<folder>: images with same-name .txt captions). Only the aggregator learns; "
                   "the models stay frozen. Writes models/afa/<save name>.safetensors; Cancel stops cleanly and "
                   "'resume' continues from the file.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("AFA_AGGREGATOR", "IMAGE", "STRING")
    RETURN_NAMES = ("aggregator", "loss_curve", "report")
    OUTPUT_TOOLTIPS = ("The trained aggregator: connect it to AFA Ensemble (mode 'aggregator').",
                       "Training loss (line) and held-out validation loss (dots) per step.",
                       "Validation table: the trained ensemble vs. block-wise averaging vs. each single model.")
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The AFA ensemble (from AFA Ensemble Loader) whose aggregator is trained."}),
                "clip": ("CLIP", {"tooltip": "The CLIP from the same AFA loader (encodes captions with each model's own text encoder)."}),
                "vae": ("VAE", {"tooltip": "The VAE that encodes the training images."}),
                "dataset_folder": ("STRING", {"default": "afa_dataset", "tooltip": "Folder inside ComfyUI's input directory with images and same-name .txt captions (or metadata.jsonl). Kohya 'N_name' subfolders repeat images."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 1_000_000, "tooltip": "Total optimizer steps (with resume: the target, counting the steps already done)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per step (the paper uses 8; raise gradient accumulation if memory is short)."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1e-1, "step": 1e-5, "round": False, "tooltip": "AdamW learning rate (paper: 1e-4), with 100 warm-up steps."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip": "Training images are scaled and cropped (see 'crop') to this square size; with 'buckets', to the bucket of about this area nearest each image's aspect ratio."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed of the initialisation, data order, noise and the train/validation split."}),
                "save_name": ("STRING", {"default": "afa_aggregator", "tooltip": "Written to models/afa/<save name>.safetensors (+ .train-state for resuming)."}),
                "save_every": ("INT", {"default": 250, "min": 0, "max": 1_000_000, "tooltip": "Save (and validate) every K steps; 0 = only at the end."}),
                "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue the saved file (same models required). Off: start over and overwrite it."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Recompute the frozen models' blocks during backprop: much less memory, ~30% slower. Turn off on CPU or with plenty of VRAM."}),
                "caption_dropout": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 0.9, "step": 0.05, "tooltip": "Per image, the chance its caption is replaced by the empty one (keeps CFG working; paper: 0.1)."}),
                "validation_fraction": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 0.5, "step": 0.05, "tooltip": "Share of images held out to compare the trained ensemble with averaging and each single model."}),
            },
            "optional": {
                "gradient_accumulation": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Micro-batches per step: effective batch = batch size x this."}),
                "crop": (CROP_MODES, {"default": "center", "tooltip": "center: one centred crop per image. random: 'crop variants' seeded random crops per training image, encoded once; every epoch each image uses one of them (the paper trains with random crops). Validation always uses the centre crop."}),
                "crop_variants": ("INT", {"default": DEFAULT_CROP_VARIANTS, "min": 1, "max": 64, "tooltip": "With random crop: crops cached per training image (each costs one VAE encode and its disk space once)."}),
                "buckets": ("BOOLEAN", {"default": False, "tooltip": "Aspect-ratio buckets: each image keeps its shape, scaled to the bucket (sides multiples of 64, about resolution x resolution pixels, aspect up to 2:1) nearest its aspect ratio; every batch holds one bucket. Off: square crops."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, dataset_folder, save_name):
        try:
            resolve_dataset_folder(dataset_folder)
            aggregator_save_path(save_name)
        except (DatasetError, TrainingError) as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(cls, dataset_folder, **kwargs):
        """Re-train when the dataset's files change (ComfyUI otherwise caches by inputs)."""
        try:
            folder = resolve_dataset_folder(dataset_folder)
        except DatasetError:
            return ""
        digest = hashlib.sha256()
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                digest.update(f"{root}/{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return digest.hexdigest()

    def train(self, model, clip, vae, dataset_folder, unique_id=None, **options):
        config, host = train_arguments(dataset_folder, **options)
        out_path = host["out_path"]
        pbar = comfy.utils.ProgressBar(config.steps)
        state = {"stop": False, "last_text": 0.0}

        def status(text):
            _progress_text(text, unique_id)

        def should_stop():
            return state["stop"] or comfy.model_management.processing_interrupted()

        def progress(step, total, loss):
            try:
                pbar.update_absolute(step, total)
            except comfy.model_management.InterruptProcessingException:  # the UI hook raises on Cancel
                state["stop"] = True
            now = time.monotonic()
            if now - state["last_text"] >= TEXT_EVERY or step == total:
                state["last_text"] = now
                status(f"step {step}/{total}  loss {loss:.5f}")

        result = train_from_comfy(model, clip, vae, config=config, should_stop=should_stop, progress=progress,
                                  status=status, **host)
        if result.stopped:
            logger.info("AFA training cancelled at step %d; %s can be resumed", result.step, out_path)
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise comfy.model_management.InterruptProcessingException()
        report = result.report
        status(report.splitlines()[-1] if result.validation else f"done: step {result.step}")
        curve = render_loss_curve(result.history, result.val_history,
                                  f"{out_path.name}: {result.step} steps")
        return (load_aggregator(out_path), curve, report)


NODE_CLASS_MAPPINGS = {"AFATrainAggregator": AFATrainAggregator}
NODE_DISPLAY_NAME_MAPPINGS = {"AFATrainAggregator": "AFA Train Aggregator"}
