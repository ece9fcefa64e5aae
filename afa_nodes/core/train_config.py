"""What a training run is given, host-free: ONE configuration (`TrainConfig`) with per-field
metadata (`Opt`) from which every front end builds its inputs, the learning rate schedule
(`lr_at`), the experts' noise schedule (`NoiseSchedule`) and the data-parallel ranks (`Comm`).

A new training option is one new field of `TrainConfig` with its `Opt`: the node's input
(AFA Train Aggregator), the CLI flag (`python -m afa_nodes train`) and the studio's form are
generated from it, and `TrainConfig.check` validates it for all of them. Field order is the
node's widget order (saved workflows store widget values by position): append new fields,
and make a new node input `node_optional`.

Defaults: a field has ONE default, the library's and the CLI's (command lines store no
values, so they must keep meaning the same). Where the interactive front ends (node and
studio) start from another value for a stated reason, `Opt.ui_default` says so; today
batch_size (1: fits consumer GPUs next to the UI), save_every (250: more resume points)
and gradient_checkpointing (on; the node's input is a plain on/off switch, the CLI keeps
"auto" = on with a GPU). A saved workflow stores every widget value, so it is unaffected.
"""
from __future__ import annotations

import math
import os
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, Callable, Optional

import torch

from .dataset import CROPS
from .errors import TrainingError
from .spec import Mode

NODE, STUDIO, CLI = "node", "studio", "cli"          # the front ends
ALL, TOOLS = frozenset({NODE, STUDIO, CLI}), frozenset({STUDIO, CLI})
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
RUN_NEEDS = ("dataset", "out")                       # what a training run must be given
_UNSET = object()


class ConfigError(TrainingError):
    """A training option with a bad value; `.field` is the TrainConfig field (None: unknown names)."""

    def __init__(self, f: Optional[Field], problem: str):
        self.field = f.name if f is not None else None
        super().__init__(f"training option {describe(f)} {problem}" if f is not None else problem)


def describe(f: Field) -> str:
    """'lr' (node/studio input 'learning_rate', CLI --lr): the field as each front end names it."""
    o: Opt = f.metadata["afa"]
    names = []
    if o.fronts & {NODE, STUDIO}:
        names.append(f"{'/'.join(sorted(o.fronts & {NODE, STUDIO}))} input '{o.name_in(f, STUDIO)}'")
    if CLI in o.fronts:
        names.append(f"CLI {o.name_in(f, CLI)}")
    return f"'{f.name}'" + (f" ({', '.join(names)})" if names else "")


