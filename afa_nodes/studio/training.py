"""Train tab back end: one aggregator training in a worker thread, polled by the UI.

The form is generated from core.train_config (`option_specs`: every TrainConfig field the
studio shows, with the node's input names, defaults, widget ranges and tooltips where the node
shows it too); the values become a TrainConfig through service.training.config_from_ui (the
dataset is a subfolder of ComfyUI's input directory; the file is models/afa/<save name>.safetensors
+ .train-state) and the run is service.training.train on the experts of the checkpoints, or of
the DiT split files (diffusion model files + text encoder(s) + VAE, catalog.SplitFiles).

Stop sets a flag that the trainer polls before every step; it then saves the aggregator
and its resume state (tick 'resume' and Start to continue). The validation table is
live: the trainer writes it into the file's metadata at every save, and the run reads
it back from there. With a sample prompt, every save also renders a sample image
(service.training.render_sample); the run lists them as they are written.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from safetensors import safe_open

from .. import logger
from ..core.errors import AFAError
from ..core.train_config import STUDIO, from_ui, options, to_ui
from ..service import models, split_files, training
from . import catalog
from .jobs import TRAINING, Job, JobBoard, format_duration

KINDS = {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN", "str": "STRING", "path": "STRING"}


def option_specs() -> dict:
    """The form, in the node's order: input name -> (INT/FLOAT/BOOLEAN/STRING or a list of
    choices, {default, min, max, step, tooltip, advanced})."""
    specs = {}
    for f in options(STUDIO):
        o = f.metadata["afa"]
        lo, hi = o.limits(STUDIO)
        opts = {"default": o.default_in(f, STUDIO), "min": lo, "max": hi, "step": o.step, "tooltip": o.help,
                "advanced": o.advanced}
        kind = list(o.choices) if o.choices else KINDS[o.kind_of(f)]
        specs[o.name_in(f, STUDIO)] = (kind, {k: v for k, v in opts.items() if v is not None})
    return specs


def check_options(values: dict) -> dict:
    """Every option (missing ones take the form's default), typed and within its limits."""
    return to_ui(from_ui(values, STUDIO), STUDIO)


@dataclass
class TrainSnapshot:
    """What the Train tab shows; `version` changes whenever anything in it changes."""
    version: int = 0
    state: str = "idle"            # idle | starting | running | stopping | finished | stopped | failed
    message: str = "No training has run in this studio yet."
    step: int = 0
    total: int = 0
    history: list = field(default_factory=list)      # [[step, train loss]]
    val_history: list = field(default_factory=list)  # [[step, validation loss]]
    validation: Optional[dict] = None                # the trainer's table (rows of name/loss)
    samples: list = field(default_factory=list)      # [[step, png path]] of this run, in order
    eta_seconds: Optional[float] = None
    elapsed_seconds: float = 0.0
    out_path: Optional[str] = None
    report: str = ""

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "stopping")

    def progress_text(self, elapsed: bool = True) -> str:
        if self.state == "starting" or not self.total:
            return self.message
        eta = (f", about {format_duration(self.eta_seconds)} left" if self.eta_seconds is not None
               else ", estimating the time left" if self.active else "")
        loss = f", loss {self.history[-1][1]:.5f}" if self.history else ""
        took = (f" ({'running for' if self.active else 'took'} {format_duration(self.elapsed_seconds)})"
                if elapsed else "")
        return f"step {self.step}/{self.total}{loss}{eta}{took}"


