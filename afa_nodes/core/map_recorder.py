"""Recording AFA's weight maps while sampling (host-free: torch only, no ComfyUI).

A `MapRecorder` is the `recorder(point_index, weights, ctx)` an AFA MODEL calls at every
aggregation point (the executor calls it only when one is set, so recording off costs
nothing). It keeps one `MapRun` per sampling run: the host calls `begin_run` when sampling
starts and `end_run(output)` when it ends, and the run keeps a copy of the output latent
so a viewer can prove that maps and latent belong together (`find_run`).

Points and steps to record are chosen by `map_selection`, before sampling. Memory: maps
are area-pooled to `max_side`, stored fp16 on the CPU, at most `cap_mb` MB over the runs
one recorder keeps (older finished runs are dropped first; then the current run stops
recording, with one warning in the log).

Rows of one model call are grouped per conditioning entry: `ctx.rows[k]` (0 cond,
1 uncond) owns rows [k*B, (k+1)*B). The step index comes from `ctx.sigma` looked up in the
sampler's schedule (`ctx.schedule`, else the sigmas given to `begin_run`), else from
counting distinct sigmas. Several evaluations of one step (e.g. Heun's corrector, conds
split over calls) keep the first map recorded for that step. (`ctx` is a core.spec.StepContext
that the host builds once per model call.)
"""
from __future__ import annotations

import base64
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from afa_nodes import logger
from afa_nodes.core.errors import AFAError
from afa_nodes.core.map_render import _LUT, PALETTE
from afa_nodes.core.recorded_maps import RecordedMaps
from afa_nodes.core.map_selection import StepSelection, parse_points
from afa_nodes.core.spec import Mode, StepContext, parse_mode

BRANCHES = {0: "cond", 1: "uncond"}
MAX_RUNS = 8            # runs one recorder keeps (older ones are dropped first)
_SIGMA_RTOL = 1e-4


# ---------------------------------------------------------------- runs
@dataclass(eq=False)
class MapRun:
    """One sampling run: its maps, the latent it produced, and what happened."""
    run_id: str
    maps: RecordedMaps
    latent_shape: tuple
    total_steps: int | None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    status: str = "recording"          # recording | finished | interrupted
    output: torch.Tensor | None = None  # the sampler's output latent (CPU float32)
    nbytes: int = 0
    stopped: bool = False               # memory cap reached
    notes: list = field(default_factory=list)
    # step detection without a schedule: count distinct sigmas
    _last_sigma: float | None = None
    _count: int = -1

    @property
    def batch(self) -> int:
        return int(self.latent_shape[0]) if self.latent_shape else 0

    def summary(self) -> str:
        m = self.maps
        return (f"run {self.run_id}: {len(m.point_names)} point(s) x {len(m.steps)} step(s), "
                f"branches {', '.join(m.branches) or 'none'}, batch {self.batch}, {self.nbytes / 2**20:.1f} MB")


_REGISTRY: weakref.WeakValueDictionary[str, MapRun] = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()


def get_run(run_id: str) -> MapRun | None:
    """A run that is still held by its recorder (the viewer's endpoint looks runs up here)."""
    with _REGISTRY_LOCK:
        return _REGISTRY.get(run_id)


