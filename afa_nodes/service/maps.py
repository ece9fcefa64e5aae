"""Maps: recording the aggregator's per-pixel model weights while a sampler runs, and
rendering them. What every front end (nodes, CLI, studio) calls for AFA's attention maps.

Wiring: `record_maps` turns an AFA MODEL into a recording clone plus its `MapRecorder`. An
OUTER_SAMPLE wrapper keyed "afa_maps" on that clone opens a new run each time a sampler uses
it and keeps the sampler's output latent with it, so `preview_maps(recorder, latent, ...)`
shows the run that produced exactly that latent (never another run's maps). `maps_response`
is the web viewer's payload (GET /afa/maps/{run_id}[?step&point&branch&batch]).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.patcher_extension

from .. import logger
from ..core import map_render
from ..core.errors import AFAError
from ..core.map_recorder import MapRecorder, MapRun, get_run, map_payload, run_info
from ..core.map_selection import StepSelection, parse_points
from ..core.spec import Mode
from ..ensemble_model import require_ensemble, with_recorder

KEY = "afa_maps"
BRANCHES = ["cond", "uncond"]
POINTS_HELP = ("Aggregation points: 'all', indices '1, 24', ranges '0-11', names 'middle', 'final', "
               "'input 3', 'output 10', or a whole stage 'input' / 'output'.")
STEPS_HELP = ("Sampler steps: 'all', 'every 5' (0, 5, 10, ... and the last), 'last 10', "
              "or indices '0, 5, 10-12' (0 = the first step).")


def check_steps(steps: str) -> None:
    """AFAError when a steps selection cannot be read (checked before any sampling)."""
    StepSelection.parse(steps)


def _outer_sample_wrapper(recorder: MapRecorder):
    """Each sampling run through the recording MODEL gets its own MapRun."""
    def afa_maps_outer_sample(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        recorder.begin_run(tuple(noise.shape), sigmas)
        try:
            out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        except BaseException as e:
            recorder.abort_run(type(e).__name__)
            raise
        recorder.end_run(out)
        return out
    return afa_maps_outer_sample


def record_maps(model, points="all", steps="all", max_side=64, cap_mb=256, enabled=True):
    """AFA MODEL -> (recording MODEL, MapRecorder). Disabled: the MODEL unchanged and a recorder
    that records nothing (no cost while sampling)."""
    ensemble = require_ensemble(model, "AFA Record Attention")
    names = ensemble.layout.point_names
    if not enabled:
        return model, MapRecorder.disabled(ensemble.names, names, ensemble.mode)
    recorder = MapRecorder(ensemble.names, names, points, steps, max_side, cap_mb, mode=ensemble.mode)
    if not ensemble.mode.mixes:
        logger.warning("AFA Record Attention: mode '%s' mixes nothing, so no maps will be recorded.",
                       Mode.SINGLE_MODEL.value)
    clone = with_recorder(model, recorder)
    kind = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    clone.remove_wrappers_with_key(kind, KEY)
    clone.add_wrapper_with_key(kind, KEY, _outer_sample_wrapper(recorder))
    return clone, recorder


# ---------------------------------------------------------------- preview
def resolve_points(spec: str, recorder: MapRecorder, run: MapRun) -> list[str]:
    """Point names for a preview spec (same syntax as recording); each must have been recorded."""
    names = [recorder.all_points[i] for i in parse_points(spec, recorder.all_points)]
    missing = [p for p in names if p not in run.maps.point_names]
    if missing:
        raise AFAError(f"point(s) {', '.join(missing)} were not recorded in this run; recorded points: "
                       f"{', '.join(run.maps.point_names)} (AFA Record Attention 'points' = "
                       f"{', '.join(recorder.all_points[i] for i in recorder.points)}).")
    return names


def resolve_step(step: int, run: MapRun) -> int:
    """-1 = the last recorded step; otherwise it must have been recorded."""
    steps = sorted(run.maps.steps)
    if step == -1:
        return steps[-1]
    if step not in steps:
        raise AFAError(f"step {step} was not recorded in this run; recorded steps: "
                       f"{', '.join(map(str, steps))} (-1 = the last).")
    return step


def render_all(run: MapRun, points: list, step: int, branch: str, batch_index: int, image=None, cell=96):
    """(grid [P,H,W,3], dominant, overlay, chart) IMAGEs (float 0..1, [B,H,W,3]) for one run;
    the overlay is the dominant map when no decoded image is given."""
    maps = run.maps
    if branch not in maps.branches:
        hint = " (cfg 1.0 runs no uncond pass)" if branch == "uncond" else ""
        raise AFAError(f"no {branch!r} maps in this run{hint}; recorded branches: {', '.join(maps.branches)}.")
    if not 0 <= batch_index < run.batch:
        raise AFAError(f"batch_index {batch_index} is out of range: the run sampled {run.batch} image(s) "
                       f"(0..{run.batch - 1}).")
    grids = torch.cat([map_render.render_grid(maps, p, branch, batch_index, cell=cell) for p in points])
    dominant = map_render.render_dominant(maps, step, points[0], branch, batch_index)
    if image is not None:
        overlay = map_render.render_overlay(image, maps, step, points[0], branch, batch_index)
    else:
        overlay = dominant
    chart = map_render.render_mean_chart(maps, branch, batch_index)
    return grids, dominant, overlay, chart


@dataclass
class MapPreview:
    """What `preview_maps` renders for one run. grid: one image per chosen point (rows = steps,
    columns = models); dominant/overlay/chart: [1,H,W,3]; `shown`: the images a viewer displays
    (no overlay without a decoded image); `info`: the viewer's run info with the chosen view."""
    run: MapRun
    points: list
    step: int
    grid: torch.Tensor
    dominant: torch.Tensor
    overlay: torch.Tensor
    chart: torch.Tensor
    shown: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def images(self) -> tuple:
        return self.grid, self.dominant, self.overlay, self.chart


