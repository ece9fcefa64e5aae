"""The ensembled UNet forward (paper Algorithm 1) and the ways to mix experts.

The executor is host-free: each expert is an adapter (see `Expert`) that runs one block
of its UNet; the host (ComfyUI layer) implements it with its own block dispatch.
All experts run every block on the same input; a `Mixer` turns their N outputs into one
feature that feeds block j+1 of every expert and the skip stack.
"""
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .errors import AFAError
from .layout import UNetLayout


class Expert(Protocol):
    """One frozen UNet, block by block. Shapes: h (batch, channels, height, width)."""

    def embed(self, timesteps, y, dtype): ...                        # -> emb (batch, time_embed_dim)
    def run_block(self, stage, index, h, emb, context, output_shape=None): ...
    def head(self, h): ...                                           # `out` head -> eps


class Hooks:
    """Per-block host hooks (ControlNet residuals, block patches), each applied ONCE per
    block. `hs` is the list of per-model streams; after an aggregated point all entries are
    the same tensor. Default: no-op."""

    def after_input(self, index, hs): return hs        # -> what goes onto the skip stack
    def after_skip(self, index, hs): return hs         # -> what feeds the next block
    def after_middle(self, hs): return hs
    def before_output(self, index, hs, skips): return hs, skips


class Mixer:
    """weights(point, features (batch, models, C, H, W), temb, context) ->
    (batch, models, H or 1, W or 1) summing to 1 over models, or None to keep the
    models' streams separate at this point. `begin(step)` is called once per UNet call."""

    def begin(self, step):
        pass

    def weights(self, point: int, features, temb, context):
        raise NotImplementedError


class SABWMixer(Mixer):
    """The trained aggregator. `time_input` / `text_input` False are the paper's ablations.

    `refresh_every` k > 1 (off by default) re-uses each point's maps for k sampling steps
    (they change slowly): the aggregator then runs on one step in k. Needs `begin(step)`
    with step = (sigma, batch key); a sigma above the previous one starts a new run."""

    def __init__(self, aggregator, time_input=True, text_input=True, refresh_every=1):
        self.aggregator = aggregator
        self.time_input, self.text_input = time_input, text_input
        self.refresh_every = refresh_every
        self._cache, self._sigma, self._steps, self._batch = {}, None, 0, None

    def begin(self, step):
        if self.refresh_every <= 1 or step is None:
            self._batch = None
            return
        sigma, self._batch = step
        if self._sigma is None or sigma > self._sigma:
            self._cache.clear()
            self._steps = 0
        elif sigma < self._sigma:
            self._steps += 1
        self._sigma = sigma

    def weights(self, point, features, temb, context):
        key = None
        if self._batch is not None:
            key = (self._batch, point, tuple(features.shape))
            if self._steps % self.refresh_every and key in self._cache:
                return self._cache[key]
        p = next(self.aggregator.parameters())
        temb = temb if self.time_input else torch.zeros_like(temb)
        context = context if self.text_input else torch.zeros_like(context)
        w = self.aggregator(point, features.to(p.dtype), temb.to(p.dtype), context.to(p.dtype)).to(features.dtype)
        if key is not None:
            self._cache[key] = w
        return w


class ConstantMixer(Mixer):
    """Training-free modes: a fixed weight vector per point, or None (no mixing there)."""

    def __init__(self, table: Sequence[Optional[Sequence[float]]]):
        self.table = [None if row is None else torch.tensor(row, dtype=torch.float64) for row in table]
        self._cache = {}

    def weights(self, point, features, temb, context):
        row = self.table[point]
        if row is None:
            return None
        key = (point, features.dtype, features.device)
        if key not in self._cache:
            self._cache[key] = row.to(features.device, features.dtype).view(1, -1, 1, 1)
        return self._cache[key].expand(features.shape[0], -1, 1, 1)


def uniform_mixer(num_points, n):
    """Block-wise averaging: 1/N at every point (equals a zero-initialised SABW)."""
    return ConstantMixer([[1.0 / n] * n] * num_points)


def noise_average_mixer(num_points, n):
    """Each model runs its own UNet; only the predicted noise is averaged."""
    return ConstantMixer([None] * (num_points - 1) + [[1.0 / n] * n])


def fixed_weights_mixer(layout: UNetLayout, group_weights: dict):
    """group_weights: {"input"|"middle"|"output": [w_1..w_N]} (final counts as output);
    each vector is normalised to sum 1."""
    table = []
    for p in layout.points:
        w = group_weights["output" if p.stage == "final" else p.stage]
        total = float(sum(w))
        if any(v < 0 for v in w) or total <= 0:
            raise AFAError(f"model weights must be >= 0 with a positive sum, got {list(w)}")
        table.append([v / total for v in w])
    return ConstantMixer(table)


