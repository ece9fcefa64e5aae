"""Win maps and held-out evaluation, host-free: which model denoises best where, before (or
after) any training. The paper's Figure 1 ("proportion of wins in Monte-Carlo sampled noises")
as a measurement anyone can run on their own checkpoints and images.

What is measured. For each image (a training-style sample: model latent, per-model text
contexts, optional per-model y), each noise seed and each step t of `step_indices`, the image
is noised the way training noises it (`NoiseSchedule.noised`, one noise per (image, seed),
shared by every step and every model) and each model predicts the target (eps, or the flow
velocity) alone. The prediction's squared error, averaged over channels, is pooled on a
`grid` x `grid` grid of regions (the latent's own size when smaller): one error per model per
region. In every (image, seed, step, region) the expert with the lowest error wins.

Cost: each expert runs once per (image, seed, step) (the seeds of one image are one batch), so
a win map costs exactly N forward passes per sample; the evaluation adds the ensemble (N
experts block by block, plus its mixer), 2N per sample.

The verdict (`ErrorTable.verdict`), over all (image, seed, step, region) comparisons (exact
ties share the win):
- "model X dominates everywhere": X wins at least DOMINANT_SHARE (80%) of the comparisons
  (with two equal models each wins about 50%): ensembling will not help much;
- "nearly the same errors": the winner changes, but a per-region, per-step oracle choice of
  the best expert would cut the error by less than MIN_GAIN (2%) against the best single
  expert: nothing to gain by mixing either;
- otherwise "models are complementary here", with that oracle gain (what choosing one
  model per region and step would save; a mixer may save more or less).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .ensemble import EnsembleExecutor, uniform_mixer
from .errors import AFAError
from .train import predict
from .train_config import NoiseSchedule
from .train_data import seed_of

GRID = 8               # regions per side (at most the latent's size)
DOMINANT_SHARE = 0.8   # a model winning this share of comparisons dominates
MIN_GAIN = 0.02        # an oracle per-region choice saving less than this: the models are alike
MAX_STEPS = 50


def step_indices(num_timesteps: int, steps: int) -> list:
    """`steps` timestep indices spread over the schedule like a sampler's, noisiest first:
    round((T - 1) * (steps - k) / steps) for k = 0..steps-1 (4 of 1000: 999, 749, 500, 250)."""
    if not 1 <= int(steps) <= min(MAX_STEPS, num_timesteps):
        raise AFAError(f"steps must be 1..{min(MAX_STEPS, num_timesteps)} (the schedule has {num_timesteps} "
                       f"noise levels), got {steps}.")
    steps = int(steps)
    return [round((num_timesteps - 1) * (steps - k) / steps) for k in range(steps)]


def region_errors(pred: torch.Tensor, target: torch.Tensor, grid: tuple) -> torch.Tensor:
    """(batch, C, H, W) prediction and target -> (batch, gh, gw) squared error per region."""
    err = (pred.float() - target.float()).square().mean(1, keepdim=True)  # (batch, 1, H, W)
    return F.adaptive_avg_pool2d(err, grid)[:, 0]


@dataclass
class ErrorTable:
    """Summed region errors of every predictor (the N experts, then optionally the ensemble) and
    the experts' wins, per step. Means divide by `samples` ((image, seed) pairs)."""
    names: list               # predictor names: N experts, then the ensemble when evaluated
    num_experts: int
    timesteps: list           # schedule indices, noisiest first
    sigmas: list
    objective: str
    error_sum: torch.Tensor   # (steps, predictors, gh, gw) float64
    wins: torch.Tensor        # (steps, experts, gh, gw) float64: lowest error among the experts
    best_sum: torch.Tensor    # (steps, gh, gw) float64: the lowest expert error, summed
    samples: int = 0
    images: int = 0
    seeds: int = 0
    stopped: bool = False     # cancelled: the sums hold the samples done so far

    @property
    def grid(self) -> tuple:
        return tuple(self.error_sum.shape[-2:])

    def step_errors(self) -> torch.Tensor:
        """(steps, predictors) mean error per step."""
        return self.error_sum.mean((-2, -1)) / max(self.samples, 1)

    def mean_errors(self) -> list:
        """Mean error of each predictor over steps, regions and samples."""
        return self.step_errors().mean(0).tolist()

    def step_share(self) -> torch.Tensor:
        """(steps, experts): each expert's share of the regions it won at each step."""
        return self.wins.sum((-2, -1)) / self.wins.sum((1, 2, 3)).clamp_min(1)[:, None]

    def win_share(self) -> list:
        """Each expert's share of all (image, seed, step, region) comparisons."""
        total = float(self.wins.sum())
        return (self.wins.sum((0, 2, 3)) / max(total, 1.0)).tolist()

    def winners(self) -> torch.Tensor:
        """(steps, gh, gw) long: the expert that won each region most often at each step."""
        return self.wins.argmax(1)

    def winner_strength(self) -> torch.Tensor:
        """(steps, gh, gw) in 0..1: how clearly the winner won (0: every expert as often, 1: always)."""
        n = self.num_experts
        share = self.wins.max(1).values / self.wins.sum(1).clamp_min(1)
        return ((share - 1 / n) / (1 - 1 / n)).clamp(0, 1)

    def oracle_gain(self) -> float:
        """Error saved by picking the best expert per region and step (an oracle), relative to
        the best single expert: 1 - sum(best) / min_i sum(error_i)."""
        single = self.error_sum[:, :self.num_experts].sum((0, 2, 3))
        best_single = float(single.min())
        return 0.0 if best_single <= 0 else 1.0 - float(self.best_sum.sum()) / best_single

    def verdict(self) -> str:
        """One line: complementary / one model dominates / nearly the same (see the module)."""
        if not self.samples:
            return "no samples measured: nothing to say."
        share, gain = self.win_share(), self.oracle_gain()
        labels = [short_name(n) for n in self.names[:self.num_experts]]
        top = max(range(self.num_experts), key=lambda i: share[i])
        wins = ", ".join(f"{label} {100 * s:.0f}%" for label, s in zip(labels, share))
        saved = f"a per-region choice of model would cut the error by {100 * gain:.1f}%"
        if share[top] >= DOMINANT_SHARE:
            return (f"{labels[top]} dominates everywhere (wins {100 * share[top]:.0f}% of region x step "
                    f"comparisons; {saved}): ensembling will not help much.")
        if gain < MIN_GAIN:
            return (f"the models make nearly the same errors ({saved}; wins: {wins}): "
                    "ensembling will not help much.")
        return f"models are complementary here (wins: {wins}; {saved} vs. the best model alone)."

    def rows(self) -> list:
        """[{name, loss, per_step}] per predictor, ensemble first when evaluated."""
        means, steps = self.mean_errors(), self.step_errors()
        rows = [{"name": n, "loss": means[i], "per_step": steps[:, i].tolist()} for i, n in enumerate(self.names)]
        return rows[self.num_experts:] + rows[:self.num_experts]

    def to_dict(self) -> dict:
        """JSON-ready summary (the CLI's wins file)."""
        return {"models": self.names[:self.num_experts], "predictors": self.names, "timesteps": self.timesteps,
                "sigmas": self.sigmas, "grid": list(self.grid), "objective": self.objective,
                "images": self.images, "seeds": self.seeds, "samples": self.samples, "stopped": self.stopped,
                "win_share": self.win_share(), "win_share_per_step": self.step_share().tolist(),
                "oracle_gain": self.oracle_gain(), "verdict": self.verdict(),
                "winners": self.winners().tolist(), "rows": self.rows()}


