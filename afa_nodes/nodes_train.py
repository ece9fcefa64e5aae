"""AFA Train Aggregator (V3 node): trains the SABW aggregator of an AFA MODEL's experts.

The node takes the AFA MODEL (as its example workflow wires it), hands its experts to
service.training.train and shows the loss curve and the validation report. Its widget inputs
are generated from core.train_config: one TrainConfig field shown on the node = one input, with
the field's name, default, range and tooltip for the node. Progress goes to ComfyUI's progress
bar; Cancel (ComfyUI's interrupt) stops before the next step and leaves a resumable file.
"""
import time

import comfy.model_management
import comfy.utils
from comfy_api.v0_0_2 import io, ui

from . import logger
from .core.errors import check_result
from .core.spec import Mode
from .core.train_config import NODE, options
from .service import models, training

CATEGORY = "AFA"
NODE_ID = "AFATrainAggregator"
TEXT_EVERY = 0.5  # seconds between progress-text updates
SOCKETS = ("model", "clip", "vae")
Aggregator = io.Custom("AFA_AGGREGATOR")


def widget_input(f) -> io.Input:
    """The node input of TrainConfig field `f` (its Opt: name, default, widget range, tooltip)."""
    o = f.metadata["afa"]
    name, default, kind = o.name_in(f, NODE), o.default_in(f, NODE), o.kind_of(f)
    lo, hi = o.limits(NODE)
    common = dict(default=default, tooltip=o.help, optional=o.node_optional)
    if o.choices:
        return io.Combo.Input(name, options=list(o.choices), **common)
    if kind == "bool":
        return io.Boolean.Input(name, **common)
    if kind == "int":
        return io.Int.Input(name, min=lo, max=hi, step=o.step, **common)
    if kind == "float":  # a step finer than 1e-3 (the learning rate): keep typed-in values unrounded
        fine = o.step is not None and o.step < 1e-3
        return io.Float.Input(name, min=lo, max=hi, step=o.step, round=False if fine else None, **common)
    return io.String.Input(name, **common)


def _progress_text(text, node_id):
    try:
        from server import PromptServer
        server = getattr(PromptServer, "instance", None)
        if server is not None and node_id is not None and hasattr(server, "send_progress_text"):
            server.send_progress_text(text, node_id)
    except Exception as e:  # the UI text is a nicety; training must not fail on it
        logger.debug("progress text not sent: %s", e)


class _ComfyProgress:
    """ComfyUI's progress bar and interrupt as the trainer's progress/should_stop/status."""

    def __init__(self, total, node_id):
        self.bar, self.node_id = comfy.utils.ProgressBar(total, node_id=node_id), node_id
        self.stop, self.last_text = False, 0.0

    def status(self, text):
        _progress_text(text, self.node_id)

    def should_stop(self):
        return self.stop or comfy.model_management.processing_interrupted()

    def __call__(self, step, total, loss):
        try:
            self.bar.update_absolute(step, total)
        except comfy.model_management.InterruptProcessingException:  # the UI hook raises on Cancel
            self.stop = True
        now = time.monotonic()
        if now - self.last_text >= TEXT_EVERY or step == total:
            self.last_text = now
            self.status(f"step {step}/{total}  loss {loss:.5f}")


class AFATrainAggregator(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_ID, display_name="AFA Train Aggregator", category=CATEGORY, is_output_node=True,
            description=("Trains the AFA aggregator (SABW) of an AFA ensemble on a folder of captioned images "
                         "(ComfyUI/input/<folder>: images with same-name .txt captions). Only the aggregator learns; "
                         "the models stay frozen. Writes models/afa/<save name>.safetensors; Cancel stops cleanly "
                         "and 'resume' continues from the file."),
            inputs=[io.Model.Input("model", tooltip="The AFA ensemble (from AFA Ensemble Loader) whose aggregator "
                                                    "is trained."),
                    io.Clip.Input("clip", tooltip="The CLIP from the same AFA loader (encodes captions with each "
                                                  "model's own text encoder)."),
                    io.Vae.Input("vae", tooltip="The VAE that encodes the training images.")]
                   + [widget_input(f) for f in options(NODE)],
            outputs=[Aggregator.Output("aggregator", display_name="aggregator",
                                       tooltip=f"The trained aggregator: connect it to AFA Ensemble (mode "
                                               f"'{Mode.AGGREGATOR.value}')."),
                     io.Image.Output("loss_curve", display_name="loss_curve",
                                     tooltip="Training loss (line) and held-out validation loss (dots) per step."),
                     io.String.Output("report", display_name="report",
                                      tooltip="Validation table: the trained ensemble vs. block-wise averaging vs. "
                                              f"each {Mode.SINGLE_MODEL.value}.")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, dataset_folder, save_name):
        ok = check_result(training.dataset_in_input_dir, dataset_folder)
        return ok if ok is not True else check_result(training.aggregator_save_path, save_name)

    @classmethod
    def fingerprint_inputs(cls, dataset_folder, **kwargs):
        """Re-train when the dataset's files change (ComfyUI otherwise caches by inputs)."""
        return training.dataset_fingerprint(dataset_folder)

    @classmethod
    def execute(cls, model, clip, vae, **values) -> io.NodeOutput:
        config = training.config_from_ui(values, NODE)
        experts = models.experts_of(model)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        comfy_progress = _ComfyProgress(config.steps, node_id)
        result = training.train(experts, clip, vae, config, progress=comfy_progress,
                                should_stop=comfy_progress.should_stop, status=comfy_progress.status)
        if result.stopped:
            logger.info("AFA training cancelled at step %d; %s can be resumed", result.step, config.out)
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise comfy.model_management.InterruptProcessingException()
        report = result.report
        comfy_progress.status(report.splitlines()[-1] if result.validation else f"done: step {result.step}")
        curve = training.render_loss_curve(result.history, result.val_history, f"{config.out.name}: {result.step} steps",
                                           references=training.reference_losses(result.validation))
        shown = {**ui.PreviewImage(curve, cls=cls).as_dict(), **ui.PreviewText(report).as_dict()}
        return io.NodeOutput(models.load_aggregator_file(config.out), curve, report, ui=shown)


NODES = [AFATrainAggregator]   # registered by afa_nodes/nodes.py (comfy_entrypoint)
