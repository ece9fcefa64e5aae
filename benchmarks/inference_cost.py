"""Per-step cost of an AFA ensemble vs the sum of N single-model steps (issue: benchmarks).

SD1.5 architecture at full size (random weights: timing does not need trained ones),
one sampling step = one UNet call at batch 2 (CFG). For each N, these run interleaved in
one process, repeated, and their medians are compared with N single-model steps:
    block-wise average   the block-by-block executor with constant weights (no aggregator):
                         the cost of running N UNets block by block and mixing them
    SABW                 the paper-size aggregator at every block, every step
    SABW map_refresh k   the aggregator runs on one step in k (maps re-used in between);
                         timed over k consecutive steps of one run, divided by k
    SABW <full_res>      the aggregator with a cheaper option at the full-resolution points
                         (pooled attention, half resolution: EnsembleSpec.full_res);
                         with --refresh also each option + map_refresh k
The aggregator's own time is measured inside the run, per latent resolution.
`--clock cpu` times process CPU seconds instead of wall seconds: on a shared machine it
is far less disturbed by other jobs (use with --threads 1); `--clock thread` the calling
thread's CPU seconds (with --threads 1 all the work is on it). `--memory` measures peak RSS
of each configuration in its own subprocess.

    python benchmarks/inference_cost.py                       # 256 px, N = 2, 3
    python benchmarks/inference_cost.py --size 512 --repeats 3
    python benchmarks/inference_cost.py --threads 1 --clock cpu
    python benchmarks/inference_cost.py --threads 1 --clock thread --full-res   # + every full_res option
    python benchmarks/inference_cost.py --unet-attention pytorch  # UNets on scaled_dot_product_attention
    python benchmarks/inference_cost.py --memory --models 1 2 3
    python benchmarks/inference_cost.py --quick               # tiny UNet, smoke test
    python benchmarks/inference_cost.py --dtype bf16 --threads 2  # everything in bf16 on the CPU
    python benchmarks/inference_cost.py --device cuda --dtype fp16 --arch sdxl --size 1024  # GPU (benchmarks/gpu.sh)

`--device` / `--dtype` put the UNets, the aggregator and the inputs on that device in that
dtype (the aggregator's softmax stays fp32, as in the pack); on CUDA every clock reading
synchronises the device first. `--arch sdxl` uses the SDXL UNet (2048-wide text, pooled
vector); the aggregator is built for the UNet's layout (context and time-embedding widths).
"""
import argparse
import collections
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afa_nodes import logger  # noqa: E402

from unet_configs import BASE, SD15_FULL, SD15_TINY  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# ComfyUI's detected SDXL UNet (model_detection), and a tiny one of the same family for smoke tests
SDXL_BASE = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
                 use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 use_temporal_attention=False, use_temporal_resblock=False)
SDXL_FULL = dict(num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                 transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
SDXL_TINY = dict(model_channels=64, num_head_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
                 transformer_depth=[0, 0, 1, 1], transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1])
ARCHS = {"sd15": ("SD15", BASE, SD15_FULL, SD15_TINY), "sdxl": ("SDXL", SDXL_BASE, SDXL_FULL, SDXL_TINY)}


def build_unet(config, seed, arch="sd15", device="cpu", dtype=torch.float32):
    """A UNet of `arch` with random weights, built directly on `device` in `dtype`."""
    import comfy.supported_models
    torch.manual_seed(seed)
    family, base = ARCHS[arch][:2]
    model_config = getattr(comfy.supported_models, family)(dict(base, **config))
    model_config.set_inference_dtype(dtype, None)
    unet = model_config.get_model({}, device=device).diffusion_model.eval().requires_grad_(False)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    return unet


def build_aggregator(layout, n, aggregator_config, device="cpu", dtype=torch.float32):
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    config = SABWConfig(n, **dict(dict(context_dim=layout.context_dim, time_embed_dim=layout.time_embed_dim),
                                  **aggregator_config))
    agg = Aggregator(layout.point_channels, config).eval().requires_grad_(False)
    with torch.no_grad():
        for block in agg.blocks:
            block.conv_out.weight.normal_(0, 0.1)  # non-uniform weights: the real work
    return agg.to(device, dtype)


def make_clock(kind, device):
    """Seconds now; on CUDA after the queued kernels finished (else a clock measures launches)."""
    base = {"cpu": time.process_time, "thread": time.thread_time, "wall": time.perf_counter}[kind]
    if torch.device(device).type != "cuda":
        return base

    def clock():
        torch.cuda.synchronize(device)
        return base()
    return clock


class AggregatorClock:
    """Wraps the aggregator's forward to add up its own time per latent side (e.g. 32 at 256 px)."""

    def __init__(self, agg, clock):
        self.seconds = collections.Counter()
        self.clock, forward = clock, agg.forward

        def timed_forward(point, features, temb, context, *options):
            start = clock()
            out = forward(point, features, temb, context, *options)
            self.seconds[out.shape[-1]] += clock() - start
            return out
        agg.forward = timed_forward

    def reset(self):
        self.seconds.clear()