@dataclass(frozen=True)
class Opt:
    """How one TrainConfig field is shown and checked.

    help: the tooltip, the CLI's --help and the studio's info text (`cli_help` where the CLI's
    value means something else, e.g. a path instead of a folder name); section: data, schedule,
    optimiser, memory, validation, output or aggregator; kind: int, float, bool, str or path
    (default: the type of the field's default); fronts: which front ends show it; ui_name /
    cli: the node's and studio's input name / the CLI flag (default: the field name /
    --field-name); min/max (inclusive), above/below (exclusive), multiple_of, choices: what
    every front end accepts; widget: a tighter (min, max) of the node's and the studio's
    widget; step: the widget's step; advanced: under "more options" in the studio;
    node_optional: an optional input of the node (inputs added after the node shipped);
    ui_default: the node's and studio's default where it differs (see the module docstring)."""
    help: str
    section: str
    kind: str = ""
    fronts: frozenset = ALL
    ui_name: Optional[str] = None
    cli: Optional[str] = None
    min: Optional[float] = None
    max: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None
    multiple_of: Optional[int] = None
    choices: Optional[tuple] = None
    widget: Optional[tuple] = None
    step: Optional[float] = None
    advanced: bool = False
    node_optional: bool = False
    ui_default: Any = _UNSET
    cli_help: Optional[str] = None
    metavar: Optional[str] = None

    def name_in(self, f: Field, front: str) -> str:
        if front == CLI:
            return self.cli or "--" + f.name.replace("_", "-")
        return self.ui_name or f.name

    def kind_of(self, f: Field) -> str:
        return self.kind or type(f.default).__name__

    def default_in(self, f: Field, front: str):
        return self.ui_default if front != CLI and self.ui_default is not _UNSET else f.default

    def limits(self, front: str) -> tuple:
        """(min, max) of `front`'s widget (None where open)."""
        if self.widget is not None and front != CLI:
            return self.widget
        return self.min, self.max

    def convert(self, f: Field, value):
        """A typed-in value (the studio's form: 7.0, "true", " name ") -> the field's type."""
        kind = self.kind_of(f)
        if value is None or self.choices:
            return value
        try:
            if kind == "int" and not isinstance(value, bool) and float(value) == int(float(value)):
                return int(float(value))
            if kind == "float" and not isinstance(value, bool):
                return float(value)
            if kind == "bool" and str(value).strip().lower() in ("true", "false", "1", "0"):
                return str(value).strip().lower() in ("true", "1")
            if kind == "path":
                return str(value).strip() or None
            if kind == "str":
                return str(value)
        except (TypeError, ValueError, OverflowError):
            pass
        return value  # `check` names what is wrong with it

    def check(self, f: Field, value) -> None:
        """The rules every front end shares; ConfigError naming the field and the fix."""
        kind = self.kind_of(f)
        if value is None:
            if f.default is None:
                return
            raise ConfigError(f, "needs a value.")
        what = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text",
                "path": "a path"}[kind]
        typed = {"int": isinstance(value, int) and not isinstance(value, bool),
                 "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                 "bool": isinstance(value, bool), "str": isinstance(value, str),
                 "path": isinstance(value, (str, os.PathLike))}[kind]
        if not typed:
            raise ConfigError(f, f"must be {what}, got {value!r}.")
        if self.choices and value not in self.choices:
            raise ConfigError(f, f"must be one of {', '.join(map(str, self.choices))}, got {value!r}.")
        if self.min is not None and value < self.min or self.max is not None and value > self.max:
            bounds = (f"between {self.min} and {self.max}" if self.min is not None and self.max is not None
                      else f"at least {self.min}" if self.min is not None else f"at most {self.max}")
            raise ConfigError(f, f"must be {bounds}, got {value}.")
        if self.above is not None and value <= self.above:
            raise ConfigError(f, f"must be above {self.above}, got {value}.")
        if self.below is not None and value >= self.below:
            raise ConfigError(f, f"must be below {self.below}, got {value}.")
        if self.multiple_of and value % self.multiple_of:
            raise ConfigError(f, f"must be a multiple of {self.multiple_of}, got {value}.")

    def check_widget(self, f: Field, value, front: str = STUDIO):
        """The node's/studio's widget range (tighter than `check` for some fields)."""
        lo, hi = self.limits(front)
        if value is not None and not isinstance(value, bool) and isinstance(value, (int, float)) \
                and (lo is not None and value < lo or hi is not None and value > hi):
            raise ConfigError(f, f"must be between {lo} and {hi}, got {value}.")
        return value


def opt(default, section: str, **metadata):
    """A TrainConfig field with its Opt."""
    return field(default=default, metadata={"afa": Opt(section=section, **metadata)})


