"""The Win map tab: which checkpoint denoises best where on your images, before any training
(service.winmap, as the AFA Win Map node and `python -m afa_nodes winmap`), and, ticked, the
held-out evaluation of an ensemble (mode, aggregator) beside each checkpoint.

The run takes the studio's one job slot (JobBoard, kind WIN_MAP) in turn: Cancel (the
studio's button) stops it before the next (image, step) and shows what was measured so far.
The cached checkpoints are dropped first, as for training: the analysis loads its own copies.
"""
from __future__ import annotations

import gradio as gr

from ..core.spec import MODE_NAMES, EnsembleSpec, Mode
from ..core.winmap import DOMINANT_SHARE, GRID, MAX_STEPS, MIN_GAIN
from ..service import models
from ..service import winmap as service_winmap
from . import catalog
from .jobs import JobBoard
from .ui import JOB_GROUP, TITLE, user_errors

WIN_MAP = "win map"
ABOUT = (f"Each checkpoint predicts the noise of your noised images alone; per step, every region gets the colour "
         f"of the checkpoint with the lowest error there. Verdict: one checkpoint winning {100 * DOMINANT_SHARE:.0f}%+ "
         f"of the comparisons dominates, a per-region choice saving < {100 * MIN_GAIN:.0f}% means nearly the same "
         "models - ensembling will not help much either way; otherwise they are complementary.")


def winmap_tab(studio) -> dict:
    """Builds the tab (inside a gr.Tab) and wires its button; returns the components by name."""
    c = {}
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            gr.Markdown(ABOUT)
            c["checkpoints"] = gr.Dropdown(catalog.checkpoints(), value=[], multiselect=True, max_choices=6,
                                           allow_custom_value=True, label="checkpoints to compare (2-6)",
                                           elem_id="afa-winmap-checkpoints")
            folders = catalog.dataset_folders()
            c["dataset_folder"] = gr.Dropdown(folders, value=folders[0] if folders else None, allow_custom_value=True,
                                              label="images with captions (a folder inside ComfyUI's input directory)",
                                              elem_id="afa-winmap-dataset")
            with gr.Row():
                c["steps"] = gr.Number(4, precision=0, minimum=1, maximum=MAX_STEPS, label="steps",
                                       elem_id="afa-winmap-steps")
                c["seeds"] = gr.Number(2, precision=0, minimum=1, maximum=service_winmap.MAX_SEEDS,
                                       label="noise seeds per image", elem_id="afa-winmap-seeds")
            with gr.Row():
                c["grid"] = gr.Number(GRID, precision=0, minimum=1, maximum=64, label="regions per side",
                                      elem_id="afa-winmap-grid")
                c["resolution"] = gr.Number(512, precision=0, minimum=64, maximum=2048, step=64, label="resolution",
                                            elem_id="afa-winmap-resolution")
                c["max_images"] = gr.Number(0, precision=0, minimum=0, label="at most this many images (0: all)",
                                            elem_id="afa-winmap-max-images")
            with gr.Accordion("held-out evaluation of an ensemble", open=True):
                c["evaluate"] = gr.Checkbox(False, label="also measure the ensemble beside each checkpoint "
                                                         "(use images the aggregator was not trained on)",
                                            elem_id="afa-winmap-evaluate")
                c["mode"] = gr.Dropdown(MODE_NAMES, value=Mode.BLOCK_AVERAGE.value, label="mode",
                                        elem_id="afa-winmap-mode")
                c["aggregator"] = gr.Dropdown(catalog.aggregators(), value=models.NONE, allow_custom_value=True,
                                              label="aggregator", elem_id="afa-winmap-aggregator")
            c["run"] = gr.Button("Measure", variant="primary", elem_id="afa-winmap-run")
        with gr.Column(scale=3):
            c["verdict"] = gr.Markdown("No win map measured yet.", elem_id="afa-winmap-verdict")
            c["overview"] = gr.Image(label="winners per step and the proportion of wins", type="pil", format="png",
                                     interactive=False, elem_id="afa-winmap-overview")
            c["evaluation"] = gr.Image(label="held-out evaluation", type="pil", format="png", interactive=False,
                                       elem_id="afa-winmap-evaluation")
            c["report"] = gr.Textbox(label="evaluation table", lines=5, interactive=False,
                                     elem_id="afa-winmap-report")
    fields = ["checkpoints", "dataset_folder", "steps", "seeds", "grid", "resolution", "max_images", "evaluate",
              "mode", "aggregator"]

    @user_errors
    def run(*values, progress=gr.Progress()):
        return measure(studio, dict(zip(fields, values)), progress)
    c["run"].click(run, [c[k] for k in fields], [c["verdict"], c["overview"], c["evaluation"], c["report"]],
                   api_name="win_map", concurrency_id=JOB_GROUP, concurrency_limit=1)
    return c


def measure(studio, values: dict, progress=None) -> tuple:
    """The tab's values -> (verdict markdown, overview PIL, evaluation PIL or None, report text)."""
    from ..core.image_file import to_pil
    names = [n for n in (values.get("checkpoints") or []) if n]
    settings = service_winmap.settings_from_ui(dict(values, seed=0))
    spec = None
    if values.get("evaluate"):
        spec = EnsembleSpec.from_ui(names, values.get("mode"), values.get("aggregator"))
    board: JobBoard = studio.board
    with board.hold(WIN_MAP, f"{len(names)} checkpoints on {settings.dataset.name}") as job:
        studio.cache.clear()
        job.detail = "loading the checkpoints"
        experts, clip, vae = models.experts_from_files(names)

        def report(done, total):
            job.detail = f"(image, step) {done}/{total}"
            if progress is not None:
                progress(done / total, job.detail)
        result = service_winmap.win_map(experts, clip, vae, settings, spec, progress=report,
                                        should_stop=lambda: job.cancelled)
    verdict = f"**Verdict:** {result.verdict}"
    if result.table.stopped:
        verdict = f"**Cancelled** after {result.table.images} image(s); what was measured: {result.verdict}"
        gr.Info("Win map cancelled: showing what was measured.", title=TITLE)
    evaluation = to_pil(result.evaluation) if result.evaluation is not None else None
    return verdict, to_pil(result.overview), evaluation, result.report
