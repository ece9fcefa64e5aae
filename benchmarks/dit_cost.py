"""DiT ensembles (FLUX, SD3): per-step cost next to N single steps, the aggregator's share, the
computed cost at real sizes, and the text-stream experiment (issue: DiT ensembles).

  computed   parameters and FLOPs of the paper-size aggregator next to ONE expert at 1024 px for
             FLUX.1 [dev], SD3.5 large and medium (core/dit_cost.py; exact against torch's FLOP
             counter on the tiny models, tests/test_dit_cost.py).
  measured   on this CPU, with ComfyUI's own FLUX / MMDiT modules (random weights): one model
             call of N single models vs the ensemble (block-wise average; SABW), interleaved in
             one process, order rotated per repeat, medians; the aggregator's own time is
             clocked inside the SABW run. Presets: "tiny" (the test models) and "small"
             (FLUX 512 wide, 4 double + 8 single blocks; SD3 512 wide, 8 joint blocks). The
             computed FLOP share of the same configuration is printed next to the measured time
             share, which shows how FLOPs turn into CPU time at each size.
  text       how to mix the text tokens (core/dit.py TEXT_MIXING): experts = one "base" model
             whose weights are moved by independent noise (stand-ins for fine-tunes of one
             base); block-wise average with each rule; relative squared error of the prediction
             against the base's (lower = the ensemble recovers the common base better).

    python benchmarks/dit_cost.py                        # computed + measured (tiny) + text
    python benchmarks/dit_cost.py --preset small --size 512 --repeats 3
    python benchmarks/dit_cost.py --only computed
"""
import argparse
import collections
import dataclasses
import datetime
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afa_nodes import logger  # noqa: E402

PRESETS = {
    "tiny": {"flux": {}, "sd3": {}, "text_tokens": 32, "sabw": dict(hidden=32, heads=4, depth=1)},
    "small": {"flux": dict(hidden_size=512, num_heads=8, axes_dim=[16, 24, 24], depth=4, depth_single_blocks=8,
                           context_in_dim=256, vec_in_dim=128),
              "sd3": dict(depth=8, context_dim=256, adm_dim=128), "text_tokens": 77, "sabw": {}},
}


def computed_rows():
    from afa_nodes.core.dit_cost import REAL_MODELS, cost_row
    return [cost_row(name, size, n, 1024, depth) for name, size in REAL_MODELS.items()
            for n, depth in ((2, 2), (3, 2), (6, 2), (2, 1))]


def build(family, preset, seeds):
    from afa_nodes import comfy_dit_models as dm
    make = dm.flux_patcher if family == "flux" else dm.sd3_patcher
    return [make(s, **PRESETS[preset][family]).model.diffusion_model.requires_grad_(False) for s in seeds]


def inputs(family, module, size, text_tokens):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, size // 8, size // 8, generator=g)       # batch 2: cond + uncond
    if family == "flux":
        ctx, pooled = module.txt_in.in_features, module.vector_in.in_layer.in_features
        return dict(x=x, t=torch.tensor([0.6, 0.6]), context=torch.randn(2, text_tokens, ctx, generator=g),
                    y=torch.randn(2, pooled, generator=g), guidance=torch.tensor([3.5, 3.5]))
    ctx, pooled = module.context_embedder.in_features, module.y_embedder.mlp[0].in_features
    return dict(x=x, t=torch.tensor([600.0, 600.0]), context=torch.randn(2, text_tokens, ctx, generator=g),
                y=torch.randn(2, pooled, generator=g), guidance=None)


def experts_for(family, modules, a):
    from afa_nodes.comfy_flux import ComfyFluxExpert
    from afa_nodes.comfy_mmdit import ComfyMMDiTExpert
    if family == "flux":
        return [ComfyFluxExpert(m, a["x"], a["t"], a["context"], a["y"], a["guidance"]) for m in modules]
    return [ComfyMMDiTExpert(m, a["x"], a["t"], a["context"], a["y"]) for m in modules]


