"""Mixed-precision training (host-free, toy experts of test_train_core): bf16 autocast on the CPU
runs the aggregator's matmuls/convolutions in bf16 while its weights, optimizer state, softmax
and loss stay fp32, and its loss tracks the fp32 run step by step."""
import math

import pytest
import torch

from afa_nodes.core.train import AggregatorTrainer, state_path
from afa_nodes.core.train_config import amp_dtype
from test_train_core import INFO, LAYOUT, SCHEDULE, config, experts, make_data

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 12
# Allowed per-step gap |loss_bf16 - loss_fp32| / loss_fp32: 1%. bf16 keeps 8 mantissa bits
# (relative rounding 2**-9 = 0.002 per operation). Measured on this toy (loss 1.16 -> 0.18 in
# 12 steps): max gap 0.00045, mean 0.00019.
RELATIVE = 0.01


def trainer(tmp_path, mixed_precision):
    return AggregatorTrainer(experts(), LAYOUT, make_data(), SCHEDULE,
                             config(steps=STEPS, save_every=STEPS, mixed_precision=mixed_precision),
                             tmp_path / f"agg-{mixed_precision}.safetensors", INFO)


def test_amp_dtype_on_cpu():
    cpu = torch.device("cpu")
    assert amp_dtype("bf16", cpu) == torch.bfloat16 and amp_dtype("fp16", cpu) == torch.float16
    assert amp_dtype("auto", cpu) is None and amp_dtype("no", cpu) is None   # auto: fp32 on the CPU


def test_bf16_autocast_loss_tracks_the_fp32_loss(tmp_path):
    runs, seen = {}, {}
    for mode in ("no", "bf16"):
        t = trainer(tmp_path, mode)
        dtypes = set()
        hooks = [m.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
                 for m in (t.aggregator.blocks[0].conv_in, t.aggregator.blocks[0].conv_out)]
        result = t.run()
        for h in hooks:
            h.remove()
        runs[mode], seen[mode] = [loss for _, loss in result.history], dtypes
        assert {p.dtype for p in result.aggregator.parameters()} == {torch.float32}
    assert seen == {"no": {torch.float32}, "bf16": {torch.bfloat16}}   # autocast really ran the layers in bf16
    fp32, bf16 = runs["no"], runs["bf16"]
    assert len(fp32) == len(bf16) == STEPS
    gaps = [abs(a - b) / b for a, b in zip(bf16, fp32)]
    assert max(gaps) <= RELATIVE, gaps
    assert 0 < max(gaps)   # the runs differ: bf16 was not a no-op
    assert sum(fp32[-3:]) < sum(fp32[:3]) and sum(bf16[-3:]) < sum(bf16[:3])   # both learn



def test_fp16_training_on_the_cpu_scales_the_loss_for_the_cpu(tmp_path):
    """fp16 autocast needs loss scaling; the scaler must belong to the trainer's device (a CUDA
    scaler on a CPU run disables itself: no scaling, nothing saved for resume)."""
    t = trainer(tmp_path, "fp16")
    assert t.amp_dtype == torch.float16 and t.scaler is not None and t.scaler.is_enabled()
    dtypes = set()
    hook = t.aggregator.blocks[0].conv_in.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    losses = [loss for _, loss in t.run().history]
    hook.remove()
    assert dtypes == {torch.float16}
    # GradScaler starts at 2**16 and halves on each overflowing (skipped) step; a disabled one reports 1.0.
    # Measured here: 2**14 after 12 steps (2 skipped at the start).
    scale = t.scaler.get_scale()
    assert 2 ** 10 <= scale <= 2 ** 16 and math.log2(scale).is_integer()
    side = torch.load(state_path(tmp_path / "agg-fp16.safetensors"), weights_only=True)
    assert side["scaler"]["scale"] == scale              # a resume keeps the scale
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses   # it learns (measured 0.33 vs 0.92 per step)
