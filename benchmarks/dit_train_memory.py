"""Peak memory of aggregator training on two tiny DiT experts (CPU), with and without gradient
checkpointing of the expert blocks (docs/dit-ensembles.md).

Two tiny FLUX.1 [dev]-style (hidden 64, 2 double + 2 single blocks) or SD3 (hidden 128, 2 joint
blocks) experts from ComfyUI's classes (afa_nodes.comfy_dit_models), synthetic latents and text,
the paper's SABW (d 128, 8 heads, depth 2), batch 2, a few optimizer steps. Reported: RSS after
ComfyUI is booted and the experts are loaded, the peak RSS during training (Linux VmHWM, reset
through /proc/self/clear_refs just before training) and the difference.

    python benchmarks/dit_train_memory.py --family flux --latent 32 [--checkpointing]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["flux", "sd3"], default="flux")
    parser.add_argument("--latent", type=int, default=32, help="latent side (8 px per latent pixel)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--comfyui", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from afa_nodes import comfy_env
    comfy_env.boot_comfyui(args.comfyui)
    from afa_nodes import comfy_dit_models as dm
    from afa_nodes.core.train import AggregatorTrainer, TrainConfig, TrainData
    from afa_nodes.service.models import ExpertSet
    from afa_nodes.training_host import experts_layout, load_experts, noise_schedule
    from afa_nodes.training_dit import differentiable_rope

    make = dm.flux_patcher if args.family == "flux" else dm.sd3_patcher
    experts = ExpertSet([make(1), make(2)], ["1", "2"], [None, None], [None, None])
    layout = experts_layout(experts)
    pooled = layout.vec_dim if args.family == "flux" else layout.adm_dim
    g = torch.Generator().manual_seed(0)

    def sample():
        return {"latent": torch.randn(16, args.latent, args.latent, generator=g),
                "contexts": [torch.randn(77, layout.context_dim, generator=g)] * 2,
                "ys": [torch.randn(pooled, generator=g)] * 2}
    data = TrainData(train=[sample() for _ in range(4)], val=[])
    config = TrainConfig(steps=args.steps, batch_size=2, lr=1e-3, save_every=0, caption_dropout=0.0,
                         gradient_checkpointing=args.checkpointing)
    with torch.inference_mode(False), torch.enable_grad(), differentiable_rope():
        loaded = load_experts(experts, layout)
        trainer = AggregatorTrainer(loaded, layout, data, noise_schedule(experts), config)
        before = rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        trainer.run()
        peak = rss_kib("VmHWM")
    result = {"family": args.family, "latent": args.latent, "tokens": (args.latent // 2) ** 2,
              "checkpointing": args.checkpointing, "rss_before_mb": round(before / 1024, 1),
              "peak_mb": round(peak / 1024, 1), "training_adds_mb": round((peak - before) / 1024, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
