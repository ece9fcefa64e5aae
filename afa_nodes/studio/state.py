"""The studio's process-wide state, shared by every browser session and API client:
the job board (one job at a time, a queue behind it), the checkpoint cache and the
current/last training run."""
from __future__ import annotations

import threading
from typing import Optional

from .cache import DEFAULT_CAPACITY, CheckpointCache
from .generation import GenerationResult, Progress, generate
from .jobs import GENERATION, TRAINING, JobBoard
from .request import GenerateRequest
from .training import TrainingRun, TrainSnapshot


class Studio:
    def __init__(self, cache_capacity: int = DEFAULT_CAPACITY, demo_folder: Optional[str] = None):
        self.demo_folder = demo_folder   # where "Add demo checkpoints" builds them (None: service.models.DEMO_DIR)
        self.board = JobBoard()
        self.cache = CheckpointCache(cache_capacity)
        self.training: Optional[TrainingRun] = None
        self._lock = threading.Lock()

    def generate(self, request: GenerateRequest, progress: Optional[Progress] = None) -> GenerationResult:
        """Validate, wait for the board (StudioBusyError while a training runs), generate, release."""
        request = request.checked()

        def waiting(position):
            if progress is not None:
                progress(0.0, f"waiting: {position} job(s) before this one")
        with self.board.hold(GENERATION, request.label(), on_wait=waiting) as job:
            def report(fraction, text):
                job.detail = text
                if progress is not None:
                    progress(fraction, text)
            return generate(request, self.cache, report, job)

    def start_training(self, checkpoints, options: dict, split: Optional[dict] = None) -> TrainingRun:
        """Validate and start a training run in its worker thread, in turn after the jobs before it
        (StudioBusyError while a training runs). `split`: DiT split files instead of checkpoints
        (TrainingRun). The cached checkpoints are dropped first: training loads its own copies."""
        run = TrainingRun(checkpoints, options, self.board, split)
        run.start(on_start=self.cache.clear)
        with self._lock:
            self.training = run
        return run

    def stop_training(self) -> str:
        run = self.training
        if run is None:
            return "No training is running: nothing to stop."
        return run.stop()

    def cancel(self) -> str:
        """Cancel the running job: a generation stops within one sampler step, a training before
        its next step (saving a resumable file)."""
        job = self.board.current
        if job is None:
            return "Nothing is running: nothing to cancel."
        if job.kind == TRAINING:
            return self.stop_training()
        at = f" at {job.detail}" if job.detail else ""
        self.board.cancel(job)
        return f"Cancelling the {job.kind} ({job.label}){at}: it stops within one sampler step."

    def training_snapshot(self) -> TrainSnapshot:
        run = self.training
        return run.snapshot() if run is not None else TrainSnapshot()