def short_name(name: str) -> str:
    name = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    return name[:-len(".safetensors")] if name.endswith(".safetensors") else name


@dataclass
class Ensembled:
    """An ensemble to evaluate beside the experts: its executor (any mixer) and which experts it
    runs (all of them; one for mode 'single model')."""
    name: str
    executor: EnsembleExecutor
    indices: Sequence[int]


def measure(experts, layout, schedule: NoiseSchedule, samples: Sequence[dict], names: Sequence[str],
            steps: int = 4, seeds: Sequence[int] = (0,), grid: int = GRID, ensemble: Optional[Ensembled] = None,
            progress: Optional[Callable[[int, int], None]] = None, should_stop: Optional[Callable[[], bool]] = None,
            device="cpu") -> ErrorTable:
    """The ErrorTable of `experts` (and `ensemble`) on `samples` (dicts with "latent" (C, H, W),
    "contexts" [N x (tokens, dim)], optional "ys" [N x (adm,)]), see the module.
    progress(done, total) after each (image, step); should_stop() polled before each."""
    n, seeds = len(experts), [int(s) for s in seeds]
    if len(names) != n or n < 2:
        raise AFAError(f"a win map needs 2 or more models with one name each, got {n} model(s) and {len(names)} names.")
    if not seeds:
        raise AFAError("give at least one noise seed.")
    timesteps = step_indices(len(schedule), steps)
    single = EnsembleExecutor(layout, uniform_mixer(len(layout.points), 1))
    table, total, done = None, len(samples) * len(timesteps), 0
    for k in range(len(samples)):
        sample = samples[k]
        latent = sample["latent"].to(device, torch.float32)
        noise = torch.stack([torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed_of(s, "winmap", k)))
                             for s in seeds]).to(device)                      # (seeds, C, H, W)
        x0 = latent.expand_as(noise)
        contexts = [c.to(device, torch.float32).expand(len(seeds), *c.shape) for c in sample["contexts"]]
        ys = sample.get("ys")
        ys = [y.to(device, torch.float32).expand(len(seeds), *y.shape) for y in ys] if ys is not None else [None] * n
        if table is None:
            table = _empty_table(names, n, timesteps, schedule, latent.shape[-2:], grid, ensemble)
        for si, t in enumerate(timesteps):
            if should_stop is not None and should_stop():
                table.stopped = True
                return table
            sigma = schedule.sigmas[t].to(device).float().expand(len(seeds))
            x_in = schedule.model_input(sigma, schedule.noised(x0, noise, sigma))
            tt = schedule.model_timestep(torch.full((len(seeds),), t, device=device), sigma)
            target = schedule.target(x0, noise)
            with torch.no_grad():
                errs = [region_errors(predict(single, [experts[i]], x_in, tt, [contexts[i]], [ys[i]]), target, table.grid)
                        for i in range(n)]
                if ensemble is not None:
                    idx = list(ensemble.indices)
                    pred = predict(ensemble.executor, [experts[i] for i in idx], x_in, tt, [contexts[i] for i in idx],
                                   [ys[i] for i in idx])
                    errs.append(region_errors(pred, target, table.grid))
            _add(table, si, torch.stack(errs, 1).double().cpu(), n)          # (seeds, predictors, gh, gw)
            done += 1
            if progress is not None:
                progress(done, total)
        table.samples += len(seeds)
        table.images += 1
    if table is None:
        raise AFAError("no images to measure: the folder holds no captioned images.")
    table.seeds = len(seeds)
    return table


