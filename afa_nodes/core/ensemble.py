"""The ensembled forward (paper Algorithm 1), architecture-neutral, and the ways to mix experts.

The executor is host-free: each expert is an adapter of its family (e.g. core.unet.UNetExpert)
implemented by the host (the ComfyUI layer) with its own block dispatch. The layout's `walk`
says which blocks run in which order and what is carried; the executor runs each block on
every expert (on the same input) and a `Mixer` turns the N outputs into one feature that
feeds the next block of every expert.
"""
from typing import Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .errors import AFAError
from .family import Layout
from .spec import EnsembleSpec, FullRes, Mode, StepContext, parse_weights


class Mixer:
    """weights(point, features: the N models' (batch, C, H, W), temb, context) ->
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
    with step = (sigma, batch key); a sigma above the previous one starts a new run.

    `full_res` (spec.FullRes) is how the aggregator runs at the full-resolution points: those
    as large as the call's first point (a UNet's input 0; every point of a DiT)."""

    def __init__(self, aggregator, time_input=True, text_input=True, refresh_every=1, full_res=FullRes.EXACT):
        self.aggregator = aggregator
        self.time_input, self.text_input = time_input, text_input
        self.refresh_every = refresh_every
        self.full_res = FullRes(full_res)
        self._cache, self._sigma, self._steps, self._batch = {}, None, 0, None
        self._full_area = None

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

    def fresh(self, step: int) -> bool:
        """Whether step `step` of a run (0 = its first) computes its maps; the others re-use the last ones."""
        return step % self.refresh_every == 0

    def weights(self, point, features, temb, context):
        area = features[0].shape[-2] * features[0].shape[-1]
        if point == 0 or self._full_area is None:  # each call starts at point 0 (training calls no begin)
            self._full_area = area
        key = None
        if self._batch is not None:
            key = (self._batch, point, tuple(features[0].shape))
            if not self.fresh(self._steps) and key in self._cache:
                return self._cache[key]
        p = next(self.aggregator.parameters())
        temb = temb if self.time_input else torch.zeros_like(temb)
        context = context if self.text_input else torch.zeros_like(context)
        option = self.full_res if area >= self._full_area else FullRes.EXACT
        w = self.aggregator(point, [f.to(p.dtype) for f in features], temb.to(p.dtype), context.to(p.dtype),
                            option).to(features[0].dtype)
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
        first = features[0]
        key = (point, first.dtype, first.device)
        if key not in self._cache:
            self._cache[key] = row.to(first.device, first.dtype).view(1, -1, 1, 1)
        return self._cache[key].expand(first.shape[0], -1, 1, 1)


def uniform_mixer(num_points, n):
    """Block-wise averaging: 1/N at every point (equals a zero-initialised SABW)."""
    return ConstantMixer([[1.0 / n] * n] * num_points)


def noise_average_mixer(num_points, n):
    """Each model runs its own UNet; only the predicted noise is averaged."""
    return ConstantMixer([None] * (num_points - 1) + [[1.0 / n] * n])


def fixed_weights_mixer(layout: Layout, group_weights: dict):
    """group_weights: {"input"|"middle"|"output": [w_1..w_N]} (final counts as output);
    each vector is normalised to sum 1."""
    table = []
    for p in layout.points:
        w = group_weights[layout.weight_group(p)]
        total = float(sum(w))
        if any(v < 0 for v in w) or total <= 0:
            raise AFAError(f"model weights must be >= 0 with a positive sum, got {list(w)}")
        table.append([v / total for v in w])
    return ConstantMixer(table)