def latent_samples(latent) -> torch.Tensor:
    """A sampler's LATENT (dict with 'samples') or the samples tensor itself -> the tensor."""
    samples = latent.get("samples") if isinstance(latent, dict) else latent
    if not isinstance(samples, torch.Tensor):
        raise AFAError("'latent' holds no samples tensor: connect a sampler's LATENT output.")
    return samples


def preview_maps(recorder, latent, points="middle", step=-1, branch="cond", batch_index=0, cell=96,
                 image: Optional[torch.Tensor] = None) -> MapPreview:
    """The maps of the run that produced `latent`, rendered (see MapPreview). `image`: the
    decoded image of that latent (batch 1 or the run's batch) for the overlay."""
    if not isinstance(recorder, MapRecorder):
        raise AFAError("'maps' must come from AFA Record Attention.")
    run = recorder.find_run(latent_samples(latent))
    names = resolve_points(points, recorder, run)
    chosen = resolve_step(step, run)
    if image is not None and image.shape[0] not in (1, run.batch):
        raise AFAError(f"the image batch ({image.shape[0]}) does not match the sampled batch ({run.batch}): "
                       "connect VAE Decode of the same LATENT.")
    grid, dominant, overlay, chart = render_all(run, names, chosen, branch, batch_index, image, cell)
    shown = [grid, dominant] + ([overlay] if image is not None else []) + [chart]
    info = dict(run_info(run), view={"point": names[0], "step": chosen, "branch": branch,
                                      "batch_index": batch_index})
    return MapPreview(run, names, chosen, grid, dominant, overlay, chart, shown, info)


# ---------------------------------------------------------------- the web viewer's payload
def maps_response(run_id: str, query=None):
    """(HTTP status, JSON dict) for GET /afa/maps/{run_id} (run info) or, with step/point in
    `query`, one map (see map_recorder.map_payload)."""
    run = get_run(run_id)
    if run is None:
        return 404, {"error": f"the maps of run {run_id} are no longer in memory (ComfyUI restarted, or the "
                              "AFA Record Attention node ran again). Queue the workflow again."}
    if run.status != "finished":
        return 409, {"error": f"run {run_id} is {run.status}; its maps are shown once sampling has finished."}
    query = query or {}
    if "step" not in query and "point" not in query:
        return 200, run_info(run)
    try:
        step = int(query.get("step", run.maps.steps[-1] if run.maps.steps else 0))
        return 200, map_payload(run, step, query.get("point", ""), query.get("branch", "cond"),
                                int(query.get("batch", 0)))
    except (AFAError, ValueError) as e:
        return 400, {"error": str(e)}
