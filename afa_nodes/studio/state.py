"""The studio's process-wide state, shared by every browser session and API client:
the job board (one job at a time), the loaded models and the current/last training run."""
from __future__ import annotations

import threading
from typing import Optional

from .generation import GenerateRequest, GenerationResult, ModelCache, Progress, generate
from .jobs import GENERATION, JobBoard
from .training import TrainingRun, TrainSnapshot


class Studio:
    def __init__(self):
        self.board = JobBoard()
        self.models = ModelCache()
        self.training: Optional[TrainingRun] = None
        self._lock = threading.Lock()

    def generate(self, request: GenerateRequest, progress: Optional[Progress] = None) -> GenerationResult:
        """Validate, take the board (StudioBusyError when a job runs), generate, release."""
        request = request.checked()
        with self.board.hold(GENERATION, request.label()) as job:
            def report(fraction, text):
                job.detail = text
                if progress is not None:
                    progress(fraction, text)
            return generate(request, self.models, report)

    def start_training(self, checkpoints, options: dict) -> TrainingRun:
        """Validate and start a training run in its worker thread (StudioBusyError when a job runs).
        The generation models are dropped first: training loads its own copies."""
        with self._lock:
            run = TrainingRun(checkpoints, options, self.board)
            run.start(on_start=self.models.clear)
            self.training = run
            return run

    def stop_training(self) -> str:
        run = self.training
        if run is None:
            return "No training is running: nothing to stop."
        return run.stop()

    def training_snapshot(self) -> TrainSnapshot:
        run = self.training
        return run.snapshot() if run is not None else TrainSnapshot()
