"""What a training run is given, host-free: the hyper-parameters (`TrainConfig`, the learning
rate schedule `lr_at`), the experts' noise schedule (`NoiseSchedule`) and the data-parallel
ranks (`Comm`: sums over ranks through torch.distributed when it is initialised)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import TrainingError


@dataclass
class NoiseSchedule:
    """The models' discrete schedule: `sigmas[t]` for t in 0..T-1 (x_t = x_0 + sigma*eps).
    `timestep(sigma)` gives what the UNet is fed (default: t itself); `calculate_input(sigma,
    x_t)` the UNet input (default EPS scaling x_t / sqrt(sigma^2 + 1))."""
    sigmas: torch.Tensor
    timestep: Optional[Callable] = None
    calculate_input: Optional[Callable] = None

    @classmethod
    def scaled_linear(cls, steps=1000, beta_start=0.00085, beta_end=0.012):
        """SD1.x/SDXL's schedule."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        return cls(((1 - alphas_cumprod) / alphas_cumprod).sqrt().float())

    def __len__(self):
        return len(self.sigmas)

    def model_input(self, sigma, x_t):
        if self.calculate_input is not None:
            return self.calculate_input(sigma, x_t)
        return x_t / (sigma.view(-1, *[1] * (x_t.ndim - 1)) ** 2 + 1.0) ** 0.5

    def model_timestep(self, t, sigma):
        return t.float() if self.timestep is None else self.timestep(sigma)


@dataclass
class TrainConfig:
    steps: int = 1000               # total optimizer steps (a resume continues up to this)
    batch_size: int = 8             # samples per micro-batch (all ranks together)
    grad_accum: int = 1             # micro-batches per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_grad_norm: float = 1.0      # 0 = no clipping
    caption_dropout: float = 0.1
    seed: int = 0
    save_every: int = 500           # 0 = only at the end (and on cancel)
    val_every: int = 0              # 0 = at every save
    mixed_precision: str = "auto"   # auto (bf16/fp16 autocast on CUDA, off elsewhere) | no | fp16 | bf16
    gradient_checkpointing: Optional[bool] = None   # None = on for CUDA, off on CPU
    hidden: int = 128               # SABW size (ignored on resume: the file's config wins)
    heads: int = 8
    depth: int = 2

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise TrainingError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}.")
        if self.lr <= 0:
            raise TrainingError(f"learning rate must be positive, got {self.lr}.")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise TrainingError(f"mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}.")

    @property
    def global_batch(self):
        return self.batch_size * self.grad_accum


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