def _empty_table(names, n, timesteps, schedule, hw, grid, ensemble) -> ErrorTable:
    grid = (min(int(grid), hw[0]), min(int(grid), hw[1]))
    if min(grid) < 1:
        raise AFAError(f"grid must be 1 or more regions per side, got {grid}.")
    predictors = list(names) + ([ensemble.name] if ensemble is not None else [])
    s = len(timesteps)
    return ErrorTable(names=predictors, num_experts=n, timesteps=list(timesteps),
                      sigmas=[float(schedule.sigmas[t]) for t in timesteps], objective=schedule.objective,
                      error_sum=torch.zeros(s, len(predictors), *grid, dtype=torch.float64),
                      wins=torch.zeros(s, n, *grid, dtype=torch.float64),
                      best_sum=torch.zeros(s, *grid, dtype=torch.float64))


def _add(table: ErrorTable, step: int, errs: torch.Tensor, n: int):
    """errs (seeds, predictors, gh, gw) of one image at one step into the sums."""
    if not torch.isfinite(errs).all():
        bad = [table.names[i] for i in range(errs.shape[1]) if not torch.isfinite(errs[:, i]).all()]
        raise AFAError(f"non-finite predictions from {', '.join(bad)} at step t={table.timesteps[step]}: "
                       "check the model files (NaN weights?) or use fp32 precision.")
    table.error_sum[step] += errs.sum(0)
    expert = errs[:, :n]                                   # (seeds, experts, gh, gw)
    best = expert.min(1)
    table.best_sum[step] += best.values.sum(0)
    won = (expert == best.values[:, None]).double()        # exact ties share the win
    table.wins[step] += (won / won.sum(1, keepdim=True)).sum(0)
