"""Per-step cost of an AFA ensemble vs the sum of N single-model steps (issue: benchmarks).

SD1.5 architecture at full size (random weights: timing does not need trained ones),
one sampling step = one UNet call at batch 2 (CFG). For each N the AFA step and the N
single steps are measured interleaved in one process, repeated, and medians compared.

    python benchmarks/inference_cost.py                 # 256 px, N = 2, 3
    python benchmarks/inference_cost.py --size 512 --models 2 3 --repeats 5
    python benchmarks/inference_cost.py --quick         # tiny UNet, smoke test
"""
import argparse
import datetime
import logging
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afa_nodes import logger  # noqa: E402

from unet_configs import BASE, SD15_FULL, SD15_TINY  # noqa: E402


def build_unet(config, seed):
    import comfy.supported_models
    torch.manual_seed(seed)
    model = comfy.supported_models.SD15(dict(BASE, **config)).get_model({})
    unet = model.diffusion_model.eval().requires_grad_(False)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    return unet


def build_afa_step(unets, aggregator_config):
    """A callable running one AFA UNet call exactly as the DIFFUSION_MODEL wrapper does."""
    from afa_nodes.core.ensemble import EnsembleExecutor, SABWMixer
    from afa_nodes.core.layout import derive_layout
    from afa_nodes.core.sabw import Aggregator, SABWConfig, count_parameters
    from afa_nodes.ensemble_model import ComfyExpert, ComfyHooks
    layout = derive_layout(unets[0])
    agg = Aggregator(layout.point_channels, SABWConfig(len(unets), **aggregator_config)).eval().requires_grad_(False)
    with torch.no_grad():
        for block in agg.blocks:
            block.conv_out.weight.normal_(0, 0.1)  # non-uniform weights: the real work
    executor = EnsembleExecutor(layout, SABWMixer(agg))
    spent = [0.0]  # seconds inside the aggregator: where the overhead goes
    forward = agg.forward

    def timed_forward(*args):
        start = time.perf_counter()
        out = forward(*args)
        spent[0] += time.perf_counter() - start
        return out
    agg.forward = timed_forward

    def step(x, t, c):
        experts = [ComfyExpert(u, {}, x, {}) for u in unets]
        return executor(experts, x, t, [c] * len(unets), None, ComfyHooks(None, {}))
    return step, count_parameters(agg), spent


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--models", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny UNet, 64 px, 2 repeats (smoke test)")
    p.add_argument("--comfyui", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from afa_nodes.comfy_env import boot_comfyui
    boot_comfyui(args.comfyui)
    config = SD15_TINY if args.quick else SD15_FULL
    size, repeats = (64, 2) if args.quick else (args.size, args.repeats)
    agg_config = dict(hidden=32, heads=4, depth=1) if args.quick else {}  # paper size by default
    unets = [build_unet(config, seed) for seed in range(max(args.models))]
    torch.manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8)
    t = torch.tensor([500.0, 500.0])
    c = torch.randn(2, 77, 768)
    rows = []
    with torch.inference_mode():
        for n in args.models:
            afa_step, params, spent = build_afa_step(unets[:n], agg_config)
            afa_step(x, t, c)  # warm-up
            unets[0](x, t, context=c, transformer_options={})
            spent[0] = 0.0
            afa, single = [], []
            for _ in range(repeats):  # interleaved: the machine's noise hits both alike
                afa.append(timed(lambda: afa_step(x, t, c)))
                single.append(sum(timed(lambda u=u: u(x, t, context=c, transformer_options={})) for u in unets[:n]))
            a, s = statistics.median(afa), statistics.median(single)
            unet_mb = sum(p.numel() * p.element_size() for u in unets[:n] for p in u.parameters()) / 2**20
            rows.append((n, size, a, s, a / s, params, spent[0] / sum(afa), unet_mb, params * 4 / 2**20))
    header = ("| N | px | AFA step s (median) | N single steps s (median) | ratio | aggregator share of AFA time "
              "| N UNets weights MB | aggregator MB (params) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {px} | {a:.3f} | {s:.3f} | {r:.3f} | {share:.1%} | {umb:.0f} | {amb:.0f} ({params:,}) |"
              for n, px, a, s, r, params, share, umb, amb in rows]
    lines.append(f"peak RSS of the whole run: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    logger.info("\n".join(lines))
    logger.info("command: python benchmarks/inference_cost.py %s | %s, torch %s, %d threads, %s",
                " ".join(argv if argv is not None else sys.argv[1:]), platform.processor() or platform.machine(),
                torch.__version__, torch.get_num_threads(), datetime.date.today())
    return rows


if __name__ == "__main__":
    main()
