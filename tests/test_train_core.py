"""Host-free training loop (afa_nodes.core.train) with toy experts. No ComfyUI needed."""
import dataclasses

import pytest
import torch

from afa_nodes.core.aggregator_file import load_aggregator
from afa_nodes.core.errors import TrainingError
from afa_nodes.core.layout import AggregationPoint, UNetLayout
from afa_nodes.core.train import (AggregatorTrainer, Comm, NoiseSchedule, TrainConfig, TrainData, format_validation,
                                  lr_at, state_path, train_aggregator)

C, CTX, TEMB, M = 8, 8, 16, 1.0



pytestmark = pytest.mark.usefixtures("one_thread")
SCHEDULE = NoiseSchedule(torch.linspace(0.5, 2.0, 20))
LAYOUT = UNetLayout(points=(AggregationPoint("input", 0, C), AggregationPoint("middle", 0, C),
                            AggregationPoint("final", 0, 4)), context_dim=CTX, time_embed_dim=TEMB, adm_dim=0)


class KindExpert:
    """A perfect denoiser for images that are the constant `sign * M` (plus a little texture):
    eps_hat = (x_t - sign*M) / sigma. Two of them with opposite signs are each right on half of
    the data and wrong on the other half, so only a per-sample choice of expert is right."""

    def __init__(self, sign):
        self.sign, self.poison = sign, False

    def embed(self, timesteps, y, dtype):
        t = timesteps.to(dtype)
        freqs = torch.arange(1, TEMB, dtype=dtype)
        return torch.cat([t[:, None], torch.sin(t[:, None] * freqs / 7)], dim=1)  # column 0 carries t

    def run_block(self, stage, index, h, emb, context, output_shape=None):
        if stage == "input":
            return torch.cat([h, torch.zeros_like(h)], dim=1)  # carry x_in in channels 0..3
        if stage == "middle":
            return h
        sigma = SCHEDULE.sigmas[emb[:, 0].round().long()].view(-1, 1, 1, 1)
        x_t = h[:, :4] * (sigma ** 2 + 1) ** 0.5
        eps = (x_t - self.sign * M) / sigma
        if self.poison:
            eps = eps * float("nan")
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    def head(self, h):
        return h[:, :4]


def make_data(n_train=24, n_val=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = {+1: torch.randn(3, CTX, generator=g), -1: torch.randn(3, CTX, generator=g)}

    def sample(k):
        kind = 1 if k % 2 == 0 else -1
        latent = kind * M + 0.1 * torch.randn(4, 6, 6, generator=g)
        return {"latent": latent, "contexts": [captions[kind]] * 2, "kind": kind}
    samples = [sample(k) for k in range(n_train + n_val)]
    return TrainData(train=samples[:n_train], val=samples[n_train:], empty_contexts=[torch.zeros(3, CTX)] * 2)


def config(**kw):
    base = dict(steps=8, batch_size=4, lr=2e-3, warmup_steps=3, save_every=4, seed=0,
                hidden=32, heads=4, depth=1, caption_dropout=0.1)
    base.update(kw)
    return TrainConfig(**base)


def experts():
    return [KindExpert(+1), KindExpert(-1)]


INFO = [{"name": "plus.safetensors", "sha256": "aa" * 32}, {"name": "minus.safetensors", "sha256": "bb" * 32}]


def run(tmp_path, name="agg.safetensors", data=None, exps=None, info=INFO, **kw):
    callbacks = {k: kw.pop(k, None) for k in ("should_stop", "progress", "on_save")}
    resume = kw.pop("resume", False)
    return train_aggregator(exps or experts(), LAYOUT, data or make_data(), SCHEDULE, config(**kw), tmp_path / name,
                            info, resume=resume, **callbacks)


def test_lr_warmup_is_linear_then_constant():
    cfg = TrainConfig(lr=1e-4, warmup_steps=4)
    assert [lr_at(s, cfg) for s in range(6)] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4, 1e-4])
    assert lr_at(0, TrainConfig(lr=3e-4, warmup_steps=0)) == 3e-4


