"""Map refresh decided by evidence (issue #15 part 2): what re-using SABW maps costs in quality
and saves in time, for k = 1..4 and for where in the schedule the fresh maps are spent.

`map_refresh` k re-uses each aggregation point's maps for k sampling steps. A policy here says
which steps of a run compute fresh maps (SABWMixer.fresh): every k-th step, or exact maps in
the first (or last) part of the schedule and every k-th step elsewhere.

Quality, on the toy of benchmarks/quality.py (per seed: 2 experts fine-tuned from a tiny base
UNet, one full SABW trained on them; held-out latents, fixed noise):
    eps-MSE along the schedule   the held-out latents noised (one fixed noise each) to every sigma
                                 of the sampler's schedule and predicted in order, so re-used maps
                                 are really the earlier steps' maps; mean over steps and samples
    final-latent distance        a full run from pure noise with ComfyUI's samplers and schedulers
                                 (k-diffusion euler + "normal", dpmpp_2m + "karras"); RMS distance of
                                 the final latents to the exact (k = 1) run, also as a share of
                                 block-wise averaging's distance (the whole effect of the maps)
Cost: the step-time ratio vs N single steps, SD1.5 full size, 256 px, N=2, paper-size SABW
(random weights). The three kinds of step (N single steps, an AFA step that computes its maps,
an AFA step that re-uses them) are timed interleaved in one process on one thread with
per-thread CPU time, order rotated, medians; a policy's ratio is its own mix of the two AFA steps.

    python benchmarks/map_refresh_study.py            # 3 seeds, 20 steps, then the full-size timing
    python benchmarks/map_refresh_study.py --quick    # smoke run (tiny UNets, 1 seed)
    # split over processes, then one table:
    python benchmarks/map_refresh_study.py --part quality --seeds 0 --save s0.json   # (and 1, 2)
    python benchmarks/map_refresh_study.py --part timing --save t.json
    python benchmarks/map_refresh_study.py --merge s0.json s1.json s2.json t.json
"""
import argparse
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from afa_nodes import logger  # noqa: E402
from afa_nodes.core.ensemble import EnsembleExecutor, SABWMixer  # noqa: E402

import quality  # noqa: E402

SAMPLERS = (("euler", "normal"), ("dpmpp_2m", "karras"))
SETTINGS = {
    "full": dict(quality.SETTINGS["full"], seeds=[0, 1, 2], train=1000, val=48, base_steps=100, expert_steps=100,
                 agg_steps=80, steps=20, samples=16, size=256, repeats=3, tiny=False),
    "quick": dict(quality.SETTINGS["quick"], seeds=[0], steps=6, samples=8, size=64, repeats=1, tiny=True),
}


class PlacedMixer(SABWMixer):
    """SABW whose maps are exact in steps [0, exact_before) and [exact_from, end), and
    computed every k-th step in between (counting from the last exact step)."""

    def __init__(self, aggregator, k, exact_before, exact_from):
        super().__init__(aggregator, refresh_every=k)
        self.exact_before, self.exact_from = exact_before, exact_from

    def fresh(self, step):
        if step < self.exact_before or step >= self.exact_from:
            return True
        return super().fresh(step - max(self.exact_before - 1, 0))


@dataclass(frozen=True)
class Policy:
    key: str
    label: str
    k: int                      # 0: the first step's maps for the whole run
    exact_before: float = 0.0   # fraction of the steps that compute maps first
    exact_from: float = 1.0     # fraction of the steps from which every step computes maps

    def mixer(self, aggregator, steps):
        k = self.k or steps
        a, b = round(self.exact_before * steps), round(self.exact_from * steps)
        if a == 0 and b >= steps:
            return SABWMixer(aggregator, refresh_every=k)   # the pack's own map_refresh
        return PlacedMixer(aggregator, k, a, b)

    def fresh_steps(self, steps):
        m = self.mixer(None, steps)
        return sum(m.fresh(i) for i in range(steps))


