"""The Generate tab: where checkpoints go (and the demo ones), or DiT split files (diffusion
models + text encoder(s) + VAE), the ensemble with every mode and its parameters, prompt and
sampling settings, LoRAs, img2img / inpainting, ControlNet, compare mode, and the checkpoint
cache (what is loaded, its size, Clear)."""
from __future__ import annotations

import inspect
from pathlib import Path

import gradio as gr

from ..core.spec import FULL_RES_HELP, FULL_RES_NAMES, MODE_HELP, PRECISIONS, WEIGHTS_HELP, FullRes, Mode
from ..service import models
from . import catalog
from .request import LORA_HELP, GenerateRequest
from .state import Studio
from .ui import JOB_GROUP, SPLIT, TITLE, split_file_widgets, user_errors

# the request's fields, in the order of the form (the named API's parameters)
GENERATE_PARAMS = ["checkpoints", *SPLIT, "mode", "aggregator", "weights", "model_index", "map_refresh", "precision",
                   "full_res", "prompt", "negative", "width", "height", "steps", "cfg", "sampler", "scheduler", "seed",
                   "batch", "loras", "init_image", "mask", "denoise", "grow_mask", "controlnet", "control_image",
                   "control_strength", "compare", "record_maps"]
IMAGE_DEFAULTS = {"init_image": None, "mask": None, "control_image": None}  # optional in the API
QUEUE_LIMIT = 16   # requests gradio hands to the studio's own queue (JobBoard) at once


def checkpoint_hint() -> str:
    folders = ", ".join(f"`{f}`" for f in catalog.checkpoint_folders())
    text = f"Checkpoints are read from {folders} (and `extra_model_paths.yaml`): put `.safetensors` files there."
    if not catalog.checkpoints():
        text += (" **No checkpoint found yet.** Press *Add demo checkpoints* (three small synthetic models with "
                 "random weights: they show the pipeline working, not a picture) or start the studio with "
                 "`python -m afa_nodes studio --demo`.")
    return text


