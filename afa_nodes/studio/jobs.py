"""The studio's one-job rule and its queue: one generation or training job runs per process.

Generations and training share the models' memory (and, on a GPU, the device), and
ComfyUI's memory manager is process-wide, so two jobs at once would slow each other
down or run out of memory. `JobBoard.wait_turn` queues a job behind the running one (first
come, first served) and `waiting()` lists what waits, for the status bar. A training job
holds the board in its worker thread for as long as it runs, so a job asked for meanwhile is
refused with a message saying what runs and how to free the studio (a training takes long).

Cancel: `cancel()` flags the running job; a generation checks the flag at every sampler step
(the studio's progress hook raises JobCancelled), a training stops before its next step and
saves a resumable file. A waiting job can be cancelled too (`cancel(job)`): it leaves the queue.

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


class JobCancelled(AFAError):
    """The job was cancelled from the page (or the API) before it finished."""


@dataclass(eq=False)
class Job:
    """A job, waiting or running. `detail` is live progress text, set by the job itself."""
    kind: str
    label: str
    started: float = field(default_factory=time.monotonic)
    detail: str = ""
    state: str = "waiting"     # waiting | running
    cancel_event: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check(self) -> None:
        """JobCancelled when the job was cancelled (called at every step)."""
        if self.cancelled:
            at = f" at {self.detail}" if self.detail and self.state == "running" else " while waiting"
            raise JobCancelled(f"{self.kind} ({self.label}) was cancelled{at}.")

    def describe(self) -> str:
        elapsed = format_duration(time.monotonic() - self.started)
        return f"{self.kind} ({self.label}) running for {elapsed}" + (f": {self.detail}" if self.detail else "")


class JobBoard:
    """Who runs now and who waits. `begin` takes a free board at once; `wait_turn` queues."""

    def __init__(self):
        self._cond = threading.Condition()
        self._job: Optional[Job] = None
        self._waiting: list = []

    @property
    def current(self) -> Optional[Job]:
        return self._job

    def waiting(self) -> list:
        with self._cond:
            return list(self._waiting)

    def begin(self, kind: str, label: str) -> Job:
        """Take the board now; StudioBusyError when a job runs or waits."""
        with self._cond:
            if self._job is not None or self._waiting:
                raise StudioBusyError(busy_message(self._job or self._waiting[0], kind))
            return self._run(Job(kind, label))

    def wait_turn(self, kind: str, label: str, on_wait=None) -> Job:
        """Queue behind the running and the waiting jobs and take the board in turn. Refused
        (StudioBusyError) while a training runs; JobCancelled when cancelled while waiting.
        `on_wait(position)` is told the place in the queue (1 = next) when it changes."""
        job = Job(kind, label)
        with self._cond:
            self._waiting.append(job)
            try:
                told = None
                while not (self._job is None and self._waiting[0] is job):
                    if self._job is not None and self._job.kind == TRAINING:
                        raise StudioBusyError(busy_message(self._job, kind))
                    job.check()
                    position = self._waiting.index(job) + 1
                    if on_wait is not None and position != told:
                        told = position
                        on_wait(position)
                    self._cond.wait(0.2)
                job.check()
                return self._run(job)
            finally:
                if job in self._waiting:
                    self._waiting.remove(job)
                self._cond.notify_all()

    def _run(self, job: Job) -> Job:
        job.state, job.started, self._job = "running", time.monotonic(), job
        return job

    def end(self, job: Job) -> None:
        with self._cond:
            if self._job is job:
                self._job = None
            self._cond.notify_all()

    @contextmanager
    def hold(self, kind: str, label: str, on_wait=None) -> Iterator[Job]:
        job = self.wait_turn(kind, label, on_wait)
        try:
            yield job
        finally:
            self.end(job)

    def cancel(self, job: Optional[Job] = None) -> Optional[Job]:
        """Flag `job` (default: the running one) as cancelled; returns it (None: nothing to cancel)."""
        with self._cond:
            job = job or self._job
            if job is not None and (job is self._job or job in self._waiting):
                job.cancel_event.set()
                self._cond.notify_all()
                return job
            return None

    def status_line(self, waiting: int = 0) -> str:
        """One line for the status bar: what runs and what waits behind it (`waiting`: requests
        still in the web server's queue, not yet here)."""
        job, queue = self._job, self.waiting()
        parts = [f"{i}. {j.kind} ({j.label})" for i, j in enumerate(queue, 1)]
        text = f" · waiting: {'; '.join(parts)}" if parts else ""
        text += f" · {waiting} more request(s) queued" if waiting else ""
        if job is None:
            return "Idle: ready for a generation or a training job." + text
        stopping = " (cancelling)" if job.cancelled else ""
        return f"Busy: {job.describe()}{stopping}{text}"


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

