"""The studio's one-job rule: at most one generation or training job per process.

Generations and training share the models' memory (and, on a GPU, the device), and
ComfyUI's memory manager is process-wide, so two jobs at once would slow each other
down or run out of memory. Gradio's queue runs the job requests (generate, start training) one at a time
(concurrency_limit=1); the `JobBoard` guards across kinds: a training job holds the
board in its worker thread for as long as it runs, so a generation requested meanwhile
is refused with a message saying what runs and how to free the studio.

No gradio or ComfyUI here: the UI only reads `JobBoard.status_line()`.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

from ..core.errors import AFAError

GENERATION, TRAINING = "generation", "training"


class StudioBusyError(AFAError):
    """Another job holds the studio; the message names it and what to do."""


@dataclass(eq=False)
class Job:
    """The running job. `detail` is live progress text, set by the job itself."""
    kind: str
    label: str
    started: float = field(default_factory=time.monotonic)
    detail: str = ""

    def describe(self) -> str:
        elapsed = format_duration(time.monotonic() - self.started)
        return f"{self.kind} ({self.label}) running for {elapsed}" + (f": {self.detail}" if self.detail else "")


class JobBoard:
    """Who runs now. `begin` raises StudioBusyError when the board is taken."""

    def __init__(self):
        self._lock = threading.Lock()
        self._job: Optional[Job] = None

    @property
    def current(self) -> Optional[Job]:
        return self._job

    def begin(self, kind: str, label: str) -> Job:
        with self._lock:
            if self._job is not None:
                raise StudioBusyError(busy_message(self._job, kind))
            self._job = Job(kind, label)
            return self._job

    def end(self, job: Job) -> None:
        with self._lock:
            if self._job is job:
                self._job = None

    @contextmanager
    def hold(self, kind: str, label: str) -> Iterator[Job]:
        job = self.begin(kind, label)
        try:
            yield job
        finally:
            self.end(job)

    def status_line(self, waiting: int = 0) -> str:
        """One line for the status bar: what runs and how many requests wait behind it."""
        job = self._job
        queue = f" · {waiting} request(s) waiting" if waiting else ""
        if job is None:
            return "Idle: ready for a generation or a training job." + queue
        return f"Busy: {job.describe()}{queue}"


def busy_message(job: Job, wanted: str) -> str:
    if job.kind == TRAINING:
        hint = "Wait for it to finish, or press Stop in the Train tab (it leaves a resumable file)."
    else:
        hint = "Try again when it has finished."
    return (f"AFA Studio is busy: {job.describe()}. It runs one job at a time per process, so this "
            f"{wanted} was not started. {hint}")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"

