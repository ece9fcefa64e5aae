"""Training the SABW aggregator (paper section 3.4), host-free: imports nothing from ComfyUI.

Only the aggregator trains; the N experts (objects following `core.ensemble.Expert`) stay
frozen. Loss: MSE of the ensembled prediction against the models' own target (`NoiseSchedule`:
eps for SD1.x/SDXL, the flow-matching velocity noise - x0 for SD3/FLUX), t uniform over the
models' own (for flow models: shifted) schedule, caption dropout per SAMPLE (the empty-caption
encoding replaces the sample's text for every model). Experts with `bind` (DiTs) are bound to
each call's inputs and walked with the family's inputs (`predict`). AdamW with linear warm-up (`lr_at`),
gradient accumulation, clipping, autocast (fp16 with a loss scaler of the trainer's device),
gradient checkpointing of the frozen blocks (the executor's `checkpoint_blocks`).

Determinism and resume. Every random draw is a pure function of (seed, what, position)
(core.train_data: the data order of each epoch, aspect-ratio buckets, the noise, timestep
and dropout of sample number p of the run, validation sample k). So a run gives the same
result whatever the batch split (accumulation, data-parallel ranks) and a resume needs
only the step, the sample position and the optimizer state, no RNG snapshot.

Files (core.train_state). `<out>.safetensors` is a normal aggregator file whose "training"
metadata holds the experts, steps, data settings, losses and the validation table; the
sidecar `<out>.safetensors.train-state` holds the optimizer state for an exact resume.

Data parallel: `Comm` sums tensors over ranks (torch.distributed when initialised). The
global batch is `batch_size * grad_accum`; each micro-batch is sharded over the ranks and
the summed gradients equal the single-process ones. Only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import logger
from .aggregator_file import save_aggregator
from .ensemble import EnsembleExecutor, SABWMixer, uniform_mixer
from .errors import FileWriteError, TrainingError
from .family import Layout
from .sabw import Aggregator, SABWConfig
from .spec import Mode
from .train_config import Comm, NoiseSchedule, TrainConfig, amp_dtype, lr_at
from .train_data import Batch, DataOrder, TrainData, make_batch, validation_batches
from .train_report import TRAINED_ROW, format_validation, run_metadata
from .train_state import (clean_interrupted_saves, finish_sidecar, read_resume_file, read_sidecar, state_path,
                          write_sidecar)

__all__ = ["AggregatorTrainer", "Batch", "Comm", "NoiseSchedule", "TrainConfig", "TrainData", "TrainResult",
           "evaluate_aggregator", "format_validation", "lr_at", "state_path", "train_aggregator"]


@dataclass
class TrainResult:
    aggregator: Aggregator
    step: int
    stopped: bool                 # cancelled through should_stop (the file is resumable)
    history: list                 # [[step, train loss]]
    val_history: list             # [[step, validation loss]]
    validation: Optional[dict]    # table, see validation_table
    metadata: dict                # what was written to the file's "training" metadata
    path: Optional[Path] = None

    @property
    def report(self) -> str:
        return format_validation(self.validation, self.metadata)


class AggregatorTrainer:
    """One training run. `run()` trains to `config.steps`; the pieces (make_batch,
    compute_gradients, validate) are public for tests and tools."""

    def __init__(self, experts, layout: Layout, data: TrainData, schedule: NoiseSchedule,
                 config: TrainConfig, out_path=None, expert_info=None, resume=False, device="cpu",
                 comm: Optional[Comm] = None, extra_meta=None):
        self.experts, self.layout, self.data, self.schedule = list(experts), layout, data, schedule
        self.config, self.comm = config, comm or Comm.current()
        self.out_path = Path(out_path) if out_path is not None else None
        n = len(self.experts)
        self.expert_info = list(expert_info or [{"name": f"model {i + 1}", "sha256": None} for i in range(n)])
        self.device = torch.device(device)
        self.extra_meta = dict(extra_meta or {})
        if len(data.train) == 0:
            raise TrainingError("the training set is empty: add captioned images to the dataset folder.")
        if config.caption_dropout > 0 and data.empty_contexts is None:
            raise TrainingError("caption dropout needs the empty caption's encoding (TrainData.empty_contexts).")
        self.amp_dtype = amp_dtype(config.mixed_precision, self.device)
        self.checkpointing = (self.device.type == "cuda" if config.gradient_checkpointing is None
                              else bool(config.gradient_checkpointing))
        self.step, self.position, self.seed = 0, 0, config.seed
        self.history, self.val_history, self.validation, self.reference = [], [], None, None
        self.last_saved, self.saved_batch_size = None, None
        self.on_save: Optional[Callable[[int, Path], None]] = None   # after each save (rank 0), see run
        if self.out_path is not None and self.comm.rank == 0:
            clean_interrupted_saves(self.out_path)
        resume_file = resume and self.out_path is not None and self.out_path.exists()
        if resume and not resume_file:
            logger.info("resume: %s does not exist yet, starting a new aggregator", self.out_path)
        elif not resume and self.out_path is not None and self.out_path.exists() and self.comm.rank == 0:
            logger.warning("%s exists and resume is off: training starts over and overwrites it", self.out_path)
        self.aggregator = self._load_for_resume() if resume_file else self._fresh_aggregator(n)
        self.aggregator.to(self.device, torch.float32).train().requires_grad_(True)
        self.params = [p for p in self.aggregator.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr_at(self.step, config),
                                           weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        own = [e for e in self.experts if hasattr(e, "checkpointing")]  # experts that checkpoint their own blocks
        for e in own:
            e.checkpointing = self.checkpointing
        self.executor = EnsembleExecutor(layout, SABWMixer(self.aggregator),
                                         checkpoint_blocks=self.checkpointing and not own)
        if resume_file:
            self._load_sidecar()
        self.order = DataOrder(len(data.train), config.batch_size, self.seed, data.train_buckets)
        self.order.check_resume(self.position, self.saved_batch_size)

    # ------------------------------------------------------------------ set-up
    def _fresh_aggregator(self, n):
        c = self.config
        agg = Aggregator(self.layout.point_channels,
                         SABWConfig(num_models=n, hidden=c.hidden, heads=c.heads, depth=c.depth,
                                    context_dim=self.layout.context_dim, time_embed_dim=self.layout.time_embed_dim))
        agg.reset_parameters(c.seed)
        return agg

    def _load_for_resume(self):
        point = read_resume_file(self.out_path, self.expert_info, self.layout, self.config.seed,
                                 self.config.global_batch, self.extra_meta.get("data", {}))
        self.step, self.position, self.seed, self.history = point.step, point.position, point.seed, point.history
        self.last_saved = self.step  # the file on disk is the last good state until we save
        self.saved_batch_size = point.batch_size
        logger.info("resuming %s at step %d of %d", self.out_path.name, self.step, self.config.steps)
        return point.file.build()

    def _load_sidecar(self):
        state = read_sidecar(self.out_path, self.step, self.device)
        if state is None:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.position = int(state["position"])
        self.history = [list(h) for h in state.get("history", self.history)]
        self.val_history = [list(h) for h in state.get("val_history", [])]

    # ------------------------------------------------------------------ batches
    def make_batch(self, positions, validation=False) -> Batch:
        """Samples at run-wide `positions` (or validation indices) with their fixed draws."""
        return make_batch(self.data, self.order, positions, validation, seed=self.seed,
                          timesteps=len(self.schedule), caption_dropout=self.config.caption_dropout,
                          num_models=len(self.experts), device=self.device)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def sample_losses(self, batch: Batch, executor=None, experts=None, contexts=None, ys=None):
        """Per-sample MSE (batch,) of `executor` (default: the trained ensemble) against the target."""
        s = self.schedule
        sigmas = s.sigmas.to(self.device)[batch.t].float()
        x_in = s.model_input(sigmas, s.noised(batch.latents, batch.noise, sigmas))
        timesteps = s.model_timestep(batch.t, sigmas)
        with self._autocast():
            pred = predict(executor or self.executor, experts or self.experts, x_in, timesteps,
                           contexts or batch.contexts, ys if ys is not None else batch.ys)
        return (pred.float() - s.target(batch.latents, batch.noise)).square().flatten(1).mean(1)

    # ------------------------------------------------------------------ training
    def compute_gradients(self) -> float:
        """Gradients of the next optimizer step (summed over ranks); returns its mean loss."""
        cfg, rank, world = self.config, self.comm.rank, self.comm.world_size
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for m in range(cfg.grad_accum):
            start = self.position + m * cfg.batch_size
            mine = list(range(start + rank, start + cfg.batch_size, world))
            if not mine:
                continue
            loss = self.sample_losses(self.make_batch(mine)).sum() / cfg.global_batch
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach()
        if world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = self.comm.all_reduce(torch.cat([g.flatten() for g in grads]))
            offset = 0
            for p in self.params:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            self.comm.all_reduce(total)
        return float(total)

    def optimizer_step(self, loss: float):
        """Clip, step with lr_at(step); raises TrainingError on a non-finite loss or gradient."""
        if not math.isfinite(loss):
            self._diverged(f"the loss became {loss}")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if self.scaler is None and not math.isfinite(norm):
            self._diverged(f"the gradient norm became {norm}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.config)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        self.position += self.config.global_batch
        self.history.append([self.step, loss])

    def _diverged(self, what):
        raise TrainingError(f"{what} at step {self.step + 1}: training stopped and the bad step was not saved. "
                            f"{self._last_good('with a lower learning rate or a lower max grad norm')} "
                            "If this repeats, check the dataset and models for NaN weights.")

    def _last_good(self, how: str) -> str:
        if self.last_saved is not None and self.out_path is not None:
            return f"The last good checkpoint is kept: {self.out_path} (step {self.last_saved}); resume from it {how}."
        return "No checkpoint was saved yet (lower 'save every' to keep earlier states)."

    def _agree(self, flag: bool) -> bool:
        """True on every rank when any rank says so (cancel must stop all ranks together)."""
        if self.comm.world_size == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return float(self.comm.all_reduce(t)) > 0

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_loss(self, executor=None, expert_index=None) -> float:
        """Mean loss over the validation set (fixed noise and t per sample), sharded over ranks."""
        total = torch.zeros((), device=self.device)
        for indices in validation_batches(len(self.data.val), self.config.batch_size, self.comm.rank,
                                          self.comm.world_size, self.data.val_buckets):
            batch = self.make_batch(indices, validation=True)
            if expert_index is None:
                losses = self.sample_losses(batch, executor)
            else:
                i = expert_index
                losses = self.sample_losses(batch, executor, [self.experts[i]], [batch.contexts[i]],
                                            [batch.ys[i]] if batch.ys is not None else [None])
            total += losses.sum()
        self.comm.all_reduce(total)
        return float(total) / len(self.data.val)

    def validate(self) -> Optional[dict]:
        """`validation_table` of the aggregator being trained, recorded in val_history/validation."""
        table = self.validation_table(self.aggregator)
        if table is None:
            return None
        trained = table["rows"][0]["loss"]
        if self.val_history and self.val_history[-1][0] == self.step:  # e.g. resumed at a validated step
            self.val_history[-1] = [self.step, trained]
        else:
            self.val_history.append([self.step, trained])
        self.validation = table
        return table

    def validation_table(self, aggregator=None) -> Optional[dict]:
        """`aggregator`'s validation loss (when given) next to the untrained (block-wise average)
        ensemble's and each single model's, on the same samples, noise and timesteps; None
        without a validation set. The references are computed once per trainer."""
        if not len(self.data.val):
            return None
        points, n = len(self.layout.points), len(self.experts)
        if self.reference is None:
            uniform = EnsembleExecutor(self.layout, uniform_mixer(points, n))
            single = EnsembleExecutor(self.layout, uniform_mixer(points, 1))
            self.reference = {"uniform": self.validation_loss(uniform),
                              "single": [self.validation_loss(single, i) for i in range(n)]}
        rows = []
        if aggregator is not None:
            executor = (self.executor if aggregator is self.aggregator
                        else EnsembleExecutor(self.layout, SABWMixer(aggregator)))
            was_training = aggregator.training
            aggregator.eval()
            try:
                rows.append({"name": TRAINED_ROW, "loss": self.validation_loss(executor)})
            finally:
                aggregator.train(was_training)
        rows.append({"name": f"{Mode.BLOCK_AVERAGE.value} (untrained)", "loss": self.reference["uniform"]})
        rows += [{"name": f"{Mode.SINGLE_MODEL.value}: {e['name']}", "loss": loss}
                 for e, loss in zip(self.expert_info, self.reference["single"])]
        return {"step": self.step, "samples": len(self.data.val), "seed": self.seed,
                "metric": f"{self.schedule.objective}, fixed noise and timestep per sample", "rows": rows}

    # ------------------------------------------------------------------ files
    def metadata(self, finished: bool) -> dict:
        return run_metadata(self, finished)

    def save(self, finished=False) -> dict:
        meta = self.metadata(finished)
        if self.out_path is not None and self.comm.rank == 0:
            try:
                write_sidecar(self.out_path, {
                    "step": self.step, "position": self.position, "seed": self.seed,
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "history": self.history, "val_history": self.val_history})
                save_aggregator(self.out_path, self.aggregator, self.layout, self.expert_info, meta)
            except FileWriteError as e:
                finish_sidecar(self.out_path, saved=False)
                raise TrainingError(f"saving step {self.step} failed, training stopped: {e} "
                                    f"{self._last_good('once the disk has room')}") from e
            finish_sidecar(self.out_path, saved=True)
            if self.on_save is not None:
                self.on_save(self.step, self.out_path)
        self.last_saved = self.step
        return meta

    # ------------------------------------------------------------------ loop
    def run(self, should_stop: Optional[Callable[[], bool]] = None,
            progress: Optional[Callable[[int, int, float], None]] = None,
            on_save: Optional[Callable[[int, Path], None]] = None) -> TrainResult:
        """Train to config.steps; progress(step, steps, loss) after each step, on_save(step, file)
        after each save on rank 0 (e.g. to render a sample with the file)."""
        cfg, self.on_save = self.config, on_save
        val_every = cfg.val_every or cfg.save_every
        if self.step >= cfg.steps:
            logger.info("%s is already at step %d (>= %d steps): nothing to train", self.out_path, self.step, cfg.steps)
        start = self.step
        stop_now = self._agree(should_stop is not None and should_stop())
        if not stop_now:
            self.validate()
        while self.step < cfg.steps:
            if stop_now or self._agree(should_stop is not None and should_stop()):
                if self.step == start:  # nothing trained in this run: leave any existing file as it is
                    logger.info("training stopped before its first step; %s was not written", self.out_path)
                    return TrainResult(aggregator=self.aggregator, step=self.step, stopped=True, history=self.history,
                                       val_history=self.val_history, validation=self.validation,
                                       metadata=self.metadata(False), path=None)
                logger.info("training cancelled at step %d; %s is resumable", self.step, self.out_path)
                return self._finish(finished=False, stopped=True)
            loss = self.compute_gradients()
            self.optimizer_step(loss)
            if progress is not None:
                progress(self.step, cfg.steps, loss)
            if self.step < cfg.steps:
                if val_every and self.step % val_every == 0:
                    self.validate()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self._log_save(self.save())
        return self._finish(finished=True, stopped=False)

    def _finish(self, finished, stopped):
        if not stopped and (not self.val_history or self.val_history[-1][0] != self.step):
            self.validate()  # a cancel saves at once and keeps the last validation
        meta = self.save(finished)
        self._log_save(meta)
        return TrainResult(aggregator=self.aggregator, step=self.step, stopped=stopped, history=self.history,
                           val_history=self.val_history, validation=self.validation, metadata=meta,
                           path=self.out_path)

    def _log_save(self, meta):
        if self.comm.rank != 0:
            return
        val = f", val loss {meta['final_val_loss']:.5f}" if meta.get("final_val_loss") is not None else ""
        train = f"train loss {meta['final_train_loss']:.5f}" if meta.get("final_train_loss") is not None else "no steps"
        logger.info("step %d/%d: %s%s%s", self.step, self.config.steps, train, val,
                    f" -> saved {self.out_path}" if self.out_path is not None else "")


def predict(executor, experts, x, timesteps, contexts, ys):
    """UNet experts take the call's inputs in the walk; per-call adapters (DiTs) are first bound
    to them (`bind(x, timesteps, context, y)`) and walked with the family's inputs."""
    if not hasattr(experts[0], "bind"):
        return executor(experts, x, timesteps, contexts, ys)
    bound = [e.bind(x, timesteps, c, y) for e, c, y in zip(experts, contexts, ys or [None] * len(experts))]
    return executor.forward(bound, {"contexts": contexts})


def train_aggregator(experts, layout, data, schedule, config, out_path=None, expert_info=None, resume=False,
                     should_stop=None, progress=None, device="cpu", comm=None, extra_meta=None,
                     on_save=None) -> TrainResult:
    """Train (or resume) an aggregator for `experts`; see AggregatorTrainer.run."""
    trainer = AggregatorTrainer(experts, layout, data, schedule, config, out_path, expert_info, resume,
                                device, comm, extra_meta)
    return trainer.run(should_stop, progress, on_save)


def evaluate_aggregator(experts, layout, data, schedule, config, aggregator=None, expert_info=None, device="cpu",
                        comm=None, seed=None) -> Optional[dict]:
    """The validation table without training (`aggregator`: an Aggregator, or None for the
    references only) on the draws of `seed` (default config.seed; a file's training seed
    gives the table its training wrote)."""
    if seed is not None:
        config = replace(config, seed=int(seed))
    trainer = AggregatorTrainer(experts, layout, data, schedule, config, expert_info=expert_info, device=device,
                                comm=comm)
    if aggregator is not None:
        aggregator = aggregator.to(trainer.device, torch.float32)
    return trainer.validation_table(aggregator)
