"""The README's win-map pictures, reproducibly, from tiny models (benchmarks/quality.py's setup).

Two experts fine-tuned from one tiny base UNet (ComfyUI's UNetModel, 32/64 channels): expert 1
mostly on "blobs" latents (blobs in the TOP half), expert 2 mostly on "stripes" (stripes in the
BOTTOM half). Their win map on held-out "both" latents (blobs on top AND stripes below) should
show expert 1 winning the top regions and expert 2 the bottom ones: complementary models, the
case AFA is for. An SABW aggregator is then trained on all kinds and evaluated beside each
expert on the same held-out latents (core.winmap.measure with the ensemble).

    python benchmarks/winmap_picture.py          # writes docs/images/winmap_overview.png,
                                                 # docs/images/winmap_evaluation.png (~2-4 min CPU)
    python benchmarks/winmap_picture.py --quick  # smoke run, writes nothing unless --out is given
"""
import argparse
import logging
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import quality  # noqa: E402

from afa_nodes import logger  # noqa: E402

SETTINGS = {
    "full": dict(quality.SETTINGS["full"], seeds=[0], train=600, base_steps=150, expert_steps=150, agg_steps=100,
                 held_out=16, steps=4, noise_seeds=4, grid=8),
    "quick": dict(quality.SETTINGS["quick"], seeds=[0], held_out=2, steps=2, noise_seeds=1, grid=4),
}
NAMES = ["expert 1 (blobs, top)", "expert 2 (stripes, bottom)"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default docs/images; "
                                                          "--quick writes none unless given)")
    p.add_argument("--comfyui", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    start = time.perf_counter()
    from afa_nodes.comfy_env import boot_comfyui
    # torch's attention: ComfyUI's sub-quadratic one (picked when free memory looks short) cannot backprop
    boot_comfyui(args.comfyui, extra_args=["--use-pytorch-cross-attention"])
    from afa_nodes.comfy_unet import ComfyExpert
    from afa_nodes.core.ensemble import EnsembleExecutor
    from afa_nodes.core.image_file import save_png
    from afa_nodes.core.layout import derive_layout
    from afa_nodes.core.train import NoiseSchedule
    from afa_nodes.core.winmap import Ensembled, measure
    from afa_nodes.core.winmap_render import render_eval_plot, render_overview

    cfg = SETTINGS["quick" if args.quick else "full"]
    out = args.out or (None if args.quick else HERE.parent / "docs" / "images")
    schedule, ctx_table = NoiseSchedule.scaled_linear(), quality.caption_table()
    latents, kinds, _, unets, _ = quality.train_experts(0, cfg, schedule, ctx_table)
    layout = derive_layout(unets[0])
    experts = [ComfyExpert(u, {}, torch.empty(0), {}) for u in unets]
    both = quality.KINDS.index("both")
    g = torch.Generator().manual_seed(77)
    samples = [{"latent": quality.make_latent(both, g), "contexts": [ctx_table[both]] * 2}
               for _ in range(cfg["held_out"])]
    mixer, params = quality.make_mixer("sabw_full", layout, 2, 0)
    executor = EnsembleExecutor(layout, mixer)
    quality.train_mixer(params, executor, unets, schedule, latents, kinds, ctx_table, cfg["agg_steps"],
                        cfg["agg_batch"], cfg["agg_lr"], 20)
    mixer.aggregator.eval()
    table = measure(experts, layout, schedule, samples, NAMES, cfg["steps"], range(cfg["noise_seeds"]), cfg["grid"],
                    ensemble=Ensembled("AFA (trained SABW)", executor, [0, 1]))
    winners = table.winners()                                    # (steps, gh, gw)
    top, bottom = winners[:, : table.grid[0] // 2], winners[:, table.grid[0] // 2:]
    logger.info("verdict: %s", table.verdict())
    logger.info("top half won by expert 1: %.0f%%, bottom half won by expert 2: %.0f%%",
                100 * float((top == 0).float().mean()), 100 * float((bottom == 1).float().mean()))
    for row in table.rows():
        logger.info("  %-28s %.4f  per step %s", row["name"], row["loss"], ", ".join(f"{v:.4f}" for v in row["per_step"]))
    if out is not None:
        save_png(render_overview(table)[0], out / "winmap_overview.png")
        save_png(render_eval_plot(table)[0], out / "winmap_evaluation.png")
        logger.info("wrote %s/winmap_overview.png and winmap_evaluation.png", out)
    logger.info("runtime %.0f s", time.perf_counter() - start)
    return table


if __name__ == "__main__":
    main()
