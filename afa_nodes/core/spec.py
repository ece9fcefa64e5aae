"""The ensemble's vocabulary, owned by the core: modes, what an ensemble is made of
(`EnsembleSpec`) and what the engine is told per call (`StepContext`).

Every front end (nodes, CLI, studio) and the aggregator file's metadata speak these types.
User text becomes a `Mode` only through `parse_mode`; the single-model index is 0-based
everywhere inside the pack (front ends show index + 1 and convert at their edge).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Callable, Optional, Sequence

from .errors import AFAError

MIN_MODELS, MAX_MODELS = 2, 6
PRECISIONS = ("auto", "fp32", "fp16", "bf16")   # the aggregator's compute dtype; auto = the experts'
WEIGHT_GROUPS = ("input", "middle", "output")
# text encoder types of DiTs shared as split files, as ComfyUI's Load CLIP / DualCLIPLoader /
# TripleCLIPLoader name them ("auto": the experts' family's); the CLI and the studio offer these
CLIP_TYPES = ("auto", "flux", "sd3", "chroma", "qwen_image", "stable_diffusion", "sdxl")


class Mode(str, Enum):
    """How the N experts are combined."""
    AGGREGATOR = "aggregator"                 # the trained SABW aggregator, per position
    BLOCK_AVERAGE = "block-wise average"      # every block's outputs averaged (untrained SABW)
    NOISE_AVERAGE = "noise average"           # each model runs alone, predictions averaged
    FIXED_WEIGHTS = "fixed weights"           # user weights per model (per block group)
    SINGLE_MODEL = "single model"             # one expert runs (for comparison)

    def __str__(self) -> str:
        return self.value

    @property
    def needs_aggregator(self) -> bool:
        return self is Mode.AGGREGATOR

    @property
    def mixes(self) -> bool:
        """Whether the mode produces weight maps (something to record)."""
        return self is not Mode.SINGLE_MODEL


class FullRes(str, Enum):
    """How the aggregator runs at the points at the latent's full resolution, where it costs most
    (self-attention over every position). Every option uses the same trained weights."""
    EXACT = "exact"                      # the paper's aggregator
    POOLED = "pooled attention"          # self-attention over 2x2-averaged keys and values
    HALF = "half resolution"             # the block on 2x2-averaged features, maps upsampled

    def __str__(self) -> str:
        return self.value


FULL_RES_NAMES = [f.value for f in FullRes]
FULL_RES_HELP = ("How the aggregator runs at the full-resolution points, where it costs most. exact: the "
                 "paper's method. pooled attention: its self-attention reads 2x2-averaged keys and values. "
                 "half resolution: it runs on 2x2-averaged features, maps upsampled. Same aggregator file; "
                 "speed and quality measured in BENCHMARKS.md.")


def parse_full_res(text) -> FullRes:
    """'pooled attention' / 'pooled_attention' / 'POOLED' / FullRes -> FullRes; else an AFAError."""
    if isinstance(text, FullRes):
        return text
    key = str(text or "").strip().lower().replace("_", " ").replace("-", " ")
    for option in FullRes:
        if key in (option.value, option.name.lower()):
            return option
    raise AFAError(f"unknown full-resolution option '{text}'; choose one of: {', '.join(FULL_RES_NAMES)}.")


MODE_NAMES = [m.value for m in Mode]
MODE_HELP = ("aggregator: the trained SABW aggregator mixes the models per pixel (needs an aggregator file). "
             "block-wise average: every block's outputs averaged (no training needed). "
             "noise average: each model runs alone, predictions averaged. "
             "fixed weights: your weights per model (see 'weights'). single model: only 'model index' runs.")
WEIGHTS_HELP = ("For 'fixed weights': one weight per model, e.g. '0.6, 0.4', or per block group: "
                "'input: 1,0; middle: .5,.5; output: 0,1'. Normalised to sum 1.")


def parse_mode(text) -> Mode:
    """'block-wise average' / 'block_average' / Mode -> Mode; anything else is an AFAError."""
    if isinstance(text, Mode):
        return text
    key = str(text or "").strip().lower().replace("_", " ").replace("-", " ")
    for mode in Mode:
        if key in (mode.value.replace("-", " "), mode.name.lower().replace("_", " ")):
            return mode
    raise AFAError(f"unknown ensemble mode '{text}'; choose one of: {', '.join(MODE_NAMES)}.")


def parse_weights(text: str, n: int) -> dict:
    """'0.6, 0.4' (all blocks) or 'input: 1,0; middle: .5,.5; output: 0,1' -> {group: [w_1..w_n]}."""
    groups = {}
    text = (text or "").strip() or ",".join(["1"] * n)
    for part in text.split(";"):
        name, _, values = part.rpartition(":")
        name = name.strip().lower() or "all"
        try:
            w = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise AFAError(f"cannot read weights '{part.strip()}': write numbers separated by commas, "
                           "e.g. '0.6, 0.4' or 'input: 1,0; middle: .5,.5; output: 0,1'.") from None
        if len(w) != n:
            raise AFAError(f"weights '{part.strip()}' give {len(w)} numbers for {n} models.")
        if name != "all" and name not in WEIGHT_GROUPS:
            raise AFAError(f"unknown block group '{name}' in weights: use input, middle or output.")
        if any(v < 0 for v in w) or sum(w) <= 0:
            raise AFAError(f"model weights must be >= 0 with a positive sum, got {w}.")
        for g in (WEIGHT_GROUPS if name == "all" else (name,)):
            groups[g] = w
    missing = set(WEIGHT_GROUPS) - set(groups)
    if missing:
        raise AFAError(f"weights give no values for {sorted(missing)}; give all three groups or one list.")
    return groups


def check_model_count(n: int, what: str = "an AFA ensemble") -> None:
    if not MIN_MODELS <= n <= MAX_MODELS:
        raise AFAError(f"{what} needs {MIN_MODELS} to {MAX_MODELS} models, got {n}. "
                       "Connect at least two checkpoints (at most six).")


@dataclass(frozen=True)
class EnsembleSpec:
    """What an ensemble is: its models (checkpoint names or paths, in order; a front end that
    starts from loaded MODELs leaves them empty and passes names instead), how they are combined,
    and the run-time options. `checked(n)` returns a validated copy or raises AFAError."""
    checkpoints: tuple = ()
    mode: Mode = Mode.BLOCK_AVERAGE
    aggregator: Optional[str] = None      # file (name in models/afa, or a path); mode AGGREGATOR only
    weights: str = ""                     # mode FIXED_WEIGHTS: see parse_weights
    single_index: int = 0                 # mode SINGLE_MODEL: which expert runs, 0-based
    map_refresh: int = 1                  # mode AGGREGATOR: recompute the maps every k steps
    precision: str = "auto"               # the aggregator's compute dtype (PRECISIONS)
    full_res: FullRes = FullRes.EXACT     # mode AGGREGATOR: the aggregator at full-resolution points

    @classmethod
    def from_ui(cls, checkpoints=(), mode=Mode.BLOCK_AVERAGE, aggregator=None, weights="", model_index=1,
                map_refresh=1, precision="auto", full_res=FullRes.EXACT) -> "EnsembleSpec":
        """From a front end's fields: `model_index` is 1-based there; 'none'/'' means no aggregator."""
        agg = None if aggregator in (None, "", "none") else str(aggregator)
        return cls(tuple(str(c) for c in checkpoints), parse_mode(mode), agg, weights or "",
                   int(model_index) - 1, int(map_refresh), precision or "auto", parse_full_res(full_res))

    @property
    def model_index(self) -> int:
        """The 1-based index front ends show."""
        return self.single_index + 1

    def checked(self, num_models: Optional[int] = None) -> "EnsembleSpec":
        n = len(self.checkpoints) if num_models is None else num_models
        check_model_count(n)
        mode = parse_mode(self.mode)
        if mode is Mode.SINGLE_MODEL and not 0 <= self.single_index < n:
            raise AFAError(f"model index {self.single_index + 1} is out of range: the ensemble has models 1 to {n}.")
        if mode is Mode.FIXED_WEIGHTS:
            parse_weights(self.weights, n)
        if mode.needs_aggregator and not self.aggregator:
            raise AFAError("mode 'aggregator' needs an aggregator file: pick one from models/afa, "
                           "or a training-free mode such as 'block-wise average'.")
        if int(self.map_refresh) < 1:
            raise AFAError(f"map refresh must be at least 1 (1 = every step), got {self.map_refresh}.")
        if self.precision not in PRECISIONS:
            raise AFAError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'.")
        return replace(self, mode=mode, map_refresh=int(self.map_refresh), full_res=parse_full_res(self.full_res))

    def to_dict(self) -> dict:
        """JSON-ready (PNG settings, aggregator metadata); the inverse is `from_dict`."""
        d = asdict(self)
        d["mode"], d["checkpoints"] = self.mode.value if isinstance(self.mode, Mode) else str(self.mode), \
            list(self.checkpoints)
        d["full_res"] = str(self.full_res)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EnsembleSpec":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["checkpoints"] = tuple(known.get("checkpoints", ()))
        known["mode"] = parse_mode(known.get("mode", Mode.BLOCK_AVERAGE))
        known["full_res"] = parse_full_res(known.get("full_res", FullRes.EXACT))
        return cls(**known)


@dataclass
class StepContext:
    """What the engine is told per model call, host-neutral. Built by the host adapter (the
    ComfyUI layer reads transformer_options); the core never sees the host's own structures.

    rows: which chunk of the batch is which branch: rows[k] (0 cond, 1 uncond) owns batch rows
    [k*B, (k+1)*B); sigma: this call's noise level (largest in the batch); schedule: the
    sampler's sigmas for the whole run, when known; recorder(point, weights, ctx) sees every
    weight map of the call."""
    sigma: Optional[float] = None
    rows: tuple = (0,)
    schedule: Optional[Sequence[float]] = None
    recorder: Optional[Callable] = None
    key: object = field(default=None, compare=False)   # identity of the call (for per-call caches)

    @property
    def step_key(self):
        """(sigma, rows): what map refresh needs to tell steps and branches apart; None without sigma."""
        return None if self.sigma is None else (self.sigma, tuple(self.rows))
