"""What the cheaper full-resolution options cost in quality (issue #15 part 3), on the toy of
benchmarks/quality.py: per seed, 2 experts fine-tuned from a tiny base UNet and one full SABW
trained on them the exact way (hidden 32, 4 heads, depth 1; its full-resolution points are the
16x16 latent's). The SAME trained weights are then run with each EnsembleSpec.full_res option.

    eps-MSE              held-out latents at fixed noise and timesteps (lower is better)
    x0-MSE               the first 48 held-out latents noised to t=600, denoised back with Euler
                         in 10 steps (lower is better)
    distance to exact    RMS distance of those final latents to the exact option's

With map_refresh 2 (alone and with half resolution) the maps are computed at every second of the
10 Euler steps (eps-MSE scores single calls, so it is the option's own there). Run-to-run noise
of the exact design, for scale: a second SABW trained exactly like the first
but from another seed (init and batches), scored the same way; "block-wise average" (no maps)
is the whole effect of the maps.

    python benchmarks/full_res_quality.py              # 3 seeds (~3 min per seed on an idle core)
    python benchmarks/full_res_quality.py --quick      # smoke run (< 1 min)
"""
import argparse
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from afa_nodes import logger  # noqa: E402

import quality  # noqa: E402

STEPS = 10


def trained_sabw(layout, unets, schedule, data, ctx_table, cfg, seed):
    from afa_nodes.core.ensemble import EnsembleExecutor
    mixer, params = quality.make_mixer("sabw_full", layout, len(unets), seed)
    latents, kinds = data
    quality.train_mixer(params, EnsembleExecutor(layout, mixer), unets, schedule, latents, kinds, ctx_table,
                        cfg["agg_steps"], cfg["agg_batch"], cfg["agg_lr"], seed * 1000 + 20)
    return mixer.aggregator.eval()


def run_seed(seed, cfg, schedule, ctx_table):
    """{variant: (eps-MSE, x0-MSE, final latents)} for one seed."""
    from afa_nodes.core.ensemble import EnsembleExecutor, SABWMixer, uniform_mixer
    from afa_nodes.core.layout import derive_layout
    from afa_nodes.core.spec import FullRes
    t0 = time.perf_counter()
    latents, kinds, val, unets, _ = quality.train_experts(seed, cfg, schedule, ctx_table)
    layout = derive_layout(unets[0])
    first = trained_sabw(layout, unets, schedule, (latents, kinds), ctx_table, cfg, seed)
    second = trained_sabw(layout, unets, schedule, (latents, kinds), ctx_table, cfg, seed + 100)
    mixers = {str(option): SABWMixer(first, full_res=option) for option in FullRes}
    mixers["map_refresh 2"] = SABWMixer(first, refresh_every=2)   # maps every 2nd of the 10 steps (x0, latent)
    mixers[f"{FullRes.HALF} + map_refresh 2"] = SABWMixer(first, full_res=FullRes.HALF, refresh_every=2)
    mixers["exact, second training"] = SABWMixer(second)
    mixers["block-wise average"] = uniform_mixer(len(layout.points), len(unets))
    out = {}
    for name, mixer in mixers.items():
        executor = EnsembleExecutor(layout, mixer)
        eps = float(quality.evaluate(executor, unets, val, ctx_table).mean())
        x0, final = quality.denoise(executor, unets, schedule, val, ctx_table, STEPS, seed * 1000 + 30)
        out[name] = (eps, float(x0.mean()), final)
    logger.info("seed %d (%.0f s): %s", seed, time.perf_counter() - t0,
                ", ".join(f"{k} {v[0]:.4f}" for k, v in out.items()))
    return out


def table(per_seed):
    exact = str(next(iter(per_seed[0])))
    lines = ["| variant (same trained SABW unless noted) | eps-MSE | x0-MSE (10 steps) | "
             "final-latent RMS distance to exact |", "|---|---|---|---|"]
    for name in per_seed[0]:
        eps = [r[name][0] for r in per_seed]
        x0 = [r[name][1] for r in per_seed]
        dist = [float((r[name][2] - r[exact][2]).square().mean().sqrt()) for r in per_seed]
        spread = lambda v: f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else ""  # noqa: E731
        lines.append(f"| {name} | {statistics.mean(eps):.4f}{spread(eps)} | {statistics.mean(x0):.4f}{spread(x0)} | "
                     f"{statistics.mean(dist):.4f} |")
    lines.append("per seed eps-MSE: " + "; ".join(
        f"seed {i}: " + ", ".join(f"{k} {v[0]:.4f}" for k, v in r.items()) for i, r in enumerate(per_seed)))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--comfyui", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from afa_nodes.comfy_env import boot_comfyui
    boot_comfyui(args.comfyui)
    from afa_nodes.core.train import NoiseSchedule
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(quality.SETTINGS["quick" if args.quick else "full"])
    cfg["seeds"] = args.seeds or cfg["seeds"]
    start = time.perf_counter()
    schedule, ctx_table = NoiseSchedule.scaled_linear(), quality.caption_table()
    per_seed = [run_seed(s, cfg, schedule, ctx_table) for s in cfg["seeds"]]
    result = table(per_seed)
    logger.info("\n%s\nseeds %s, runtime %.0f s; command: python benchmarks/full_res_quality.py %s | %s, torch %s, "
                "%d threads", result, cfg["seeds"], time.perf_counter() - start,
                " ".join(argv if argv is not None else sys.argv[1:]), platform.machine(), torch.__version__,
                torch.get_num_threads())
    return per_seed, result


if __name__ == "__main__":
    main()