@dataclass
class NoiseSchedule:
    """The models' discrete schedule: `sigmas[t]` for t in 0..T-1, and what they predict.
    prediction "eps" (SD1.x/SDXL, ComfyUI's EPS): x_t = x_0 + sigma*eps, target eps, UNet input
    x_t / sqrt(sigma^2 + 1). "flow" (SD3/FLUX, ComfyUI's CONST): x_t = (1 - sigma) x_0 + sigma*eps,
    input x_t, target the velocity eps - x_0 (ComfyUI's denoised = x_t - sigma*output).
    `timestep(sigma)` gives what the model is fed (default: t itself); `calculate_input(sigma,
    x_t)` the model input (default: the prediction's)."""
    sigmas: torch.Tensor
    timestep: Optional[Callable] = None
    calculate_input: Optional[Callable] = None
    prediction: str = "eps"

    @classmethod
    def scaled_linear(cls, steps=1000, beta_start=0.00085, beta_end=0.012):
        """SD1.x/SDXL's schedule."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        return cls(((1 - alphas_cumprod) / alphas_cumprod).sqrt().float())

    def __len__(self):
        return len(self.sigmas)

    @property
    def objective(self) -> str:
        return "flow-matching velocity MSE" if self.prediction == "flow" else "eps-MSE"

    def noised(self, x0, noise, sigma):
        s = sigma.view(-1, *[1] * (x0.ndim - 1))
        return (1.0 - s) * x0 + s * noise if self.prediction == "flow" else x0 + s * noise

    def target(self, x0, noise):
        return noise - x0 if self.prediction == "flow" else noise

    def model_input(self, sigma, x_t):
        if self.calculate_input is not None:
            return self.calculate_input(sigma, x_t)
        if self.prediction == "flow":
            return x_t
        return x_t / (sigma.view(-1, *[1] * (x_t.ndim - 1)) ** 2 + 1.0) ** 0.5

    def model_timestep(self, t, sigma):
        return t.float() if self.timestep is None else self.timestep(sigma)


@dataclass
class TrainConfig:
    """One training run. `dataset` and `out` hold what the front end was given (a path; the
    node and the studio give a folder name inside ComfyUI's input directory and a save name,
    which service.training resolves to paths)."""
    dataset: Optional[str] = opt(
        None, "data", kind="path", ui_name="dataset_folder", ui_default="afa_dataset", cli="--data", metavar="DIR",
        help="Folder inside ComfyUI's input directory with images and same-name .txt captions (or metadata.jsonl). "
             "Kohya 'N_name' subfolders repeat images.",
        cli_help="Folder of images with same-name .txt captions (or metadata.jsonl). Kohya 'N_name' subfolders "
                 "repeat images.")
    steps: int = opt(1000, "schedule", min=1, max=1_000_000,
                     help="Total optimizer steps (with resume: the target, counting the steps already done).")
    batch_size: int = opt(8, "optimiser", min=1, widget=(1, 64), ui_default=1,
                          help="Images per step (the paper uses 8; raise gradient accumulation if memory is short).",
                          cli_help="Images per micro-batch, all data-parallel ranks together (the paper uses 8).")
    lr: float = opt(1e-4, "optimiser", ui_name="learning_rate", cli="--lr", above=0.0, widget=(1e-7, 1e-1),
                    step=1e-5, help="AdamW learning rate (paper: 1e-4), with 100 warm-up steps.")
    resolution: int = opt(512, "data", min=8, widget=(64, 2048), step=64, multiple_of=8,
                          help="Training images are scaled and cropped (see 'crop') to this square size; with "
                               "'buckets', to the bucket of about this area nearest each image's aspect ratio.")
    seed: int = opt(0, "schedule", min=0, max=0xFFFFFFFF, advanced=True,
                    help="Seed of the initialisation, data order, noise and the train/validation split.")
    out: Optional[str] = opt(
        None, "output", kind="path", ui_name="save_name", ui_default="afa_aggregator", cli="--out", metavar="FILE",
        help="Written to models/afa/<save name>.safetensors (+ .train-state for resuming).",
        cli_help="Aggregator file to write (.safetensors), and <file>.train-state beside it for resuming.")
    save_every: int = opt(500, "output", min=0, max=1_000_000, ui_default=250,
                          help="Save (and validate) every K steps; 0 = only at the end.")
    resume: bool = opt(False, "output",
                       help="Continue the saved file (same models required). Off: start over and overwrite it.")
    gradient_checkpointing: Optional[bool] = opt(
        None, "memory", kind="bool", cli="--grad-checkpointing", ui_default=True, advanced=True,
        help="Recompute the frozen models' blocks during backprop: much less memory, ~30% slower. Turn off on CPU "
             "or with plenty of VRAM.",
        cli_help="Recompute the frozen models' blocks during backprop: much less memory, ~30% slower "
                 "(default: on with a GPU, off on CPU).")
    caption_dropout: float = opt(0.1, "optimiser", min=0.0, below=1.0, widget=(0.0, 0.9), step=0.05, advanced=True,
                                 help="Per image, the chance its caption is replaced by the empty one (keeps CFG "
                                      "working; paper: 0.1).")
    val_fraction: float = opt(0.1, "validation", ui_name="validation_fraction", min=0.0, below=1.0,
                              widget=(0.0, 0.5), step=0.05, advanced=True,
                              help="Share of images held out to compare the trained ensemble with averaging and "
                                   f"each {Mode.SINGLE_MODEL.value}.")
    grad_accum: int = opt(1, "optimiser", ui_name="gradient_accumulation", cli="--grad-accum", min=1,
                          widget=(1, 256), node_optional=True, advanced=True,
                          help="Micro-batches per step: effective batch = batch size x this.")
    crop: str = opt("center", "data", choices=CROPS, node_optional=True, advanced=True,
                    help="center: one centred crop per image. random: 'crop variants' seeded random crops per "
                         "training image, encoded once; every epoch each image uses one of them (the paper trains "
                         "with random crops). Validation always uses the centre crop.")
    crop_variants: int = opt(4, "data", min=1, widget=(1, 64), node_optional=True, advanced=True, metavar="K",
                             help="With random crop: crops cached per training image (each costs one VAE encode and "
                                  "its disk space once).")
    buckets: bool = opt(False, "data", node_optional=True, advanced=True,
                        help="Aspect-ratio buckets: each image keeps its shape, scaled to the bucket (sides multiples "
                             "of 64, about resolution x resolution pixels, aspect up to 2:1) nearest its aspect ratio; "
                             "every batch holds one bucket. Off: square crops.")
    # ---- below: not on the node (the studio's "more training options" and the CLI)
    weight_decay: float = opt(0.01, "optimiser", fronts=TOOLS, min=0.0, step=0.001, advanced=True,
                              help="AdamW weight decay of the aggregator's weights.")
    warmup_steps: int = opt(100, "schedule", fronts=TOOLS, cli="--warmup", min=0, advanced=True,
                            help="Linear learning-rate warm-up over the first K optimizer steps (0 = none).")
    max_grad_norm: float = opt(1.0, "optimiser", fronts=TOOLS, min=0.0, step=0.1, advanced=True,
                               help="Gradient clipping: the largest gradient norm of a step (0 = no clipping).")
    mixed_precision: str = opt("auto", "memory", fronts=TOOLS, choices=MIXED_PRECISION, advanced=True,
                               help="Autocast of the frozen models: auto (bf16, else fp16, on CUDA; off elsewhere), "
                                    "no, fp16 or bf16.")
    val_every: int = opt(0, "validation", fronts=TOOLS, min=0, advanced=True,
                         help="Validate every K steps (0 = at every save).")
    cache_dir: Optional[str] = opt(None, "data", kind="path", fronts=frozenset({CLI}), metavar="DIR",
                                   help="Encode cache folder (default: <dataset>/.afa_cache).")
    hidden: int = opt(128, "aggregator", fronts=TOOLS, ui_name="sabw_hidden", cli="--sabw-hidden", min=32,
                      multiple_of=32, advanced=True,
                      help="SABW width d (a multiple of 32 and of the heads; ignored on resume: the file's size wins).")
    heads: int = opt(8, "aggregator", fronts=TOOLS, ui_name="sabw_heads", cli="--sabw-heads", min=1, advanced=True,
                     help="SABW attention heads (ignored on resume).")
    depth: int = opt(2, "aggregator", fronts=TOOLS, ui_name="sabw_depth", cli="--sabw-depth", min=1, max=8,
                     advanced=True, help="SABW transformer blocks per aggregation point (ignored on resume).")
    sample_prompt: str = opt(
        "", "output", fronts=TOOLS, metavar="TEXT",
        help="At every save, one image of this prompt made with the aggregator so far (the run's seed and "
             "resolution), written beside the file as <name>.samples/step_NNNNNN.png. Empty: no sample images.")
    sample_steps: int = opt(20, "output", fronts=TOOLS, min=1, max=200, advanced=True,
                            help="Sampling steps of each sample image (euler, normal schedule).")
    sample_cfg: float = opt(7.0, "output", fronts=TOOLS, min=0.0, max=100.0, step=0.5, advanced=True,
                            help="CFG scale of the sample images (1 for guidance-distilled models such as FLUX dev).")

    def __post_init__(self):
        self.check()

    def check(self) -> "TrainConfig":
        """Every value typed and in range, and the fields agreeing; ConfigError naming the
        field (with its node input and CLI flag) and the fix otherwise."""
        for f in fields(self):
            f.metadata["afa"].check(f, getattr(self, f.name))
        if self.hidden % self.heads:
            raise ConfigError(spec("heads"), f"must divide the SABW width {self.hidden}, got {self.heads}.")
        return self

    def for_run(self, needs=RUN_NEEDS) -> "TrainConfig":
        """Checked for a run: the fields `needs` given (a training run needs a dataset and a file to write)."""
        for name in needs:
            if not getattr(self, name):
                raise ConfigError(spec(name), f"is not set: give the {'dataset folder' if name == 'dataset' else 'output file'}.")
        return self.check()

    def replace(self, **changes) -> "TrainConfig":
        return replace(self, **changes)

    @property
    def global_batch(self):
        return self.batch_size * self.grad_accum


def spec(name: str):
    """The dataclass field `name` of TrainConfig (with its Opt in metadata["afa"])."""
    return {f.name: f for f in fields(TrainConfig)}[name]


def options(front: Optional[str] = None) -> list:
    """TrainConfig's fields (in widget order) that `front` (NODE, STUDIO, CLI; None: all) shows."""
    return [f for f in fields(TrainConfig) if front is None or front in f.metadata["afa"].fronts]