def generate_tab() -> dict:
    c = {}
    with gr.Row():
        c["hint"] = gr.Markdown(checkpoint_hint(), elem_id="afa-gen-hint")
        c["demo"] = gr.Button("Add demo checkpoints", scale=0, min_width=180, elem_id="afa-demo")
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            with gr.Row():
                c["checkpoints"] = gr.Dropdown(catalog.checkpoints(), value=[], multiselect=True, max_choices=6,
                                               allow_custom_value=True, label="checkpoints (2-6, one architecture)",
                                               elem_id="afa-gen-checkpoints", scale=5)
                c["refresh"] = gr.Button("↻", scale=0, min_width=40, elem_id="afa-refresh")
            with gr.Accordion("DiT split files (FLUX, SD3.5, Chroma, Qwen-Image): instead of checkpoints",
                              open=False):
                split_file_widgets(c, "gen")
            with gr.Row():
                c["mode"] = gr.Dropdown(catalog.MODES, value=Mode.BLOCK_AVERAGE.value, label="mode", info=MODE_HELP,
                                        elem_id="afa-gen-mode")
                c["aggregator"] = gr.Dropdown(catalog.aggregators(), value=catalog.NONE, allow_custom_value=True,
                                              label="aggregator (models/afa)", elem_id="afa-gen-aggregator")
            with gr.Row():
                c["weights"] = gr.Textbox("", label=f"weights ({Mode.FIXED_WEIGHTS})", placeholder="0.6, 0.4",
                                          info=WEIGHTS_HELP, visible=False, elem_id="afa-gen-weights")
                c["model_index"] = gr.Number(1, precision=0, minimum=1, maximum=6, visible=False,
                                             label=f"model index ({Mode.SINGLE_MODEL})", elem_id="afa-gen-model-index")
                c["map_refresh"] = gr.Number(1, precision=0, minimum=1, maximum=1000, visible=False,
                                             label="map refresh k (recompute the weight maps every k steps)",
                                             elem_id="afa-gen-map-refresh")
                c["precision"] = gr.Dropdown(list(PRECISIONS), value="auto", visible=False,
                                             label="aggregator precision (auto = the models')",
                                             elem_id="afa-gen-precision")
                c["full_res"] = gr.Dropdown(FULL_RES_NAMES, value=FullRes.EXACT.value, visible=False,
                                            label="aggregator at full resolution", info=FULL_RES_HELP,
                                            elem_id="afa-gen-full-res")
            c["prompt"] = gr.Textbox("a watercolor painting of a lighthouse at dawn", lines=2, label="prompt",
                                     elem_id="afa-gen-prompt")
            c["negative"] = gr.Textbox("", lines=1, label="negative prompt")
            with gr.Row():
                c["width"] = gr.Slider(64, 2048, 512, step=8, label="width", elem_id="afa-gen-width")
                c["height"] = gr.Slider(64, 2048, 512, step=8, label="height", elem_id="afa-gen-height")
            with gr.Row():
                c["steps"] = gr.Slider(1, 150, 20, step=1, label="steps", elem_id="afa-gen-steps")
                c["cfg"] = gr.Slider(0.0, 30.0, 7.0, step=0.5, label="CFG", elem_id="afa-gen-cfg")
            with gr.Row():
                samplers, schedulers = catalog.samplers(), catalog.schedulers()
                c["sampler"] = gr.Dropdown(samplers, value="euler" if "euler" in samplers else samplers[0],
                                           label="sampler")
                c["scheduler"] = gr.Dropdown(schedulers, value="normal" if "normal" in schedulers else schedulers[0],
                                             label="scheduler")
            with gr.Row():
                c["seed"] = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="afa-gen-seed")
                c["batch"] = gr.Slider(1, 16, 1, step=1, label="batch")
            with gr.Accordion("LoRA (per model, or on the ensemble)", open=False):
                c["loras"] = gr.Textbox("", lines=3, label="LoRAs", info=LORA_HELP, elem_id="afa-gen-loras",
                                        placeholder="all: style.safetensors:0.8\n1: detail.safetensors:0.5")
                c["lora_list"] = gr.Markdown(lora_list(catalog.loras()), elem_id="afa-gen-lora-list")
            with gr.Accordion("img2img / inpainting", open=False):
                with gr.Row():
                    c["init_image"] = gr.Image(None, type="filepath", label="init image", sources=["upload"],
                                               elem_id="afa-gen-init")
                    c["mask"] = gr.Image(None, type="filepath", label="mask (white or transparent = repaint)",
                                         sources=["upload"], image_mode="RGBA", elem_id="afa-gen-mask")
                with gr.Row():
                    c["denoise"] = gr.Slider(0.0, 1.0, 1.0, step=0.01, label="denoise (below 1 keeps the init image)",
                                             elem_id="afa-gen-denoise")
                    c["grow_mask"] = gr.Slider(0, 64, 6, step=1, label="grow mask (pixels)")
            with gr.Accordion("ControlNet (applied to the ensemble)", open=False):
                with gr.Row():
                    c["controlnet"] = gr.Dropdown(catalog.controlnets(), value=catalog.NONE, label="ControlNet model",
                                                  allow_custom_value=True, elem_id="afa-gen-controlnet")
                    c["control_strength"] = gr.Slider(0.0, 2.0, 1.0, step=0.05, label="strength",
                                                      elem_id="afa-gen-control-strength")
                c["control_image"] = gr.Image(None, type="filepath", label="control image", sources=["upload"],
                                              elem_id="afa-gen-control-image")
            with gr.Row():
                c["compare"] = gr.Checkbox(True, label=f"compare: also the {Mode.BLOCK_AVERAGE} and each model alone "
                                                       "(same seed, same loaded checkpoints)", elem_id="afa-gen-compare")
                c["record_maps"] = gr.Checkbox(True, label="record attention maps (Maps tab)",
                                               elem_id="afa-gen-record-maps")
        with gr.Column(scale=3):
            c["run"] = gr.Button("Generate", variant="primary", elem_id="afa-generate")
            c["gallery"] = gr.Gallery(label=f"ensemble | {Mode.BLOCK_AVERAGE} | each model (same seed)", columns=3,
                                      height="auto", object_fit="contain", elem_id="afa-gallery")
            c["result"] = gr.Markdown("", elem_id="afa-gen-result")
            with gr.Row():
                c["cache"] = gr.Markdown("", elem_id="afa-cache")
                c["cache_clear"] = gr.Button("Clear the cache", scale=0, min_width=140, elem_id="afa-cache-clear")
    return c