class TrainingRun:
    """One training job. `start()` validates and starts the worker thread (holding the board
    until it ends); `stop()` asks it to stop; `snapshot()` is safe to call from any thread."""

    def __init__(self, checkpoints, options: dict, board: JobBoard, split: Optional[dict] = None):
        """`split`: catalog.check_sources' split-file arguments (diffusion_models, text_encoders,
        vae, clip_type); exactly one of `checkpoints` and `split` names the models."""
        self.checkpoints, self.split = catalog.check_sources(checkpoints, **(split or {}))
        self.options = check_options(options)
        self.config = training.config_from_ui(self.options, STUDIO)
        self.out_path = self.config.out
        self.board = board
        self.job: Optional[Job] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stop_lock = threading.Lock()
        self._done = threading.Event()
        self._snap = TrainSnapshot(state="starting", total=self.config.steps, out_path=str(self.out_path),
                                   message=f"starting: {self.out_path.name}")
        self._started = time.monotonic()
        self._wall_started = time.time()
        self._first_progress = None   # (monotonic time, step) of the first step of this run
        self._file_mtime = None

    def label(self) -> str:
        count = len(self.split.diffusion_models) if self.split else len(self.checkpoints)
        return f"{self.out_path.name}: {count} models, {self.config.steps} steps"

    # ------------------------------------------------------------------ control
    def start(self, on_start=None) -> "TrainingRun":
        self.job = self.board.wait_turn(TRAINING, self.label())  # after a generation that runs
        if on_start is not None:
            on_start()
        threading.Thread(target=self._run, name="afa-studio-training", daemon=True).start()
        return self

    def stop(self) -> str:
        """Ask the run to stop; the text says what happens (also when it was asked already)."""
        snap = self.snapshot()
        if not snap.active:
            return f"No training is running (the last one {snap.state}: {snap.message})"
        with self._stop_lock:
            already = self._stop.is_set()
            self._stop.set()
        if already:
            return (f"Already stopping: the run stops before its next step (now at step {snap.step}/{snap.total}) "
                    f"and saves {self.out_path.name} with its resume state.")
        with self._lock:  # only a run still going becomes "stopping" (it may have just finished)
            if self._snap.active:
                self._snap.state = "stopping"
                self._snap.message = (f"stopping before step {snap.step + 1}; then {self.out_path.name} "
                                      "is saved with its resume state")
                self._snap.version += 1
        return (f"Stopping: {self.out_path.name} and its resume state are saved before the next step "
                f"(now at step {snap.step}/{snap.total}). Tick 'resume' and press Start to continue later.")

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)

    def snapshot(self) -> TrainSnapshot:
        with self._lock:
            s = self._snap
            copy = TrainSnapshot(**{**s.__dict__, "history": list(s.history), "val_history": list(s.val_history),
                                    "samples": list(s.samples)})
        if copy.active:
            copy.elapsed_seconds = time.monotonic() - self._started
        return copy

    # ------------------------------------------------------------------ worker
    def _run(self):
        try:
            if self.split:
                self._status("loading the diffusion models, their text encoder(s) and VAE")
                experts, clip, vae = split_files.experts_from_split_files(
                    list(self.split.diffusion_models), list(self.split.text_encoders), self.split.vae,
                    self.split.clip_type)
            else:
                self._status("loading the checkpoints")
                experts, clip, vae = models.experts_from_files(self.checkpoints)
            result = training.train(experts, clip, vae, self.config, progress=self._progress,
                                    should_stop=self._stop.is_set, status=self._status, on_sample=self._sample)
            if result.stopped and result.path is None:
                message = f"stopped before the first step: nothing trained, {self.out_path.name} was not written."
            elif result.stopped:
                message = (f"stopped at step {result.step}/{self.config.steps}: {self.out_path.name} holds the "
                           f"aggregator so far and {training.state_path(self.out_path).name} its resume state. Tick "
                           "'resume' and press Start to continue.")
            else:
                message = (f"done: {self.out_path.name} saved at step {result.step}; it is now in the Generate "
                           "tab's aggregator list.")
            self._update(state="stopped" if result.stopped else "finished", message=message, step=result.step,
                         history=[list(h) for h in result.history],
                         val_history=[list(v) for v in result.val_history],
                         validation=result.validation, report=result.report, eta_seconds=None)
            logger.info("AFA Studio training: %s", message)
        except AFAError as e:
            self._update(state="failed", message=str(e), eta_seconds=None)
            logger.warning("AFA Studio training failed: %s", e)
        except Exception as e:  # noqa: BLE001 - shown in the UI; the traceback goes to the log
            logger.exception("AFA Studio training failed")
            self._update(state="failed", message=f"{type(e).__name__}: {e} (the traceback is in the log)",
                         eta_seconds=None)
        finally:
            with self._lock:
                self._snap.elapsed_seconds = time.monotonic() - self._started
            self.board.end(self.job)
            self._done.set()

    def _status(self, text: str):
        if self.job is not None:
            self.job.detail = text
        self._update(message=text)

    def _progress(self, step: int, total: int, loss: float):
        now = time.monotonic()
        if self._first_progress is None:
            self._first_progress = (now, step)
        t0, s0 = self._first_progress
        eta = (total - step) * (now - t0) / (step - s0) if step > s0 else None
        with self._lock:
            self._snap.history.append([step, float(loss)])
        self._update(state="stopping" if self._stop.is_set() else "running", step=step, total=total,
                     eta_seconds=eta, message=f"training {self.out_path.name}", **self._saved_validation())
        if self.job is not None:
            self.job.detail = self.snapshot().progress_text(elapsed=False)

    def _sample(self, step: int, path):
        with self._lock:
            self._snap.samples.append([step, str(path)])
        self._update(message=f"step {step}: sample image {path.name}")

    def _saved_validation(self) -> dict:
        """The validation table and curve of the last save of THIS run (the file's metadata)."""
        try:
            mtime = os.stat(self.out_path).st_mtime
        except OSError:
            return {}
        if mtime < self._wall_started or mtime == self._file_mtime:
            return {}
        self._file_mtime = mtime
        try:
            with safe_open(str(self.out_path), "pt") as f:
                training = json.loads((f.metadata() or {}).get("afa", "{}")).get("training", {})
        except Exception as e:  # noqa: BLE001 - a live preview only; the final result has the table
            logger.debug("could not read the validation table from %s: %s", self.out_path, e)
            return {}
        out = {}
        if training.get("validation"):
            out["validation"] = training["validation"]
        if training.get("val_curve"):
            out["val_history"] = [list(v) for v in training["val_curve"]]
        return out

    def _update(self, **changes):
        with self._lock:
            for key, value in changes.items():
                setattr(self._snap, key, value)
            self._snap.version += 1


def validation_rows(table: Optional[dict]) -> list:
    """The trainer's validation table as rows [name, loss, note] (lower is better)."""
    if not table:
        return []
    best = min(r["loss"] for r in table["rows"])
    return [[r["name"], round(float(r["loss"]), 6), "best" if r["loss"] == best else ""] for r in table["rows"]]
