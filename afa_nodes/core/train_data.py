"""What a training step consumes, host-free: the samples (`TrainData`), which sample sits at
each run-wide position (`DataOrder`, with aspect-ratio buckets), and each sample's fixed
random draws (`make_batch`).

Position p = samples consumed so far in the run; optimizer step s consumes the positions
[s*G, (s+1)*G) with G = batch_size * grad_accum, micro-batch m the aligned block
[s*G + m*batch_size, ... + batch_size), each rank a strided share of it. Every draw is a pure
function of (seed, what, position), so a resume needs only the position.

Order of epoch e (pure function of seed and e):
  * one shape (no bucket keys, or all samples in one bucket): a permutation of all samples
    seeded by (seed, "order", e); batches may span two epochs;
  * several buckets: each bucket's samples are shuffled and cut into batches of batch_size,
    a bucket's last batch is filled up with that bucket's first samples of the epoch (every
    sample is seen each epoch, and a bucket smaller than one batch still trains), then the
    batches are shuffled. The epoch length is a multiple of batch_size, so every aligned
    micro-batch holds one bucket (one latent shape), also when sharded over ranks.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import torch

from .errors import TrainingError


def seed_of(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:15], 16)


@dataclass
class TrainData:
    """`train`/`val`: sequences of samples {"latent": (C, h, w) model latent (after
    process_latent_in), "contexts": [N x (tokens, context_dim)], optional "ys": [N x (adm,)]
    and "empty_ys" (the sample's y with the empty caption, for caption dropout)}.
    `train` may provide `at(k, epoch)`: sample k as seen in `epoch` (e.g. which cached
    random crop); plain sequences are indexed. `empty_contexts` / `empty_ys`: the empty
    caption's encoding per model. `train_buckets` / `val_buckets`: a bucket key per sample
    (samples of one key have one latent shape); None = every sample has one shape."""
    train: Sequence
    val: Sequence = ()
    empty_contexts: Optional[Sequence] = None
    empty_ys: Optional[Sequence] = None
    train_buckets: Optional[Sequence[Hashable]] = None
    val_buckets: Optional[Sequence[Hashable]] = None

    def train_sample(self, k: int, epoch: int) -> dict:
        at = getattr(self.train, "at", None)
        return at(k, epoch) if callable(at) else self.train[k]


@dataclass
class Batch:
    positions: list        # run-wide sample numbers (train) or validation indices
    latents: torch.Tensor  # (batch, C, h, w)
    noise: torch.Tensor    # (batch, C, h, w), the target
    t: torch.Tensor        # (batch,) timestep indices
    dropped: torch.Tensor  # (batch,) bool: caption replaced by the empty one
    contexts: list         # N x (batch, tokens, dim)
    ys: Optional[list]     # N x (batch, adm) or None


def _groups(keys: Sequence[Hashable]) -> list[list[int]]:
    """Sample indices per bucket, buckets in a fixed order (sorted by repr)."""
    groups: dict = {}
    for k, key in enumerate(keys):
        groups.setdefault(key, []).append(k)
    return [groups[key] for key in sorted(groups, key=repr)]


class DataOrder:
    """Run-wide position -> (epoch, train sample index); see the module docstring."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, buckets: Optional[Sequence[Hashable]] = None):
        if buckets is not None and len(buckets) != num_samples:
            raise TrainingError(f"{len(buckets)} bucket keys for {num_samples} training samples.")
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.groups = _groups(buckets) if buckets is not None else [list(range(num_samples))]
        self.bucketed = len(self.groups) > 1
        self.epoch_length = (sum(-(-len(g) // batch_size) * batch_size for g in self.groups)
                             if self.bucketed else num_samples)
        self._cache = (None, None)

    def epoch(self, e: int) -> list:
        """Sample indices of epoch e, in order (cached: consecutive positions share an epoch)."""
        if self._cache[0] != e:
            self._cache = (e, self._bucketed(e) if self.bucketed else self._permutation(e))
        return self._cache[1]

    def _permutation(self, e):
        g = torch.Generator().manual_seed(seed_of(self.seed, "order", e))
        return torch.randperm(self.n, generator=g).tolist()

    def _bucketed(self, e):
        g, bs, batches = torch.Generator().manual_seed(seed_of(self.seed, "bucket order", e)), self.batch_size, []
        for group in self.groups:
            shuffled = [group[j] for j in torch.randperm(len(group), generator=g).tolist()]
            shuffled += [shuffled[j % len(shuffled)] for j in range(-len(shuffled) % bs)]  # fill the last batch
            batches += [shuffled[s:s + bs] for s in range(0, len(shuffled), bs)]
        return [k for j in torch.randperm(len(batches), generator=g).tolist() for k in batches[j]]

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, sample index) of run-wide `position`."""
        e, offset = divmod(position, self.epoch_length)
        return e, self.epoch(e)[offset]

    def check_resume(self, position: int, saved_batch_size=None):
        """Bucketed micro-batches must start on a batch boundary (same batch size as saved)."""
        if self.bucketed and position % self.batch_size:
            raise TrainingError(
                f"cannot resume at sample {position} with batch size {self.batch_size}: with aspect-ratio "
                f"buckets every batch must stay inside one bucket, and the run was saved with batch size "
                f"{saved_batch_size or '?'}. Resume with that batch size, or turn resume off to start over.")


def validation_batches(num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                       buckets: Optional[Sequence[Hashable]] = None) -> list[list[int]]:
    """This rank's validation batches: per bucket, a strided share cut into batches."""
    groups = _groups(buckets) if buckets is not None else [list(range(num_samples))]
    out = []
    for group in groups:
        mine = group[rank::world_size]
        out += [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
    return out


def make_batch(data: TrainData, order: DataOrder, positions, validation: bool, *, seed: int, timesteps: int,
               caption_dropout: float, num_models: int, device) -> Batch:
    """Samples at run-wide `positions` (or validation indices) with their fixed draws:
    t uniform in [0, timesteps), caption dropout per sample (train only), Gaussian noise."""
    samples, draws = [], []
    for p in positions:
        if validation:
            sample, key = data.val[p], (seed, "val", p)
        else:
            epoch, k = order.locate(p)
            sample, key = data.train_sample(k, epoch), (seed, "train", p)
        g = torch.Generator().manual_seed(seed_of(*key))
        t = int(torch.randint(timesteps, (1,), generator=g))
        drop = (not validation) and float(torch.rand((), generator=g)) < caption_dropout
        noise = torch.randn(sample["latent"].shape, generator=g)
        samples.append(sample)
        draws.append((t, drop, noise))
    shapes = sorted({tuple(s["latent"].shape) for s in samples})
    if len(shapes) > 1:
        raise TrainingError(f"latents of different shapes in one batch ({shapes}); give every sample one size, "
                            "or give TrainData bucket keys so batches stay inside one size.")
    contexts, ys = [], None
    for i in range(num_models):
        rows = [data.empty_contexts[i] if d[1] else s["contexts"][i] for s, d in zip(samples, draws)]
        if len({tuple(r.shape) for r in rows}) > 1:
            raise TrainingError(f"text contexts of different shapes in one batch ({sorted({tuple(r.shape) for r in rows})}); "
                                "encode every caption to the same number of tokens.")
        contexts.append(torch.stack(rows).to(device, torch.float32))
    if samples[0].get("ys") is not None:
        ys = [torch.stack([_empty_y(s, i, data) if d[1] else s["ys"][i] for s, d in zip(samples, draws)])
              .to(device, torch.float32) for i in range(num_models)]
    return Batch(positions=list(positions),
                 latents=torch.stack([s["latent"] for s in samples]).to(device, torch.float32),
                 noise=torch.stack([d[2] for d in draws]).to(device),
                 t=torch.tensor([d[0] for d in draws], device=device),
                 dropped=torch.tensor([d[1] for d in draws]), contexts=contexts, ys=ys)


def _empty_y(sample, i, data):
    """y of a dropped caption: the sample's own (keeps its size conditioning), else the shared one."""
    if sample.get("empty_ys") is not None:
        return sample["empty_ys"][i]
    return data.empty_ys[i] if data.empty_ys is not None else sample["ys"][i]