def lora_list(names: list) -> str:
    return ("LoRAs in ComfyUI's loras folders: " + ", ".join(f"`{n}`" for n in names)) if names else \
        "No LoRA in ComfyUI's loras folders (models/loras)."


def wire_generate(studio: Studio, gen: dict, on_result, result_outputs: list):
    """Generate (named API /generate), the mode's fields, the cache panel, the demo button.
    `on_result(result, batch)` -> values for `result_outputs` (the gallery, the maps...)."""
    @user_errors
    def generate(*values, progress=gr.Progress()):  # noqa: B008 (gradio)
        fields = dict(zip(GENERATE_PARAMS, values, strict=True))
        for name in ("checkpoints", "diffusion_models", "text_encoders"):
            fields[name] = list(fields[name] or [])
        fields["vae"] = fields["vae"] or catalog.NONE
        fields["aggregator"] = fields["aggregator"] or catalog.NONE
        for name in ("compare", "record_maps"):
            fields[name] = bool(fields[name])
        result = studio.generate(GenerateRequest(**fields), lambda fraction, text: progress(fraction, desc=text))
        return on_result(result, fields["batch"]) + [studio.cache.summary()]
    generate.__signature__ = inspect.Signature(  # named API parameters: the request's fields
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in GENERATE_PARAMS[:GENERATE_PARAMS.index("init_image")]]
        + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=IMAGE_DEFAULTS.get(n))
           for n in GENERATE_PARAMS[GENERATE_PARAMS.index("init_image"):]]
        + [inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress())])

    gen["run"].click(generate, [gen[k] for k in GENERATE_PARAMS], result_outputs + [gen["cache"]],
                     api_name="generate", concurrency_id=JOB_GROUP, concurrency_limit=QUEUE_LIMIT,
                     api_description=f"Generate with the ensemble; with compare also its {Mode.BLOCK_AVERAGE} and "
                                     "each model alone (same seed).")

    def mode_changed(mode):
        return (gr.Textbox(visible=mode == Mode.FIXED_WEIGHTS), gr.Number(visible=mode == Mode.SINGLE_MODEL),
                gr.Number(visible=mode == Mode.AGGREGATOR), gr.Dropdown(visible=mode == Mode.AGGREGATOR),
                gr.Dropdown(visible=mode == Mode.AGGREGATOR))
    gen["mode"].change(mode_changed, gen["mode"], [gen[k] for k in ("weights", "model_index", "map_refresh",
                                                                    "precision", "full_res")],
                       api_visibility="private", queue=False, show_progress="hidden")

    def clear_cache():
        count = studio.cache.clear()
        gr.Info(f"{count} checkpoint(s) removed from memory." if count else "The cache was empty.", title=TITLE)
        return studio.cache.summary()
    gen["cache_clear"].click(clear_cache, None, gen["cache"], api_name="cache_clear", concurrency_limit=None,
                             api_description="Forget the cached checkpoints (they load again when next used).")

    @user_errors
    def add_demo():
        names = models.add_demo_checkpoints(studio.demo_folder)
        choices = catalog.checkpoints()
        return (gr.Dropdown(choices=choices, value=names[:2]), checkpoint_hint(),
                f"Demo checkpoints ready: {', '.join(names)} (in `{Path(studio.demo_folder or models.DEMO_DIR)}`). "
                "Two are chosen: press Generate (try 64-256 px, a few steps).")
    gen["demo"].click(add_demo, None, [gen["checkpoints"], gen["hint"], gen["result"]], api_name="demo",
                      concurrency_limit=1, api_description="Build (once) and list the synthetic demo checkpoints.")