def latent_matches(output: torch.Tensor | None, latent: torch.Tensor) -> bool:
    """True when `latent` is the run's output (bit-equal, or equal up to a dtype round trip)."""
    if output is None or latent is None or tuple(output.shape) != tuple(latent.shape):
        return False
    other = latent.detach().to("cpu", torch.float32)
    return torch.equal(output, other) or torch.allclose(output, other, rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------- recorder
class MapRecorder:
    """recorder(point_index, weights [rows, N, H, W], ctx: StepContext) for one AFA MODEL."""

    def __init__(self, model_names: list[str], point_names: list[str], points: str = "all",
                 steps: str = "all", max_side: int = 64, cap_mb: float = 256, enabled: bool = True,
                 mode: Mode | str | None = None):
        self.model_names, self.all_points = list(model_names), list(point_names)
        self.points = parse_points(points, self.all_points)
        self._wanted = frozenset(self.points)
        self.steps = StepSelection.parse(steps)
        if max_side < 1 or cap_mb <= 0:
            raise AFAError(f"max_side ({max_side}) and cap_mb ({cap_mb}) must be positive.")
        self.max_side, self.cap_bytes = int(max_side), int(cap_mb * 2**20)
        self.enabled, self.mode = enabled, parse_mode(mode) if mode else None
        self.created = time.time()
        self.runs: list[MapRun] = []
        self.current: MapRun | None = None
        self._ctx, self._step, self._schedule_key, self._schedule = None, None, None, None

    @classmethod
    def disabled(cls, model_names, point_names, mode=None):
        return cls(model_names, point_names, enabled=False, mode=mode)

    # -- run lifecycle (called by the host around each sampling run)
    def begin_run(self, latent_shape, sigmas=None) -> MapRun:
        if self.current is not None:
            self._close(self.current, "interrupted")
        schedule = _floats(sigmas)
        total = len(schedule) - 1 if schedule else None
        run = MapRun(uuid.uuid4().hex[:12], RecordedMaps(model_names=self.model_names),
                     tuple(int(s) for s in latent_shape), total)
        if total is not None:
            missing = self.steps.missing(total)
            if missing:
                run.notes.append(f"steps {missing} do not exist: this run has {total} steps (0-{total - 1})")
                logger.warning("AFA maps: %s", run.notes[-1])
        self.runs.append(run)
        while len(self.runs) > MAX_RUNS:
            self.runs.pop(0)
        with _REGISTRY_LOCK:
            _REGISTRY[run.run_id] = run
        self.current, self._ctx, self._schedule = run, None, (schedule or None)
        self._schedule_key = None
        return run

    def end_run(self, output: torch.Tensor | None = None) -> MapRun | None:
        run = self.current
        if run is None:
            return None
        if output is not None and not getattr(output, "is_nested", False):
            run.output = output.detach().to("cpu", torch.float32).clone()
        if self.steps.kind == "last" and run.total_steps is None:
            _keep_steps(run, sorted(run.maps.steps)[-self.steps.k:])
        self._close(run, "finished")
        logger.info("AFA maps: recorded %s", run.summary())
        return run

    def abort_run(self, reason: str = "interrupted") -> None:
        if self.current is not None:
            self.current.notes.append(f"sampling stopped: {reason}")
            self._close(self.current, "interrupted")

    def _close(self, run, status):
        run.status, run.finished = status, time.time()
        self.current, self._ctx = None, None

    # -- the hot path
    def __call__(self, point: int, weights: torch.Tensor, ctx: StepContext) -> None:
        run = self.current
        if run is None or run.stopped or point not in self._wanted:
            return
        if ctx is not self._ctx:  # once per model call
            self._ctx, self._step = ctx, self._step_of(run, ctx)
        if self._step is None:
            return
        step, sigma = self._step
        name = self.all_points[point]
        cou = list(ctx.rows or [0])
        rows = weights.shape[0]
        if rows % len(cou):
            cou = [0]
        b = rows // len(cou)
        for code in sorted(set(cou)):
            branch = BRANCHES.get(code, f"cond {code}")
            if (step, name, branch) in run.maps.maps:
                continue  # first evaluation of a step wins
            idx = [k for k, c in enumerate(cou) if c == code]
            a = weights[idx[0] * b:(idx[0] + 1) * b]
            if len(idx) > 1:  # several conds of one branch in one call: their mean
                a = torch.stack([weights[k * b:(k + 1) * b] for k in idx]).float().mean(0)
            size = _pooled_bytes(a.shape, self.max_side)
            if not self._make_room(run, size):
                return
            run.maps.add(step, name, branch, a, sigma=sigma, max_side=self.max_side)
            run.nbytes += size

    def _step_of(self, run: MapRun, ctx: StepContext):
        """(step, sigma) of this call, or None when the step is not recorded."""
        if ctx.sigma is None:
            return None
        sigma = ctx.sigma
        sample_sigmas = ctx.schedule
        if sample_sigmas is not None and sample_sigmas is not self._schedule_key:
            self._schedule_key, self._schedule = sample_sigmas, _floats(sample_sigmas) or self._schedule
        schedule = self._schedule
        if schedule:
            total = len(schedule) - 1
            run.total_steps = run.total_steps or total
            step = schedule_step(sigma, schedule)
        else:
            total = None
            if run._last_sigma is None or not _close(sigma, run._last_sigma):
                run._count += 1
                run._last_sigma = sigma
            step = run._count
        return (step, sigma) if self.steps.wants(step, total) else None

    def _make_room(self, run: MapRun, size: int) -> bool:
        while sum(r.nbytes for r in self.runs) + size > self.cap_bytes:
            old = next((r for r in self.runs if r is not run), None)
            if old is None:
                run.stopped = True
                msg = (f"memory cap of {self.cap_bytes / 2**20:g} MB reached at step {self._step[0]}: "
                       f"later maps of run {run.run_id} were not recorded. Raise cap_mb, record fewer "
                       f"points or steps, or lower max_side (now {self.max_side}).")
                run.notes.append(msg)
                logger.warning("AFA maps: %s", msg)
                return False
            self.runs.remove(old)
        return True

    # -- lookup (the preview)
    def find_run(self, latent: torch.Tensor) -> MapRun:
        """The finished run whose output is `latent`; AFAError saying what is wrong otherwise."""
        if not self.enabled:
            raise AFAError("recording was off for this run: turn 'enabled' on in AFA Record Attention "
                           "and queue the workflow again.")
        for run in reversed(self.runs):
            if run.status == "finished" and latent_matches(run.output, latent):
                if not run.maps.maps:
                    raise AFAError(f"the run that produced this latent recorded no maps. {self._why_empty(run)}")
                return run
        if not self.runs:
            raise AFAError("no sampling run has used the recording MODEL since AFA Record Attention ran: "
                           "connect its MODEL output to the sampler that produces this LATENT.")
        shape = tuple(latent.shape) if latent is not None else None
        seen = "; ".join(f"{r.run_id} {r.status}, latent {list(r.latent_shape)}" for r in self.runs)
        raise AFAError(f"this LATENT {list(shape) if shape else ''} is not the output of a sampling run "
                       f"recorded by this AFA Record Attention node (runs kept: {seen}). Connect the LATENT "
                       "output of the sampler that uses the recording MODEL, unchanged, to the preview.")

    def _why_empty(self, run: MapRun) -> str:
        if self.mode is Mode.SINGLE_MODEL:
            return f"The ensemble runs in mode '{self.mode}', which mixes nothing: there are no maps."
        if self.mode is Mode.NOISE_AVERAGE and "final" not in [self.all_points[p] for p in self.points]:
            return f"Mode '{self.mode}' mixes only the 'final' point: record 'final' (or 'all')."
        if run.notes:
            return " ".join(run.notes)
        return f"Steps '{self.steps.text}' matched none of the run's {run.total_steps or '?'} steps."


# ---------------------------------------------------------------- helpers
def schedule_step(sigma: float, schedule: list[float]) -> int:
    """Index of `sigma` in a descending schedule; a sigma between two entries (a sampler's
    intermediate evaluation) belongs to the step it starts from."""
    last = len(schedule) - 2
    for i, s in enumerate(schedule[:-1]):
        if _close(sigma, s):
            return i
    for i in range(last, -1, -1):
        if schedule[i] >= sigma:
            return i
    return 0


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _SIGMA_RTOL * max(1.0, abs(a), abs(b))


def _floats(sigmas) -> list[float]:
    if sigmas is None:
        return []
    if isinstance(sigmas, torch.Tensor):
        return [float(v) for v in sigmas.detach().flatten().cpu().tolist()]
    return [float(v) for v in sigmas]


def _pooled_bytes(shape, max_side: int) -> int:
    """fp16 bytes of a [B, N, H, W] map after RecordedMaps.add pools it to max_side."""
    b, n, h, w = (int(s) for s in shape)
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        h, w = max(1, round(h * s)), max(1, round(w * s))
    return b * n * h * w * 2


def _keep_steps(run: MapRun, keep: list[int]) -> None:
    m, keep = run.maps, set(keep)
    for key in [k for k in m.maps if k[0] not in keep]:
        run.nbytes -= m.maps.pop(key).numel() * 2
    sig = {s: m.sigma(s) for s in m.steps}
    m.steps = [s for s in m.steps if s in keep]
    if m.sigmas is not None:
        m.sigmas = [sig[s] for s in m.steps] if all(sig[s] is not None for s in m.steps) else None


# ---------------------------------------------------------------- viewer payloads (JSON)
def run_info(run: MapRun) -> dict:
    """What the web viewer needs to build its controls (no map data)."""
    m = run.maps
    sizes = {}
    for (s, p, b), a in m.maps.items():
        sizes.setdefault(p, list(a.shape[-2:]))
    return {"run_id": run.run_id, "status": run.status, "models": list(m.model_names),
            "points": list(m.point_names), "steps": list(m.steps), "sigmas": m.sigmas,
            "branches": m.branches, "batch": run.batch, "latent_shape": list(run.latent_shape),
            "sizes": sizes, "notes": list(run.notes), "palette": [list(c) for c in PALETTE],
            "colormap": _LUT[::16].tolist() + [_LUT[-1].tolist()]}


def map_payload(run: MapRun, step: int, point: str, branch: str = "cond", batch_index: int = 0) -> dict:
    """One map as uint8 (weight * 255), model-major [N, h, w], base64-encoded."""
    a = run.maps.weights(step, point, branch, batch_index)  # [N, h, w] float32
    q = (a.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return {"step": step, "point": point, "branch": branch, "batch_index": batch_index,
            "sigma": run.maps.sigma(step), "shape": list(q.shape),
            "mean": [float(v) for v in a.mean((1, 2)).tolist()],
            "data": base64.b64encode(np.ascontiguousarray(q).tobytes()).decode("ascii")}