def test_training_learns_to_pick_the_right_expert(tmp_path):
    seen = []
    result = run(tmp_path, steps=30, save_every=15, progress=lambda s, total, loss: seen.append((s, total, loss)))
    losses = [h[1] for h in result.history]
    assert [s for s, _, _ in seen] == list(range(1, 31)) and seen[-1][1] == 30
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5
    rows = {r["name"]: r["loss"] for r in result.validation["rows"]}
    trained, uniform = rows["AFA aggregator (trained)"], rows["block-wise average (untrained)"]
    singles = [rows["single model: plus.safetensors"], rows["single model: minus.safetensors"]]
    assert trained < 0.5 * uniform and uniform < min(singles)
    # step 0: a zero-initialised aggregator IS the block-wise average
    assert result.val_history[0] == [0, pytest.approx(uniform, rel=1e-5)]

    meta = load_aggregator(tmp_path / "agg.safetensors").training
    assert meta["step"] == 30 and meta["finished"] and meta["samples_seen"] == 120
    assert meta["data"] == {"train_samples": 24, "val_samples": 8}
    assert meta["final_val_loss"] == pytest.approx(trained) and meta["final_train_loss"] < losses[0]
    assert meta["validation"]["rows"][0]["loss"] == pytest.approx(trained)
    assert load_aggregator(tmp_path / "agg.safetensors").experts == INFO
    report = format_validation(result.validation, result.metadata)
    assert "AFA aggregator (trained)" in report and "<- best" in report.splitlines()[2]


def _state(path):
    agg = load_aggregator(path).build().state_dict()
    side = torch.load(state_path(path), weights_only=True)
    return agg, side