class EnsembleExecutor:
    """Runs N experts block by block along `layout.walk` and mixes them at every aggregation point.

    Resolved once per MODEL (layout, mixer); the per-step call is tensor code.
    `ctx.recorder(point, weights, ctx)` (optional, per call) sees every weight map;
    `checkpoint_blocks` recomputes frozen blocks in backward to save memory when training.
    """

    def __init__(self, layout: Layout, mixer: "Mixer", checkpoint_blocks: bool = False):
        self.layout, self.mixer = layout, mixer
        self.checkpoint_blocks = checkpoint_blocks

    def __call__(self, experts, x, timesteps, contexts, ys=None, hooks=None, ctx: Optional[StepContext] = None):
        """The UNet-style call: x (batch, C, H, W), timesteps (batch,), one context per expert."""
        return self.forward(experts, {"x": x, "timesteps": timesteps, "contexts": contexts, "ys": ys,
                                      "hooks": hooks}, ctx)

    def forward(self, experts, inputs: dict, ctx: Optional[StepContext] = None):
        """Any family: `inputs` as the layout's walk documents them."""
        ctx = ctx or StepContext()
        self.mixer.begin(ctx.step_key)
        return self.layout.walk(experts, inputs, _Engine(self, ctx))


class _Engine:
    """What a layout's walk uses, for one call: run a block on every expert, mix at a point."""

    def __init__(self, executor: EnsembleExecutor, ctx: StepContext):
        self.mixer, self.ctx = executor.mixer, ctx
        self.checkpointing = executor.checkpoint_blocks and torch.is_grad_enabled()

    def run(self, block, experts, *streams):
        """block(expert, *tensors) -> tensor, for each expert with its own entry of each stream."""
        outs = []
        for expert, *args in zip(experts, *streams):
            if self.checkpointing:
                outs.append(checkpoint(lambda *a, e=expert: block(e, *a), *args, use_reentrant=False))
            else:
                outs.append(block(expert, *args))
        return outs

    def mix(self, point, outs, temb, cbar):
        """N features (batch, C, *spatial) -> [mixed] * N, or the N streams unmixed when the mixer
        says so (None) at this point."""
        if len(outs) == 1:
            return outs
        w = self.mixer.weights(point, outs, temb, cbar)
        if w is None:
            return outs
        if self.ctx.recorder is not None:
            self.ctx.recorder(point, w, self.ctx)
        # sum_i w_i y_i written as y_1 + sum_{i>1} w_i (y_i - y_1) (equal, as sum_i w_i = 1):
        # identical experts then give y_1 exactly, whatever the weights. No stacked copy of the N maps.
        w = w.unsqueeze(2)  # (batch, models, 1, *spatial)
        mixed = outs[0]
        for i in range(1, len(outs)):
            mixed = torch.addcmul(mixed, w[:, i], outs[i] - outs[0])
        return [mixed] * len(outs)


def mixer_for(spec: EnsembleSpec, layout: Layout, num_models: int, aggregator=None) -> "Mixer":
    """The mixer of a checked spec (mode SINGLE_MODEL: one expert runs, nothing to mix)."""
    points = len(layout.points)
    mode = spec.mode
    if mode is Mode.AGGREGATOR:
        if aggregator is None:
            raise AFAError("mode 'aggregator' needs an aggregator module.")
        return SABWMixer(aggregator, refresh_every=spec.map_refresh, full_res=spec.full_res)
    if mode is Mode.BLOCK_AVERAGE:
        return uniform_mixer(points, num_models)
    if mode is Mode.NOISE_AVERAGE:
        return noise_average_mixer(points, num_models)
    if mode is Mode.FIXED_WEIGHTS:
        return fixed_weights_mixer(layout, parse_weights(spec.weights, num_models))
    return uniform_mixer(points, 1)


class BlockScalarMixer(torch.nn.Module, Mixer):
    """Trainable ablation "without spatial maps": one learnable logit per model per point,
    softmax over models (no features, timestep or text input). Zero logits = 1/N."""

    def __init__(self, num_points: int, num_models: int):
        torch.nn.Module.__init__(self)
        self.logits = torch.nn.Parameter(torch.zeros(num_points, num_models))

    def weights(self, point, features, temb, context):
        w = torch.softmax(self.logits[point].float(), dim=0).to(features[0].dtype)
        return w.view(1, -1, 1, 1).expand(features[0].shape[0], -1, 1, 1)