POLICIES = [
    Policy("k1", "exact: maps every step (k = 1)", 1),
    Policy("k2", "k = 2", 2),
    Policy("k3", "k = 3", 3),
    Policy("k4", "k = 4", 4),
    Policy("early25_k4", "exact in the first 25%, then k = 4", 4, exact_before=0.25),
    Policy("late25_k4", "k = 4, exact in the last 25%", 4, exact_from=0.75),
    Policy("early25_k2", "exact in the first 25%, then k = 2", 2, exact_before=0.25),
    Policy("late50_k2", "k = 2, exact in the last 50%", 2, exact_from=0.5),
    Policy("once", "the first step's maps for the whole run", 0),
]


# ---------------------------------------------------------------- quality on the toy
def model_sampling():
    """ComfyUI's SD1.x sampling object (scaled-linear, the toy's schedule): sigmas for the
    schedulers, sigma -> timestep as ComfyUI feeds the UNet."""
    from comfy.model_sampling import ModelSamplingDiscrete
    return ModelSamplingDiscrete()


def predict(executor, unets, schedule, ms, x, sigma, ctx):
    """One sampling call: eps of the ensemble at `sigma` (a float), as the MODEL wrapper sees it."""
    s = torch.full((len(x),), float(sigma))
    return quality.run_ensemble(executor, unets, schedule.model_input(s, x), ms.timestep(s), ctx,
                                step=(float(sigma), ("val",)))


@torch.no_grad()
def eps_along_schedule(executor, unets, schedule, ms, sigmas, x0, noise, ctx):
    """Mean eps-MSE over the schedule's steps (in order) and the samples."""
    errors = [(predict(executor, unets, schedule, ms, x0 + float(s) * noise, s, ctx) - noise).square().mean()
              for s in sigmas[:-1]]
    return float(torch.stack(errors).mean())


@torch.no_grad()
def sample(executor, unets, schedule, ms, sampler, sigmas, noise, ctx):
    """A full run from pure noise with ComfyUI's k-diffusion sampler (EPS noise scaling, max denoise)."""
    from comfy.k_diffusion import sampling

    def denoiser(x, sigma, **_):
        return x - sigma.view(-1, 1, 1, 1) * predict(executor, unets, schedule, ms, x, float(sigma[0]), ctx)
    x = noise * (1.0 + sigmas[0] ** 2) ** 0.5
    return getattr(sampling, f"sample_{sampler}")(denoiser, x, sigmas, disable=True)


def rms(a, b):
    return float((a - b).square().mean().sqrt())


def study_seed(seed, cfg, schedule, ctx_table):
    """{policy key: {"eps": value, "dist": {sampler: value}}}, block-wise averaging ("block_avg") included."""
    from afa_nodes.core.ensemble import uniform_mixer
    from afa_nodes.core.layout import derive_layout
    t0 = time.perf_counter()
    latents, kinds, val, unets, _ = quality.train_experts(seed, cfg, schedule, ctx_table)
    layout = derive_layout(unets[0])
    mixer, params = quality.make_mixer("sabw_full", layout, len(unets), seed)
    quality.train_mixer(params, EnsembleExecutor(layout, mixer), unets, schedule, latents, kinds, ctx_table,
                        cfg["agg_steps"], cfg["agg_batch"], cfg["agg_lr"], seed * 1000 + 20)
    agg = mixer.aggregator.eval().requires_grad_(False)
    logger.info("  seed %d: experts and aggregator trained in %.0f s", seed, time.perf_counter() - t0)
    n, steps, ms = cfg["samples"], cfg["steps"], model_sampling()
    x0, ctx = val[0][:n], ctx_table[val[1][:n]]
    g = torch.Generator().manual_seed(seed * 1000 + 40)
    noise, start = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    mixers = {p.key: p.mixer(agg, steps) for p in POLICIES}
    mixers["block_avg"] = uniform_mixer(len(layout.points), len(unets))
    out = {key: {"final": {}} for key in mixers}
    from comfy.samplers import calculate_sigmas
    for i, (sampler, scheduler) in enumerate(SAMPLERS):
        sigmas = calculate_sigmas(ms, scheduler, steps).float()
        for key, m in mixers.items():
            ex = EnsembleExecutor(layout, m)
            if i == 0:   # on the first schedule only (a second one told nothing new in trial runs)
                out[key]["eps"] = eps_along_schedule(ex, unets, schedule, ms, sigmas, x0, noise, ctx)
            out[key]["final"][sampler] = sample(ex, unets, schedule, ms, sampler, sigmas, start, ctx)
    result = {}
    for key, r in out.items():
        result[key] = dict(eps=r["eps"], dist={s: rms(r["final"][s], out["k1"]["final"][s]) for s, _ in SAMPLERS})
    logger.info("  seed %d done in %.0f s", seed, time.perf_counter() - t0)
    return result