def afa_step(unets, mixer, steps=1):
    """A callable running `steps` consecutive AFA UNet calls (sigma falling, one run) exactly as
    the DIFFUSION_MODEL wrapper does; returns seconds per call."""
    from afa_nodes.core.ensemble import EnsembleExecutor
    from afa_nodes.core.layout import derive_layout
    from afa_nodes.comfy_unet import ComfyExpert, ComfyHooks
    from afa_nodes.core.spec import StepContext
    executor = EnsembleExecutor(derive_layout(unets[0]), mixer)

    def run(x, t, c, y=None):
        for k in range(steps):
            experts = [ComfyExpert(u, {}, x, {}) for u in unets]
            executor(experts, x, t, [c] * len(unets), [y] * len(unets), ComfyHooks(None, {}),
                     StepContext(sigma=10.0 - k, rows=(0, 1)))
    return run


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--models", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--refresh", type=int, nargs="*", default=[2, 3], help="map_refresh values to time")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu", "thread"], default="wall")
    p.add_argument("--full-res", nargs="*", default=None, metavar="OPTION",
                   help="also time SABW with these full-resolution options (no value: all but exact)")
    p.add_argument("--unet-attention", choices=["comfy-default", "pytorch"], default="comfy-default",
                   help="the UNets' attention: ComfyUI's default for the device (sub-quadratic on CPU) or "
                        "--use-pytorch-cross-attention (scaled_dot_product_attention). The aggregator always "
                        "uses scaled_dot_product_attention.")
    p.add_argument("--memory", action="store_true", help="peak RSS per configuration (subprocesses)")
    p.add_argument("--probe", choices=["single", "afa"], help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="tiny UNet, 64 px, 2 repeats (smoke test)")
    p.add_argument("--arch", choices=sorted(ARCHS), default="sd15", help="UNet architecture (full size unless --quick)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="UNets', aggregator's and inputs' dtype")
    p.add_argument("--comfyui", default=None)
    args = p.parse_args(argv)
    from afa_nodes.core.spec import FullRes, parse_full_res
    args.full_res = ([o for o in FullRes if o is not FullRes.EXACT] if args.full_res == []
                     else [parse_full_res(o) for o in args.full_res or ()])
    if torch.device(args.device).type == "cuda" and (args.clock != "wall" or args.memory):
        p.error("--clock cpu and --memory measure this process on the CPU; on CUDA use the wall clock, no --memory")
    return args


def setup(args):
    from afa_nodes.comfy_env import boot_comfyui
    boot_comfyui(args.comfyui, extra_args=["--use-pytorch-cross-attention"] if args.unet_attention == "pytorch" else ())
    if args.threads:
        torch.set_num_threads(args.threads)
    _, base, full, tiny = ARCHS[args.arch]
    config = tiny if args.quick else full
    size = 64 if args.quick else args.size
    agg_config = dict(hidden=32, heads=4, depth=1) if args.quick else {}  # paper size by default
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    unets = [build_unet(config, seed, args.arch, device, dtype) for seed in range(max(args.models))]
    torch.manual_seed(0)
    adm = dict(base, **config).get("adm_in_channels")
    inputs = (torch.randn(2, 4, size // 8, size // 8), torch.tensor([500.0, 500.0]),
              torch.randn(2, 77, base["context_dim"]), torch.randn(2, adm) if adm else None)
    inputs = tuple(None if v is None else v.to(device, torch.float32 if k == 1 else dtype) for k, v in enumerate(inputs))
    return unets, size, agg_config, inputs


def time_steps(args, unets, agg_config, inputs):
    from afa_nodes.core.ensemble import SABWMixer, uniform_mixer
    from afa_nodes.core.layout import derive_layout
    from afa_nodes.core.sabw import count_parameters
    clock = make_clock(args.clock, args.device)
    layout = derive_layout(unets[0])
    rows = []
    x, t, c, y = inputs
    for n in args.models:
        if n < 2:
            continue
        agg = build_aggregator(layout, n, agg_config, args.device, DTYPES[args.dtype])
        spent = AggregatorClock(agg, clock)
        variants = {"block-wise average": (afa_step(unets[:n], uniform_mixer(len(layout.points), n)), 1),
                    "SABW": (afa_step(unets[:n], SABWMixer(agg)), 1)}
        for k in args.refresh:
            variants[f"SABW map_refresh {k}"] = (afa_step(unets[:n], SABWMixer(agg, refresh_every=k), k), k)
        for option in args.full_res:
            variants[f"SABW {option}"] = (afa_step(unets[:n], SABWMixer(agg, full_res=option)), 1)
            for k in args.refresh:  # the two savings together
                variants[f"SABW {option} + map_refresh {k}"] = (
                    afa_step(unets[:n], SABWMixer(agg, refresh_every=k, full_res=option), k), k)
        shared = {name for name, (_, k) in variants.items() if name.startswith("SABW") and k == 1}

        def singles(models=unets[:n]):
            return [u(x, t, context=c, y=y, transformer_options={}) for u in models]
        for fn, _ in variants.values():  # warm-up
            fn(x, t, c, y)
        finite = all(bool(torch.isfinite(out).all()) for out in singles())
        times = {name: [] for name in ["N single steps", *variants]}
        agg_share = {name: collections.Counter() for name in shared}
        for r in range(args.repeats):  # interleaved, order rotated: the machine's noise hits all alike
            names = list(times)
            for name in names[r % len(names):] + names[:r % len(names)]:
                spent.reset()
                start = clock()
                if name == "N single steps":
                    singles()
                    times[name].append(clock() - start)
                else:
                    fn, k = variants[name]
                    fn(x, t, c, y)
                    times[name].append((clock() - start) / k)
                    if name in shared:
                        agg_share[name].update({side: s / times[name][-1] for side, s in spent.seconds.items()})
        base = statistics.median(times["N single steps"])
        for name, values in times.items():
            share = {side: v / args.repeats for side, v in agg_share[name].items()} if name in shared else None
            rows.append(dict(n=n, variant=name, seconds=statistics.median(values),
                             ratio=statistics.median(values) / base,
                             aggregator_share=sum(share.values()) if share else None,
                             share_by_side=share, params=count_parameters(agg), finite=finite))
    return rows


def current_rss_mb():
    """Resident memory now (Linux /proc), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe_memory(args):
    """Subprocess body: build N UNets, run one step of `args.probe`, report RSS in MB as JSON."""
    from afa_nodes.core.ensemble import SABWMixer
    from afa_nodes.core.layout import derive_layout
    unets, size, agg_config, (x, t, c, y) = setup(args)
    n = args.models[0]
    agg = (build_aggregator(derive_layout(unets[0]), n, agg_config, args.device, DTYPES[args.dtype])
           if args.probe == "afa" else None)
    weights = current_rss_mb()
    with torch.inference_mode():
        if args.probe == "afa":
            afa_step(unets, SABWMixer(agg))(x, t, c, y)
        else:
            for u in unets:
                u(x, t, context=c, y=y, transformer_options={})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.write(json.dumps(dict(weights=weights, peak=peak)) + "\n")


def measure_memory(args):
    rows = []
    for n in args.models:
        for kind in (["single"] if n == 1 else ["single", "afa"]):
            cmd = [sys.executable, __file__, "--probe", kind, "--models", str(n), "--size", str(args.size)]
            cmd += ["--quick"] * args.quick + (["--comfyui", args.comfyui] if args.comfyui else [])
            cmd += ["--unet-attention", args.unet_attention] + (["--threads", str(args.threads)] if args.threads else [])
            cmd += ["--arch", args.arch, "--device", args.device, "--dtype", args.dtype]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(dict(n=n, kind=kind, **json.loads(done.stdout.strip().splitlines()[-1])))
    return rows


def report(args, size, rows, memory):
    lines = []
    if rows:
        lines += [f"| N | px | variant | s/step ({args.clock}, median) | ratio vs N single steps | "
                  "aggregator share of the step |", "|---|---|---|---|---|---|"]
        for r in rows:
            share = "" if r["aggregator_share"] is None else f"{r['aggregator_share']:.1%} (" + ", ".join(
                f"{side}x{side}: {v:.1%}" for side, v in sorted(r["share_by_side"].items(), reverse=True)) + ")"
            lines.append(f"| {r['n']} | {size} | {r['variant']} | {r['seconds']:.3f} | {r['ratio']:.3f} | {share} |")
        params = sorted({(r["n"], r["params"]) for r in rows})
        lines.append("aggregator parameters: " + ", ".join(f"N={n}: {p:,} ({p * 4 / 2**20:.0f} MB fp32)"
                                                          for n, p in params))
        lines.append("single-model outputs finite: " + ("yes" if all(r["finite"] for r in rows) else "NO"))
    if memory:
        lines += ["", "| N | px | run | RSS after loading MB | peak RSS MB | peak - loaded MB |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {m['n']} | {size} | {'AFA (SABW)' if m['kind'] == 'afa' else 'N single models'} | "
                  f"{m['weights']:.0f} | {m['peak']:.0f} | {m['peak'] - m['weights']:.0f} |" for m in memory]
    lines.append(f"{args.arch} UNets on {args.device} in {args.dtype} (aggregator softmax fp32); "
                 f"UNet attention: {args.unet_attention}; aggregator attention: scaled_dot_product_attention")
    logger.info("\n".join(lines))
    logger.info("command: python benchmarks/inference_cost.py %s | %s, torch %s, %d threads, %s",
                " ".join(sys.argv[1:]), platform.processor() or platform.machine(), torch.__version__,
                torch.get_num_threads(), datetime.date.today())


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.probe:
        return probe_memory(args)
    if args.quick:
        args.repeats = 2
    if args.memory:
        return report(args, 64 if args.quick else args.size, [], measure_memory(args))
    unets, size, agg_config, inputs = setup(args)
    with torch.inference_mode():
        rows = time_steps(args, unets, agg_config, inputs)
    report(args, size, rows, None)
    return rows


if __name__ == "__main__":
    main()
