"""The Train tab: the models (checkpoints, or DiT split files: diffusion model files + text
encoder(s) + VAE), the training options (generated from the training config), Start / Stop, and
what a run shows (progress with the time left, loss curve with each model's and the untrained
ensemble's validation loss as references, validation table, sample images, report)."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from .. import logger
from ..core.image_file import to_pil
from ..service.training import reference_losses, render_loss_curve
from . import catalog
from .state import Studio
from .training import TrainSnapshot, option_specs, validation_rows
from .ui import JOB_GROUP, SPLIT, TITLE, as_text, label, split_file_widgets, user_errors

VALIDATION_HEADERS = ["model / ensemble", "held-out loss", "best"]
OWN_ROW = ("dataset_folder", "save_name", "sample_prompt")   # options with a row each


def train_tab() -> dict:
    c = {"options": {}}
    specs = option_specs()
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            c["checkpoints"] = gr.Dropdown(catalog.checkpoints(), value=[], multiselect=True, max_choices=6,
                                           allow_custom_value=True, label="checkpoints to ensemble (2-6)",
                                           elem_id="afa-train-checkpoints")
            with gr.Accordion("DiT split files (FLUX, SD3.5, Chroma, Qwen-Image): instead of checkpoints",
                              open=False):
                split_file_widgets(c, "train")
            main = [n for n in specs if not specs[n][1].get("advanced")]   # the others: "more training options"
            more = [n for n in specs if specs[n][1].get("advanced")]
            _option_rows(c["options"], specs, main)
            with gr.Accordion("more training options", open=False):
                _option_rows(c["options"], specs, more)
        with gr.Column(scale=3):
            with gr.Row():
                c["start"] = gr.Button("Start", variant="primary", elem_id="afa-train-start")
                c["stop"] = gr.Button("Stop", variant="stop", elem_id="afa-train-stop")
            c["progress"] = gr.Markdown("No training has run in this studio yet.", elem_id="afa-train-progress")
            c["curve"] = gr.Image(label="loss: train (line), validation of the aggregator (dots), of each model "
                                        "alone and of the untrained ensemble (dashed)", type="pil", format="png",
                                  interactive=False, elem_id="afa-train-curve")
            c["table"] = gr.Dataframe(headers=VALIDATION_HEADERS, value=[], interactive=False,
                                      label="validation on held-out images (lower is better; the models' own "
                                            "objective: eps-MSE, or flow-matching velocity MSE for DiTs): each model "
                                            "alone, the uniform ensemble, the trained aggregator",
                                      column_widths=["65%", "20%", "15%"], elem_id="afa-train-table")
            c["samples"] = gr.Gallery(label="sample images (one per save, with the 'sample prompt')", columns=4,
                                      height=280, object_fit="contain", interactive=False, elem_id="afa-train-samples")
            c["report"] = gr.Textbox(label="report", lines=6, interactive=False)
    return c


def _option_rows(widgets: dict, specs: dict, names: list, per_row: int = 2):
    """The node's options as widgets, `per_row` to a row (OWN_ROW get a row each)."""
    pending = []
    for name in names + [None]:
        if name in (None,) + OWN_ROW or len(pending) == per_row:
            if pending:
                with gr.Row():
                    for n in pending:
                        widgets[n] = _option_widget(n, *specs[n])
            pending = []
        if name in OWN_ROW:
            widgets[name] = _option_widget(name, *specs[name])
        elif name is not None:
            pending.append(name)