# ---------------------------------------------------------------- cost at full size
def step_seconds(cfg):
    """Median per-thread CPU seconds of N=2 single steps, an AFA step computing its maps, one re-using them."""
    from afa_nodes.comfy_unet import ComfyExpert, ComfyHooks
    from afa_nodes.core.layout import derive_layout
    from afa_nodes.core.spec import StepContext
    import inference_cost
    from unet_configs import SD15_FULL, SD15_TINY
    unets = [inference_cost.build_unet(SD15_TINY if cfg["tiny"] else SD15_FULL, seed) for seed in (0, 1)]
    layout = derive_layout(unets[0])
    agg = inference_cost.build_aggregator(layout, 2, dict(hidden=32, heads=4, depth=1) if cfg["tiny"] else {})
    torch.manual_seed(0)
    side = cfg["size"] // 8
    x, t, c = torch.randn(2, 4, side, side), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    executors = {"fresh": EnsembleExecutor(layout, SABWMixer(agg)),
                 "reused": EnsembleExecutor(layout, SABWMixer(agg, refresh_every=10 ** 9))}
    sigma = [1000.0]

    def afa(kind):
        sigma[0] -= 1.0   # one run, sigma falling: the re-using mixer computed its maps at the first call only
        experts = [ComfyExpert(u, {}, x, {}) for u in unets]
        executors[kind](experts, x, t, [c, c], None, ComfyHooks(None, {}), StepContext(sigma=sigma[0], rows=(0, 1)))

    steps = {"single": lambda: [u(x, t, context=c, transformer_options={}) for u in unets],
             "fresh": lambda: afa("fresh"), "reused": lambda: afa("reused")}
    with torch.inference_mode():
        for fn in steps.values():   # warm-up; the re-using mixer's maps come from here
            fn()
        times = {k: [] for k in steps}
        for r in range(cfg["repeats"]):
            names = list(steps)[r % 3:] + list(steps)[:r % 3]
            for name in names:
                start = time.thread_time()
                steps[name]()
                times[name].append(time.thread_time() - start)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------- report
def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(per_seed, cfg, fresh, reused):
    steps, rows = cfg["steps"], []
    for p in POLICIES + [Policy("block_avg", "block-wise average (no maps: reference)", 1)]:
        n_fresh = p.fresh_steps(steps) if p.key != "block_avg" else 0
        row = dict(key=p.key, label=p.label, fresh=n_fresh,
                   ratio=None if p.key == "block_avg" else (n_fresh * fresh + (steps - n_fresh) * reused) / steps)
        row["eps"] = mean_std([r[p.key]["eps"] for r in per_seed])
        row["deps"] = mean_std([r[p.key]["eps"] - r["k1"]["eps"] for r in per_seed])
        for s, _ in SAMPLERS:
            row[f"dist_{s}"] = mean_std([r[p.key]["dist"][s] for r in per_seed])
            row[f"share_{s}"] = mean_std([r[p.key]["dist"][s] / r["block_avg"]["dist"][s] for r in per_seed])
        rows.append(row)
    return rows