def _assert_same_run(a, b):
    (agg_a, side_a), (agg_b, side_b) = _state(a), _state(b)
    assert agg_a.keys() == agg_b.keys()
    for k in agg_a:
        assert torch.equal(agg_a[k], agg_b[k]), k
    assert side_a["step"] == side_b["step"] and side_a["position"] == side_b["position"]
    for pa, pb in zip(side_a["optimizer"]["state"].values(), side_b["optimizer"]["state"].values()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(pa[k], pb[k])


def test_resume_continues_exactly(tmp_path):
    run(tmp_path, "straight.safetensors", steps=8)
    first = run(tmp_path, "resumed.safetensors", steps=4)
    assert first.step == 4 and state_path(tmp_path / "resumed.safetensors").exists()
    again = run(tmp_path, "resumed.safetensors", steps=8, resume=True)
    assert again.step == 8 and [h[0] for h in again.history] == list(range(1, 9))
    _assert_same_run(tmp_path / "straight.safetensors", tmp_path / "resumed.safetensors")


def test_cancel_leaves_a_resumable_file(tmp_path):
    run(tmp_path, "straight.safetensors", steps=8)
    steps = []
    result = run(tmp_path, "cancelled.safetensors", steps=8, save_every=0,
                 progress=lambda s, t, loss: steps.append(s), should_stop=lambda: len(steps) >= 3)
    assert result.stopped and result.step == 3
    meta = load_aggregator(tmp_path / "cancelled.safetensors").training
    assert meta["step"] == 3 and not meta["finished"]
    resumed = run(tmp_path, "cancelled.safetensors", steps=8, save_every=0, resume=True)
    assert not resumed.stopped and resumed.step == 8
    _assert_same_run(tmp_path / "straight.safetensors", tmp_path / "cancelled.safetensors")


def test_stop_before_the_first_step_leaves_an_existing_file_untouched(tmp_path):
    run(tmp_path, "kept.safetensors", steps=2)
    before = (tmp_path / "kept.safetensors").read_bytes()
    result = run(tmp_path, "kept.safetensors", steps=4, should_stop=lambda: True)
    assert result.stopped and result.step == 0 and result.path is None
    assert (tmp_path / "kept.safetensors").read_bytes() == before


def test_nan_loss_stops_and_keeps_the_last_good_file(tmp_path):
    exps = experts()

    def progress(step, total, loss):
        if step == 5:
            exps[1].poison = True
    with pytest.raises(TrainingError, match=r"loss became nan at step 6.*kept: .*agg.safetensors \(step 4\)"):
        run(tmp_path, exps=exps, steps=10, save_every=2, progress=progress)
    kept = load_aggregator(tmp_path / "agg.safetensors")
    assert kept.training["step"] == 4 and not kept.training["finished"]
    assert all(torch.isfinite(v).all() for v in kept.state_dict.values())
    assert torch.load(state_path(tmp_path / "agg.safetensors"), weights_only=True)["step"] == 4


def test_caption_dropout_is_per_sample():
    data = make_data()
    trainer = AggregatorTrainer(experts(), LAYOUT, data, SCHEDULE, config(caption_dropout=0.5, batch_size=16))
    batch = trainer.make_batch(list(range(16)))
    assert 0 < int(batch.dropped.sum()) < 16  # mixed inside one batch, not all-or-nothing
    order = trainer.order.epoch(0)
    for row, dropped in enumerate(batch.dropped.tolist()):
        want = torch.zeros(3, CTX) if dropped else data.train[order[row]]["contexts"][0]
        for ctx in batch.contexts:
            assert torch.equal(ctx[row], want)
    drops = torch.cat([trainer.make_batch(list(range(s, s + 16))).dropped for s in range(0, 160, 16)])
    assert 0.35 < drops.float().mean() < 0.65
    none = AggregatorTrainer(experts(), LAYOUT, data, SCHEDULE, config(caption_dropout=0.0, batch_size=16))
    assert not none.make_batch(list(range(16))).dropped.any()


def _grads(trainer):
    loss = trainer.compute_gradients()
    return loss, [p.grad.clone() for p in trainer.params]


def in_float64(trainer):
    """Run this trainer's forward and backward in float64 (for the gradient-equality tests).

    The same gradient summed in another order (another micro-batch split, other shards) differs
    in float32 by ~1e-7 of the terms summed, and some of these gradients are exactly zero in
    exact arithmetic (GroupNorm(32, 32) removes the per-channel offsets of res_block.conv1.bias
    and time_emb_proj), so float32 can leave them as pure noise (1e-8..1e-7) that no tolerance
    relative to the tensor itself separates from a real difference. In float64 that noise is
    ~1e-16 of the gradient scale: the comparison stays tight and cannot flake.
    The trainer casts its aggregator and every batch to float32, so both are moved here."""
    trainer.aggregator.double()
    assert all(p.dtype == torch.float64 for p in trainer.params)
    make = trainer.make_batch

    def make_batch(*args, **kwargs):
        b = make(*args, **kwargs)
        return dataclasses.replace(b, latents=b.latents.double(), noise=b.noise.double(),
                                   contexts=[c.double() for c in b.contexts],
                                   ys=None if b.ys is None else [y.double() for y in b.ys])
    trainer.make_batch = make_batch
    # move away from the zero-initialised conv_out so the gradients upstream of it are non-trivial
    torch.nn.init.normal_(trainer.aggregator.blocks[2].conv_out.weight, std=0.1,
                          generator=torch.Generator().manual_seed(1))
    return trainer


def assert_same_gradients(got, want):
    """float64 gradients equal up to float64 rounding: within 1e-10 of the largest gradient
    (the observed difference is ~1e-14 of it) -- a wrong accumulation (a missing 1/grad_accum,
    a lost shard or micro-batch, a sample counted twice) is off by a large part of the gradient."""
    assert len(got) == len(want) and all(g.dtype == torch.float64 for g in got + want)
    scale = max(float(g.abs().max()) for g in want)
    assert scale > 0.1  # the gradients are not trivially zero
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10 * scale, msg=lambda m, i=i: f"parameter {i}: {m}")


def test_gradient_accumulation_matches_one_large_batch():
    data = make_data()
    big = in_float64(AggregatorTrainer(experts(), LAYOUT, data, SCHEDULE, config(batch_size=4, grad_accum=1)))
    acc = in_float64(AggregatorTrainer(experts(), LAYOUT, data, SCHEDULE, config(batch_size=2, grad_accum=2)))
    (loss_big, g_big), (loss_acc, g_acc) = _grads(big), _grads(acc)
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)  # the trainer sums the loss in float32
    assert_same_gradients(g_acc, g_big)


