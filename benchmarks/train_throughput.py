"""Aggregator-training throughput and memory (issue: Train aggregators).

SD1.5 ARCHITECTURE at full size (random weights: timing needs no trained ones), synthetic
latents and text contexts, batch 1, the paper's SABW (d=128, 8 heads, depth 2). For N = 2, 3
models, with and without gradient checkpointing of the frozen blocks: images/s over a few
steps after warm-up, and the peak RSS of the process. Each configuration runs in its own
subprocess so its peak RSS is its own.

    python benchmarks/train_throughput.py                 # 256 px, N = 2 and 3 (slow on CPU)
    python benchmarks/train_throughput.py --models 2 --steps 5 --resolution 512
    python benchmarks/train_throughput.py --quick         # tiny UNet, 64 px, in-process smoke test
"""
import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afa_nodes import logger  # noqa: E402

from unet_configs import BASE, SD15_FULL, SD15_TINY  # noqa: E402


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_model(config, seed):
    """A ComfyUI BaseModel with the SD1.5 UNet config and seeded random weights."""
    import comfy.supported_models
    torch.manual_seed(seed)
    model = comfy.supported_models.SD15(dict(BASE, **config)).get_model({})
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.normal_(0, 0.02)
    model.diffusion_model.eval().requires_grad_(False)
    return model


def measure(n, checkpointing, quick, steps, warmup, resolution):
    """One configuration in this process -> dict of results."""
    from afa_nodes.core.layout import derive_layout
    from afa_nodes.core.sabw import count_parameters
    from afa_nodes.core.train import AggregatorTrainer, NoiseSchedule, TrainConfig, TrainData
    from afa_nodes.training_host import TrainingExpert
    models = [build_model(SD15_TINY if quick else SD15_FULL, seed) for seed in range(n)]
    unet_params = sum(p.numel() for p in models[0].diffusion_model.parameters())
    experts = [TrainingExpert(m.diffusion_model, m.get_dtype()) for m in models]
    layout = derive_layout(models[0].diffusion_model)
    side = resolution // 8
    g = torch.Generator().manual_seed(0)
    samples = [{"latent": torch.randn(4, side, side, generator=g),
                "contexts": [torch.randn(77, 768, generator=g) for _ in range(n)]} for _ in range(8)]
    data = TrainData(train=samples, empty_contexts=[torch.zeros(77, 768)] * n)
    size = dict(hidden=32, heads=4, depth=1) if quick else {}
    config = TrainConfig(steps=warmup + steps, batch_size=1, warmup_steps=0, save_every=0,
                         gradient_checkpointing=checkpointing, **size)
    trainer = AggregatorTrainer(experts, layout, data, NoiseSchedule.scaled_linear(), config)
    rss_before = peak_rss_mb()
    times = []

    def progress(step, total, loss):
        times.append(time.perf_counter())
    start = time.perf_counter()
    trainer.run(progress=progress)
    measured = times[-1] - (times[warmup - 1] if warmup else start)
    return {"models": n, "checkpointing": checkpointing, "resolution": resolution, "batch": 1,
            "steps": steps, "images_per_s": steps / measured, "s_per_step": measured / steps,
            "peak_rss_mb": peak_rss_mb(), "rss_before_training_mb": rss_before,
            "unet_params": unet_params, "aggregator_params": count_parameters(trainer.aggregator),
            "points": len(layout.points)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=int, nargs="+", default=[2, 3])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="measured steps after warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny UNet, 64 px, in one process (smoke test)")
    p.add_argument("--comfyui", default=None)
    p.add_argument("--one", nargs=2, metavar=("N", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.quick:
        args.resolution, args.steps, args.models = 64, 2, [2, 3]

    if args.one:  # child: one configuration, JSON on stdout
        from afa_nodes import comfy_env
        comfy_env.boot_comfyui(args.comfyui)
        out = measure(int(args.one[0]), args.one[1] == "on", args.quick, args.steps, args.warmup, args.resolution)
        print(json.dumps(out), flush=True)
        return 0

    configs = [(n, ckpt) for n in args.models for ckpt in (False, True)]
    rows = []
    if args.quick:
        from afa_nodes import comfy_env
        comfy_env.boot_comfyui(args.comfyui)
        rows = [measure(n, ckpt, True, args.steps, args.warmup, args.resolution) for n, ckpt in configs]
    else:
        for n, ckpt in configs:
            cmd = [sys.executable, __file__, "--one", str(n), "on" if ckpt else "off", "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--resolution", str(args.resolution)]
            cmd += ["--comfyui", args.comfyui] if args.comfyui else []
            done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if done.returncode != 0:
                logger.error("configuration N=%d checkpointing=%s failed:\n%s", n, ckpt, done.stderr[-3000:])
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(f"AFA aggregator training throughput ({'tiny UNet, quick' if args.quick else 'SD1.5 architecture, random weights'}), "
          f"{args.resolution}px, batch 1, {args.steps} steps after {args.warmup} warm-up; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + ("; quick mode runs in one process, so peak RSS is cumulative" if args.quick else ""))
    print(f"{'models':>6} {'grad ckpt':>9} {'images/s':>9} {'s/step':>8} {'peak RSS MB':>12} {'peak before train MB':>20} "
          f"{'SABW params':>12}")
    for r in rows:
        print(f"{r['models']:>6} {'on' if r['checkpointing'] else 'off':>9} {r['images_per_s']:>9.3f} "
              f"{r['s_per_step']:>8.2f} {r['peak_rss_mb']:>12.0f} {r['rss_before_training_mb']:>20.0f} "
              f"{r['aggregator_params']:>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