class EnsembleExecutor:
    """Runs N experts block by block and mixes them at every aggregation point.

    Resolved once per MODEL (layout, mixer); the per-step call is tensor code.
    `recorder(point, weights)` (optional, per call) sees every weight map;
    `checkpoint_blocks` recomputes frozen blocks in backward to save memory when training.
    """

    def __init__(self, layout: UNetLayout, mixer: Mixer, checkpoint_blocks: bool = False):
        self.layout, self.mixer = layout, mixer
        self.checkpoint_blocks = checkpoint_blocks
        stages = [p.stage for p in layout.points]
        self.num_input = stages.count("input")
        self.num_output = stages.count("output") + 1

    def __call__(self, experts, x, timesteps, contexts, ys=None, hooks: Hooks = Hooks(),
                 recorder: Optional[Callable] = None, step=None):
        n = len(experts)
        self._recorder = recorder
        self.mixer.begin(step)
        ys = ys if ys is not None else [None] * n
        embs = [e.embed(timesteps, y, x.dtype) for e, y in zip(experts, ys)]
        temb = embs[0] if n == 1 else torch.stack(embs).mean(0)
        cbar = contexts[0] if all(c is contexts[0] for c in contexts) else torch.stack(contexts).mean(0)
        point = 0
        hs, skips = [x] * n, []
        for i in range(self.num_input):
            hs = self._mix(point, self._run(experts, "input", i, hs, embs, contexts), temb, cbar)
            point += 1
            hs = hooks.after_input(i, hs)
            skips.append(hs)
            hs = hooks.after_skip(i, hs)
        hs = self._mix(point, self._run(experts, "middle", 0, hs, embs, contexts), temb, cbar)
        point += 1
        hs = hooks.after_middle(hs)
        for i in range(self.num_output):
            hs, skip = hooks.before_output(i, hs, skips.pop())
            hs = _concat_streams(hs, skip)
            output_shape = skips[-1][0].shape if skips else None
            outs = self._run(experts, "output", i, hs, embs, contexts, output_shape)
            if i == self.num_output - 1:
                outs = [e.head(o) for e, o in zip(experts, outs)]
            hs = self._mix(point, outs, temb, cbar)
            point += 1
        if any(h is not hs[0] for h in hs):
            raise AFAError("the mixer left the final noise predictions unmixed")
        return hs[0]

    def _run(self, experts, stage, index, hs, embs, contexts, output_shape=None):
        outs = []
        for expert, h, emb, context in zip(experts, hs, embs, contexts):
            def block(h, emb, context, expert=expert):
                return expert.run_block(stage, index, h, emb, context, output_shape)
            if self.checkpoint_blocks and torch.is_grad_enabled():
                outs.append(checkpoint(block, h, emb, context, use_reentrant=False))
            else:
                outs.append(block(h, emb, context))
        return outs

    def _mix(self, point, outs, temb, cbar):
        if len(outs) == 1:
            return outs
        features = torch.stack(outs, dim=1)  # (batch, models, channels, h, w)
        w = self.mixer.weights(point, features, temb, cbar)
        if w is None:
            return outs
        if self._recorder is not None:
            self._recorder(point, w)
        # sum_i w_i y_i written as y_1 + sum_{i>1} w_i (y_i - y_1) (equal, as sum_i w_i = 1):
        # identical experts then give y_1 exactly, whatever the weights.
        w = w.unsqueeze(2)  # (batch, models, 1, h, w)
        mixed = outs[0] + ((features[:, 1:] - features[:, :1]) * w[:, 1:]).sum(dim=1)
        return [mixed] * len(outs)


def _concat_streams(hs, skips):
    """Per stream cat([h, skip], channels); computed once when every stream is shared."""
    if all(h is hs[0] for h in hs) and all(s is skips[0] for s in skips):
        return [torch.cat([hs[0], skips[0]], dim=1)] * len(hs)
    return [torch.cat([h, s], dim=1) for h, s in zip(hs, skips)]


class BlockScalarMixer(torch.nn.Module, Mixer):
    """Trainable ablation "without spatial maps": one learnable logit per model per point,
    softmax over models (no features, timestep or text input). Zero logits = 1/N."""

    def __init__(self, num_points: int, num_models: int):
        torch.nn.Module.__init__(self)
        self.logits = torch.nn.Parameter(torch.zeros(num_points, num_models))

    def weights(self, point, features, temb, context):
        w = torch.softmax(self.logits[point].float(), dim=0).to(features.dtype)
        return w.view(1, -1, 1, 1).expand(features.shape[0], -1, 1, 1)