class ShardComm(Comm):
    """One rank of a pretend world; all_reduce is left to the test (it sums the ranks)."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size


def test_data_parallel_shards_add_up_to_the_single_process_gradient():
    data = make_data()
    single = in_float64(AggregatorTrainer(experts(), LAYOUT, data, SCHEDULE, config(batch_size=4)))
    ranks = [in_float64(AggregatorTrainer(experts(), LAYOUT, data, SCHEDULE, config(batch_size=4), comm=ShardComm(r, 2)))
             for r in range(2)]
    loss, g_single = _grads(single)
    parts = [_grads(t) for t in ranks]
    assert parts[0][0] + parts[1][0] == pytest.approx(loss, rel=1e-6)  # the trainer sums the loss in float32
    assert_same_gradients([a + b for a, b in zip(parts[0][1], parts[1][1])], g_single)


def test_resume_with_other_experts_is_refused(tmp_path):
    run(tmp_path, steps=2)
    other = [INFO[0], {"name": "other.safetensors", "sha256": "cc" * 32}]
    with pytest.raises(TrainingError, match=r"trained on \[plus.safetensors .*minus.safetensors.*models now are .*other.safetensors"):
        run(tmp_path, info=other, steps=4, resume=True)


def test_bad_settings_raise_typed_errors():
    with pytest.raises(TrainingError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(TrainingError, match="caption_dropout"):
        TrainConfig(caption_dropout=1.0)
    with pytest.raises(TrainingError, match="empty"):
        AggregatorTrainer(experts(), LAYOUT, TrainData(train=[]), SCHEDULE, config())


# ------------------------------------------------------------------ crops and aspect-ratio buckets
from afa_nodes.core.train_data import DataOrder, validation_batches  # noqa: E402

WIDE, TALL = (4, 4, 8), (4, 8, 4)


class CroppedSamples(list):
    """Train samples with 3 cached 'crops' each; at(k, epoch) picks one from (epoch, k) and records it."""

    def __init__(self, samples):
        super().__init__(samples)
        self.seen = []

    def at(self, k, epoch):
        v = (7 * epoch + k) % 3
        self.seen.append((k, epoch, v))
        s = self[k]
        return dict(s, latent=s["latent"] + 0.05 * v)


def bucket_data(n_wide=9, n_tall=5, n_val=5):
    """A wide and a tall bucket (latent shapes WIDE and TALL) of the two kinds of KindExpert data."""
    g = torch.Generator().manual_seed(3)
    captions = {+1: torch.randn(3, CTX, generator=g), -1: torch.randn(3, CTX, generator=g)}

    def sample(k, shape):
        kind = 1 if k % 2 == 0 else -1
        return {"latent": kind * M + 0.1 * torch.randn(shape, generator=g), "contexts": [captions[kind]] * 2}
    shapes = [WIDE] * n_wide + [TALL] * n_tall
    train = CroppedSamples([sample(k, s) for k, s in enumerate(shapes)])
    val_shapes = [WIDE, TALL] * n_val
    val = [sample(k, s) for k, s in enumerate(val_shapes[:n_val])]
    return TrainData(train=train, val=val, empty_contexts=[torch.zeros(3, CTX)] * 2,
                     train_buckets=[s[1:] for s in shapes], val_buckets=[s[1:] for s in val_shapes[:n_val]])


def test_bucketed_order_keeps_every_batch_in_one_bucket_and_sees_every_sample():
    keys = ["wide"] * 9 + ["tall"] * 5 + ["tiny"]  # "tiny" is smaller than one batch
    order = DataOrder(len(keys), batch_size=4, seed=0, buckets=keys)
    assert order.bucketed and order.epoch_length == 12 + 8 + 4
    for e in range(3):
        epoch = order.epoch(e)
        assert set(epoch) == set(range(15))
        for s in range(0, len(epoch), 4):
            assert len({keys[k] for k in epoch[s:s + 4]}) == 1
    assert order.epoch(0) != order.epoch(1)
    assert DataOrder(15, 4, 0, keys).epoch(1) == order.epoch(1)  # a pure function of (seed, epoch)
    assert DataOrder(15, 4, 1, keys).epoch(1) != order.epoch(1)
    # one bucket = the plain permutation (batches may span epochs)
    plain = DataOrder(15, 4, 0, ["one"] * 15)
    assert not plain.bucketed and plain.epoch_length == 15 and plain.epoch(0) == DataOrder(15, 4, 0).epoch(0)
    # validation: per bucket, a strided share per rank, each batch inside one bucket
    vkeys = ["a", "b", "a", "a", "b"]
    ranks = [validation_batches(5, 2, r, 2, vkeys) for r in range(2)]
    assert sorted(k for batches in ranks for b in batches for k in b) == list(range(5))
    assert all(len({vkeys[k] for k in b}) == 1 for batches in ranks for b in batches)


def test_bucketed_training_batches_have_one_shape_and_resume_exactly(tmp_path):
    data = bucket_data()
    trainer = AggregatorTrainer(experts(), LAYOUT, data, SCHEDULE, config(batch_size=4, grad_accum=2))
    shapes = [tuple(trainer.make_batch(list(range(p, p + 4))).latents.shape[1:])
              for p in range(0, 3 * trainer.order.epoch_length, 4)]
    assert set(shapes) == {WIDE, TALL}
    epochs = {}
    for k, e, v in data.train.seen:
        epochs.setdefault(k, set()).add(v)
    assert all(len(v) > 1 for v in epochs.values())  # the crop changes with the epoch
    kw = dict(data=data, batch_size=4, grad_accum=2, save_every=3)
    run(tmp_path, "straight.safetensors", steps=7, **kw)
    first = run(tmp_path, "resumed.safetensors", steps=3, **kw)
    assert first.step == 3
    again = run(tmp_path, "resumed.safetensors", steps=7, resume=True, **kw)
    assert again.step == 7 and again.validation["samples"] == 5
    _assert_same_run(tmp_path / "straight.safetensors", tmp_path / "resumed.safetensors")
    # a batch size that would cut a bucket's batch apart is refused, with the fix
    with pytest.raises(TrainingError, match="batch size 3.*saved with batch size 4"):
        run(tmp_path, "resumed.safetensors", steps=9, resume=True, data=data, batch_size=3, grad_accum=1)


def test_bucketed_data_parallel_shards_add_up_to_the_single_process_gradient():
    data = bucket_data()
    single = in_float64(AggregatorTrainer(experts(), LAYOUT, data, SCHEDULE, config(batch_size=4, grad_accum=2)))
    ranks = [in_float64(AggregatorTrainer(experts(), LAYOUT, data, SCHEDULE, config(batch_size=4, grad_accum=2),
                                          comm=ShardComm(r, 2))) for r in range(2)]
    for trainer in [single] + ranks:
        trainer.position = 8  # a later step: micro-batches from both buckets
    loss, g_single = _grads(single)
    parts = [_grads(t) for t in ranks]
    assert parts[0][0] + parts[1][0] == pytest.approx(loss, rel=1e-6)  # the trainer sums the loss in float32
    assert_same_gradients([a + b for a, b in zip(parts[0][1], parts[1][1])], g_single)
    # validation over both buckets: the ranks' shares (ShardComm does not sum) add up too
    assert sum(t.validation_loss() for t in ranks) == pytest.approx(single.validation_loss(), rel=1e-6)


def test_mixed_shapes_without_bucket_keys_raise_a_typed_error():
    data = bucket_data()
    data.train_buckets = None
    trainer = AggregatorTrainer(experts(), LAYOUT, data, SCHEDULE, config(batch_size=14))
    with pytest.raises(TrainingError, match="latents of different shapes.*bucket keys"):
        trainer.make_batch(list(range(14)))