def markdown(rows, cfg):
    steps = cfg["steps"]
    head = (f"| policy ({steps} steps) | steps computing maps | step ratio vs N single (N=2, {cfg['size']} px) "
            f"| eps-MSE along the {SAMPLERS[0][1]} schedule (Δ vs exact) |")
    for s, sch in SAMPLERS:
        head += f" final latent: RMS distance to exact, {s}/{sch} (share of block-wise avg's) |"
    lines = [head, "|---|---|---|---|" + "---|" * len(SAMPLERS)]
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.3f}"
        (e, _), (d, dsd) = r["eps"], r["deps"]
        cells = [r["label"], str(r["fresh"]), ratio, f"{e:.5f} ({d:+.5f} ± {dsd:.5f})"]
        for s, _ in SAMPLERS:
            (dist, dist_sd), (share, share_sd) = r[f"dist_{s}"], r[f"share_{s}"]
            cells.append(f"{dist:.4f} ± {dist_sd:.4f} ({share:.1%} ± {share_sd:.1%})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    p.add_argument("--part", choices=["all", "quality", "timing"], default="all",
                   help="run only the toy quality or only the full-size timing (to split the work)")
    p.add_argument("--save", type=Path, default=None, help="write this run's raw results (JSON)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="no run: the table of saved runs (e.g. one per seed, and one timing run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: per-thread CPU time is exact)")
    p.add_argument("--comfyui", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    cfg = dict(SETTINGS["quick" if args.quick else "full"])
    cfg["seeds"] = args.seeds or cfg["seeds"]
    cfg["steps"] = args.steps or cfg["steps"]
    raw = dict(per_seed=[], seconds={})
    if args.merge:
        for path in args.merge:
            saved = json.loads(path.read_text(encoding="utf-8"))
            raw["per_seed"] += saved["per_seed"]
            raw["seconds"] = saved["seconds"] or raw["seconds"]
            cfg.update(steps=saved["steps"], size=saved["size"])
    else:
        from afa_nodes.comfy_env import boot_comfyui
        # PyTorch attention in the UNets: ComfyUI's CPU default (sub-quadratic) cannot backpropagate
        # when it splits into chunks (low free memory), and the toy's experts train here.
        boot_comfyui(args.comfyui, extra_args=["--use-pytorch-cross-attention"])
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            if args.part in ("all", "timing"):
                raw["seconds"] = step_seconds(cfg)
            if args.part in ("all", "quality"):
                from afa_nodes.core.train import NoiseSchedule
                schedule, ctx_table = NoiseSchedule.scaled_linear(), quality.caption_table()
                raw["per_seed"] = [study_seed(s, cfg, schedule, ctx_table) for s in cfg["seeds"]]
        finally:
            torch.set_num_threads(threads)
    if args.save:
        args.save.write_text(json.dumps(dict(raw, steps=cfg["steps"], size=cfg["size"])), encoding="utf-8")
    sec = raw["seconds"]
    fresh, reused = (sec["fresh"] / sec["single"], sec["reused"] / sec["single"]) if sec else (math.nan, math.nan)
    rows = summarize(raw["per_seed"], cfg, fresh, reused) if raw["per_seed"] else []
    table = markdown(rows, cfg) if rows else ""
    runtime = time.perf_counter() - start
    command = "python benchmarks/map_refresh_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    logger.info("\n%s\n\nstep ratios vs N single steps: computing maps %.3f, re-using them %.3f (CPU s per step "
                "%s)\ncommand: %s | %s, torch %s, %d thread(s), runtime %.1f min", table, fresh, reused,
                {k: round(v, 3) for k, v in sec.items()}, command.strip(), platform.processor() or platform.machine(),
                torch.__version__, args.threads, runtime / 60)
    return dict(rows=rows, table=table, per_seed=raw["per_seed"], fresh=fresh, reused=reused, runtime=runtime)


if __name__ == "__main__":
    main()