def _option_widget(name: str, kind, opts: dict):
    label_text, info, default = label(name), opts.get("tooltip"), opts.get("default")
    elem_id = f"afa-train-{name.replace('_', '-')}"
    if name == "dataset_folder":
        folders = catalog.dataset_folders()
        return gr.Dropdown(folders, value=default if default in folders else (folders[0] if folders else None),
                           allow_custom_value=True, label="dataset folder (inside ComfyUI's input directory)",
                           info=info, elem_id=elem_id)
    if name == "gradient_checkpointing" and not torch.cuda.is_available():
        default = False  # the node's tooltip: turn it off on CPU
    if isinstance(kind, (list, tuple)):
        return gr.Dropdown(list(kind), value=default, label=label_text, info=info, elem_id=elem_id)
    if kind == "BOOLEAN":
        return gr.Checkbox(default, label=label_text, info=info, elem_id=elem_id)
    if kind == "INT":
        return gr.Number(default, precision=0, minimum=opts.get("min"), maximum=opts.get("max"), label=label_text,
                         info=info, elem_id=elem_id)
    if kind == "FLOAT":
        return gr.Number(default, minimum=opts.get("min"), maximum=opts.get("max"), step=opts.get("step", 0.01),
                         label=label_text, info=info, elem_id=elem_id)
    return gr.Textbox(default, label=label_text, info=info, elem_id=elem_id)


def wire_train(studio: Studio, train: dict):
    names = list(train["options"])

    @user_errors
    def start(checkpoints, *values):
        split = dict(zip(SPLIT, values[:len(SPLIT)], strict=True))
        run = studio.start_training(list(checkpoints or []), dict(zip(names, values[len(SPLIT):], strict=True)),
                                    split)
        return f"Started: {run.label()}. Progress appears here every second."
    start.__signature__ = inspect.Signature(  # named API parameters: the models + the node's options
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ["checkpoints", *SPLIT] + names])

    def stop():
        message = studio.stop_training()
        if not message.startswith("Stopping"):
            gr.Warning(message, title=TITLE)
        return message

    inputs = [train["checkpoints"]] + [train[k] for k in SPLIT] + [train["options"][n] for n in names]
    train["start"].click(start, inputs, train["progress"],
                         api_name="train_start", concurrency_id=JOB_GROUP, concurrency_limit=1,
                         api_description="Start training an aggregator (returns at once; poll /status).")
    train["stop"].click(stop, None, train["progress"], api_name="train_stop", concurrency_limit=None,
                        api_description="Stop the training run; it saves a resumable file.")


def train_values(snap: TrainSnapshot, samples_changed: bool = True) -> list:
    """[progress, curve, table, report, samples] of the Train tab (samples: gr.skip() unless changed)."""
    samples = sample_gallery(snap.samples) if samples_changed else gr.skip()
    if snap.state == "idle":
        return [snap.message, None, [], "", samples]
    head = {"starting": "Starting", "running": "Training", "stopping": "Stopping", "finished": "Finished",
            "stopped": "Stopped", "failed": "Failed"}[snap.state]
    name = Path(snap.out_path).name if snap.out_path else ""
    text = f"**{head}** `{name}`: {snap.progress_text()}"
    if snap.state in ("finished", "stopped", "failed", "starting"):
        text += f"\n\n{as_text(snap.message)}" if snap.message not in text else ""
    curve = to_pil(render_loss_curve(snap.history, snap.val_history, f"{name}: step {snap.step}/{snap.total}",
                                     references=reference_losses(snap.validation)))
    return [text, curve, validation_rows(snap.validation), snap.report, samples]


def samples_key(snap: TrainSnapshot) -> list:
    """Changes when the sample images to show change (a new image, or a new run writing the same names)."""
    key = []
    for _, path in snap.samples:
        try:
            key.append([path, os.stat(path).st_mtime_ns])
        except OSError:
            key.append([path, None])
    return key


def sample_gallery(samples: list) -> list:
    """[(PIL image, "step N")] of the run's sample images, read into memory (the samples folder
    is not one gradio serves files from); a file removed since is left out."""
    out = []
    for step, path in samples:
        try:
            with Image.open(path) as img:
                out.append((img.convert("RGB"), f"step {step}"))
        except OSError as e:
            logger.warning("sample image %s is not readable: %s", path, e)
    return out