def from_ui(values: dict, front: str = NODE) -> TrainConfig:
    """The node's or the studio's values by input name (missing ones take the front end's
    default) -> TrainConfig. Values are converted and checked against the widget ranges
    (the studio takes typed-in values); unknown names are refused."""
    shown = {f.metadata["afa"].name_in(f, front): f for f in options(front)}
    unknown = sorted(set(values) - set(shown))
    if unknown:
        raise ConfigError(None, f"unknown training option(s) {', '.join(unknown)}; the trainer takes "
                                f"{', '.join(shown)}.")
    config = {}
    for name, f in shown.items():
        o = f.metadata["afa"]
        value = values.get(name, o.default_in(f, front))
        config[f.name] = o.check_widget(f, o.convert(f, value), front)
    return TrainConfig(**config)


def to_ui(config: TrainConfig, front: str = NODE) -> dict:
    """The inverse of `from_ui`: values by the front end's input names."""
    return {f.metadata["afa"].name_in(f, front): getattr(config, f.name) for f in options(front)}


class Comm:
    """Collective ops of data-parallel training; a single process by default."""
    rank, world_size = 0, 1

    def all_reduce(self, tensor):
        """Sum over ranks, in place."""
        return tensor

    @staticmethod
    def current() -> "Comm":
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            return TorchComm()
        return Comm()


class TorchComm(Comm):
    def __init__(self):
        self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def all_reduce(self, tensor):
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant."""
    if config.warmup_steps <= 0:
        return config.lr
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


def amp_dtype(mode, device):
    if mode == "no" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mode]