def single_call(family, module, a):
    if family == "flux":
        return module(a["x"], a["t"], a["context"], y=a["y"], guidance=a["guidance"], transformer_options={})
    return module(a["x"], a["t"], context=a["context"], y=a["y"], transformer_options={})


def measure(args, family):
    from afa_nodes.core.dit_cost import DiTSize, expert_macs, sabw_macs
    from afa_nodes.core.ensemble import EnsembleExecutor, SABWMixer, uniform_mixer
    from afa_nodes.core.layout import derive_layout
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    from afa_nodes.core.spec import StepContext
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    preset = PRESETS[args.preset]
    modules = build(family, args.preset, range(1, args.models + 1))
    layout = derive_layout(modules[0])
    a = inputs(family, modules[0], args.size, preset["text_tokens"])
    config = SABWConfig(args.models, context_dim=layout.context_dim, time_embed_dim=layout.time_embed_dim, **preset["sabw"])
    agg = Aggregator(layout.point_channels, config).eval().requires_grad_(False)
    with torch.no_grad():
        for block in agg.blocks:
            block.conv_out.weight.normal_(0, 0.1)        # non-uniform weights: the real work
    spent, forward = [0.0], agg.forward

    def timed(*args_):
        start = clock()
        out = forward(*args_)
        spent[0] += clock() - start
        return out
    agg.forward = timed
    executors = {"block-wise average": EnsembleExecutor(layout, uniform_mixer(len(layout.points), args.models)),
                 "SABW": EnsembleExecutor(layout, SABWMixer(agg))}
    runs = {"N single steps": lambda: [single_call(family, m, a) for m in modules]}
    for name, ex in executors.items():
        runs[name] = lambda ex=ex: ex.forward(experts_for(family, modules, a), {"contexts": [a["context"]] * len(modules)},
                                              StepContext(sigma=1.0, rows=(0, 1)))
    for fn in runs.values():
        fn()                                               # warm-up
    times, share = collections.defaultdict(list), []
    for r in range(args.repeats):
        names = list(runs)
        for name in names[r % len(names):] + names[:r % len(names)]:
            spent[0] = 0.0
            start = clock()
            runs[name]()
            times[name].append(clock() - start)
            if name == "SABW":
                share.append(spent[0] / times[name][-1])
    base = statistics.median(times["N single steps"])
    size = (DiTSize("flux", layout.time_embed_dim, layout.num_double, layout.num_single, text_tokens=preset["text_tokens"],
                    context_dim=layout.context_dim) if family == "flux" else
            DiTSize("mmdit", layout.time_embed_dim, layout.num_blocks, text_tokens=preset["text_tokens"],
                    context_dim=layout.context_dim))
    tokens = size.grid_tokens(args.size, args.size)
    flop_share = sabw_macs(layout.point_channels, config, tokens, preset["text_tokens"]) / \
        (args.models * expert_macs(size, tokens) + sabw_macs(layout.point_channels, config, tokens, preset["text_tokens"]))
    return [dict(family=family, variant=name, seconds=statistics.median(v), ratio=statistics.median(v) / base,
                 share=statistics.median(share) if name == "SABW" else None,
                 flop_share=flop_share if name == "SABW" else None, points=len(layout.points),
                 expert_params=sum(p.numel() for p in modules[0].parameters()),
                 sabw_params=sum(p.numel() for p in agg.parameters())) for name, v in times.items()]


