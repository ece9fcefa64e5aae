"""AFA Win Map and AFA Evaluate (V3 nodes): who denoises best where, before any training, and
whether a trained ensemble was worth it, on a folder of captioned images (service.winmap).

Both take the AFA MODEL (its experts; AFA Evaluate also its mode and aggregator), its CLIP and
VAE, and a folder inside ComfyUI's input directory (images with same-name .txt captions, as
AFA Train Aggregator reads them). Progress goes to ComfyUI's progress bar; Cancel (ComfyUI's
interrupt) stops before the next (image, step).
"""
import comfy.model_management
import comfy.utils
from comfy_api.v0_0_2 import io, ui

from . import logger
from .core.errors import check_result
from .core.winmap import DOMINANT_SHARE, GRID, MAX_STEPS, MIN_GAIN
from .service import models, training
from .service import winmap as service_winmap

CATEGORY = "AFA"


def _inputs() -> list:
    return [
        io.Model.Input("model", tooltip="An AFA MODEL (from AFA Ensemble Loader): its models are compared."),
        io.Clip.Input("clip", tooltip="The CLIP from the same AFA loader (each model's own text encoder)."),
        io.Vae.Input("vae", tooltip="The VAE that encodes the images."),
        io.String.Input("dataset_folder", default="afa_dataset",
                        tooltip="Folder inside ComfyUI's input directory: images with same-name .txt captions."),
        io.Int.Input("steps", default=4, min=1, max=MAX_STEPS,
                     tooltip="Noise levels, spread over the models' schedule like a sampler's steps, noisiest first."),
        io.Int.Input("seeds", default=2, min=1, max=service_winmap.MAX_SEEDS,
                     tooltip="Noise seeds per image (Monte-Carlo samples of the noise)."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="The first noise seed."),
        io.Int.Input("grid", default=GRID, min=1, max=64, tooltip="Regions per side (at most the latent's size)."),
        io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                     tooltip="Images are centre-cropped to this square size."),
        io.Int.Input("max_images", default=0, min=0, max=100000, tooltip="Use at most this many images (0: all)."),
    ]


class _Progress:
    """ComfyUI's progress bar and interrupt as the service's progress / should_stop."""

    def __init__(self, node_id):
        self.bar, self.stop = None, False
        self.node_id = node_id

    def __call__(self, done, total):
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        try:
            self.bar.update_absolute(done, total)
        except comfy.model_management.InterruptProcessingException:  # the UI hook raises on Cancel
            self.stop = True

    def should_stop(self):
        return self.stop or comfy.model_management.processing_interrupted()


def _run(cls, model, clip, vae, values, evaluate: bool):
    settings = service_winmap.settings_from_ui(values)
    spec = service_winmap.ensemble_spec_of(model) if evaluate else None
    progress = _Progress(cls.hidden.unique_id if cls.hidden is not None else None)
    result = service_winmap.win_map(models.experts_of(model), clip, vae, settings, spec, progress=progress,
                                    should_stop=progress.should_stop)
    if result.table.stopped:
        logger.info("AFA win map cancelled after %d image(s)", result.table.images)
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise comfy.model_management.InterruptProcessingException()
    return result


class _ImageFolderNode(io.ComfyNode):
    """What both nodes share: the folder is checked before the run, and a run is redone when a
    file of the folder changes (ComfyUI otherwise caches by inputs)."""

    @classmethod
    def validate_inputs(cls, dataset_folder):
        return check_result(training.dataset_in_input_dir, dataset_folder)

    @classmethod
    def fingerprint_inputs(cls, dataset_folder, **kwargs):
        return training.dataset_fingerprint(dataset_folder)


class AFAWinMap(_ImageFolderNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AFAWinMap", display_name="AFA Win Map", category=CATEGORY, is_output_node=True,
            description=("Which model predicts the noise best where, before any training (paper Fig. 1): each "
                         "model's denoising error per region of your images, at several steps and noise seeds. "
                         "Shows who wins each region per step, the proportion of wins, and a verdict: "
                         f"complementary, or one model wins {100 * DOMINANT_SHARE:.0f}%+ of the comparisons (or "
                         f"choosing per region saves < {100 * MIN_GAIN:.0f}%) and ensembling will not help much. "
                         "Costs one pass of each model per image, seed and step."),
            inputs=_inputs(),
            outputs=[io.Image.Output("winners", display_name="winners",
                                     tooltip="One picture per step: each region in the colour of the model that "
                                             "wins it most often (paler: a closer race)."),
                     io.Image.Output("wins_plot", display_name="wins_plot",
                                     tooltip="Proportion of wins per model at each step, and the verdict."),
                     io.String.Output("verdict", display_name="verdict",
                                      tooltip="One line: complementary, or one model dominates.")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model, clip, vae, **values) -> io.NodeOutput:
        result = _run(cls, model, clip, vae, values, evaluate=False)
        shown = {**ui.PreviewImage(result.overview, cls=cls).as_dict(), **ui.PreviewText(result.verdict).as_dict()}
        return io.NodeOutput(result.winners, result.share_plot, result.verdict, ui=shown)


class AFAEvaluate(_ImageFolderNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AFAEvaluate", display_name="AFA Evaluate", category=CATEGORY, is_output_node=True,
            description=("Held-out evaluation: the AFA ensemble (its mode and aggregator, as loaded) beside each of "
                         "its models alone, the same denoising error on the same images, noise and steps. Give a "
                         "folder of images the aggregator was not trained on. Costs two passes of each model per "
                         "image, seed and step."),
            inputs=_inputs(),
            outputs=[io.Image.Output("plot", display_name="plot",
                                     tooltip="Mean held-out denoising error: the ensemble, then each model."),
                     io.String.Output("report", display_name="report",
                                      tooltip="The table: mean error and the error at each step, best marked.")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model, clip, vae, **values) -> io.NodeOutput:
        result = _run(cls, model, clip, vae, values, evaluate=True)
        shown = {**ui.PreviewImage(result.evaluation, cls=cls).as_dict(), **ui.PreviewText(result.report).as_dict()}
        return io.NodeOutput(result.evaluation, result.report, ui=shown)


NODES = [AFAWinMap, AFAEvaluate]   # registered by afa_nodes/nodes.py (comfy_entrypoint)