def text_mixing_rows(args):
    """Ensembles of 'fine-tunes' of one base, each text rule: error against the base's prediction."""
    from afa_nodes import comfy_dit_models as dm
    from afa_nodes.core.ensemble import EnsembleExecutor, noise_average_mixer, uniform_mixer
    from afa_nodes.core.layout import derive_layout
    rows = []
    for family in ("flux", "sd3"):
        for amount in (0.2, 0.4):
            n = 2
            base = (dm.flux_patcher(11, hidden_size=128, num_heads=4, axes_dim=[16, 8, 8], depth=3, depth_single_blocks=3)
                    if family == "flux" else dm.sd3_patcher(11, depth=3, context_dim=64, adm_dim=32))
            tuned = [dm.finetuned(base, 100 + i, amount).model.diffusion_model for i in range(n)]
            root = base.model.diffusion_model
            layout = derive_layout(root)
            points = len(layout.points)
            errors = collections.defaultdict(list)
            g = torch.Generator().manual_seed(0)
            for trial in range(6):
                ctx = 48 if family == "flux" else 64
                a = dict(x=torch.randn(2, 16, 16, 16, generator=g), context=torch.randn(2, 12, ctx, generator=g),
                         y=torch.randn(2, 32, generator=g),
                         t=torch.tensor([0.9, 0.3] if trial % 2 else [0.6, 0.1]) * (1 if family == "flux" else 1000),
                         guidance=torch.tensor([3.5, 3.5]) if family == "flux" else None)

                def run(lay, mixer, modules, a=a):
                    return EnsembleExecutor(lay, mixer).forward(experts_for(family, modules, a), {"contexts": [a["context"]] * len(modules)})
                reference = run(layout, uniform_mixer(points, 1), [root])

                def err(p, ref=reference):
                    return float(((p - ref) ** 2).mean() / (ref ** 2).mean())
                errors["one fine-tune"].append(statistics.mean(err(run(layout, uniform_mixer(points, 1), [m])) for m in tuned))
                errors["noise average"].append(err(run(layout, noise_average_mixer(points, n), tuned)))
                for rule in ("own", "mean", "first"):
                    errors[f"text {rule}"].append(err(run(dataclasses.replace(layout, text_mixing=rule), uniform_mixer(points, n), tuned)))
            rows.append(dict(family=family, amount=amount, **{k: statistics.mean(v) for k, v in errors.items()}))
    return rows


def report(args, computed, measured, text):
    lines = []
    if computed:
        lines += ["| model | N | SABW depth | points | aggregator parameters | one expert TFLOPs/step | "
                  "aggregator TFLOPs/step | share of ONE expert |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['models']} | {r['sabw_depth']} | {r['points']} | {r['aggregator_parameters']:,} | "
                  f"{r['expert_tflops']:.1f} | {r['aggregator_tflops']:.2f} | {r['share_of_one_expert']:.1%} |" for r in computed]
    if measured:
        lines += ["", f"| family | px | variant | s/call ({args.clock}, median) | ratio vs N single calls | "
                  "aggregator share of the call (time) | (FLOPs) |", "|---|---|---|---|---|---|---|"]
        for r in measured:
            share = "" if r["share"] is None else f"{r['share']:.1%} | {r['flop_share']:.1%}"
            lines.append(f"| {r['family']} | {args.size} | {r['variant']} | {r['seconds']:.4f} | {r['ratio']:.3f} | {share or ' |'} |")
        lines += [f"{f}: {r['points']} points, expert {r['expert_params']:,} parameters, aggregator {r['sabw_params']:,}"
                  for f, r in {r["family"]: r for r in measured}.items()]
    if text:
        keys = [k for k in text[0] if k not in ("family", "amount")]
        lines += ["", "| family | weight noise | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        lines += [f"| {r['family']} | {r['amount']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |" for r in text]
    logger.info("\n".join(lines))
    logger.info("command: python benchmarks/dit_cost.py %s | %s, torch %s, %d threads, %s", " ".join(sys.argv[1:]),
                platform.processor() or platform.machine(), torch.__version__, torch.get_num_threads(), datetime.date.today())


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["computed", "measured", "text"], nargs="+", default=["computed", "measured", "text"])
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (measured)")
    p.add_argument("--models", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--comfyui", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    computed = computed_rows() if "computed" in args.only else []
    measured, text = [], []
    if "measured" in args.only or "text" in args.only:
        from afa_nodes.comfy_env import boot_comfyui
        boot_comfyui(args.comfyui)
        if args.threads:
            torch.set_num_threads(args.threads)
        with torch.inference_mode():
            if "measured" in args.only:
                measured = measure(args, "flux") + measure(args, "sd3")
            if "text" in args.only:
                text = text_mixing_rows(args)
    report(args, computed, measured, text)
    return computed, measured, text


if __name__ == "__main__":
    main()
