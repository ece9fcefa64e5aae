"""Quality on a small, honest experiment: held-out epsilon MSE of AFA and its ablations.

Everything happens in latent space (no VAE, no CLIP): a synthetic captioned dataset of
4x16x16 "latents" with three kinds of content tied to the caption
    blobs    smooth Gaussian blobs in channels 0-1, top half
    stripes  oriented sine stripes in channels 2-3, bottom half
    both     blobs on top AND stripes below
and a learning-free "text encoder": the kind's one-hot through a fixed random
projection to a (4 tokens, 32) context.

Per seed: a tiny UNet in ComfyUI's layout (comfy openaimodel.UNetModel, 32/64 channels,
context 32) is trained on all kinds (the shared "base"), then fine-tuned into 2 experts,
expert 1 mostly on blobs and expert 2 mostly on stripes (as SD1.5 fine-tunes share a
base). Epsilon-MSE, SD's scaled-linear schedule. Then aggregators are trained on a mix
of all kinds with the same budget each (steps, batches, AdamW settings), the experts
frozen, through `EnsembleExecutor` + `ComfyExpert` exactly as the MODEL wrapper runs:
    one scalar per model per block (BlockScalarMixer), SABW without timestep input,
    SABW without text input, full SABW (hidden 32, 4 heads, depth 1).
All variants (plus each expert alone, noise averaging and block-wise averaging) are
scored on the SAME held-out samples with fixed noise and timesteps (lower is better).
Note the data is built so that where (spatial), what (text) and when (timestep) each
expert is good differ: it tests whether each input of SABW is used, not whether
the paper's ImageReward numbers transfer.

    python benchmarks/quality.py            # full: 3 seeds, ~10 min on 2 idle CPU cores
    python benchmarks/quality.py --quick    # tiny smoke run (< 60 s)
"""
import argparse
import datetime
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from afa_nodes import logger  # noqa: E402

H = W = 16
CONTEXT_DIM, TOKENS = 32, 4
KINDS = ("blobs", "stripes", "both")
SECTION = "## Quality (held-out epsilon MSE)"
PICTURE_SAMPLES = 6

UNET = dict(image_size=H, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1],
            channel_mult=[1, 2], num_heads=4, num_head_channels=-1, use_spatial_transformer=True,
            transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
            context_dim=CONTEXT_DIM, legacy=False, use_linear_in_transformer=False, adm_in_channels=None,
            use_checkpoint=False, use_temporal_resblock=False, use_temporal_attention=False)

SETTINGS = {
    "full": dict(seeds=[0, 1, 2], train=2000, val=192, batch=16, base_steps=150, expert_steps=150,
                 agg_steps=100, agg_batch=8, agg_lr=3e-3, expert_focus=0.9),
    "quick": dict(seeds=[0, 1], train=128, val=24, batch=8, base_steps=6, expert_steps=6,
                  agg_steps=4, agg_batch=4, agg_lr=3e-3, expert_focus=0.9),
}

VARIANTS = [  # (key, label)
    ("expert1", "expert 1 alone (blobs)"),
    ("expert2", "expert 2 alone (stripes)"),
    ("noise_avg", "noise (final output) averaging"),
    ("block_avg", "block-wise uniform averaging"),
    ("block_scalar", "one scalar per model per block (trained)"),
    ("sabw_no_time", "SABW without timestep input (trained)"),
    ("sabw_no_text", "SABW without text input (trained)"),
    ("sabw_full", "AFA full SABW (trained)"),
]
# Denoising: held-out latents noised to T_START, sampled back with Euler in S steps; x0-MSE.
# map_refresh k re-uses the trained SABW's maps for k steps (the inference speed option).
DENOISE_VARIANTS = [("expert1", "expert 1 alone"), ("expert2", "expert 2 alone"), ("noise_avg", "noise averaging"),
                    ("block_avg", "block-wise averaging"), ("sabw_full", "AFA full SABW"),
                    ("sabw_full_r2", "AFA full SABW, map_refresh 2"), ("sabw_full_r3", "AFA full SABW, map_refresh 3")]
DENOISE_STEPS = (4, 10)
DENOISE_SAMPLES = 48  # the first held-out samples (a sampling run costs `steps` evaluations)
T_START = 600


# ---------------------------------------------------------------- data
def _blobs(g):
    yy, xx = torch.meshgrid(torch.arange(H // 2, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    out = torch.zeros(2, H // 2, W)
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        cy, cx = float(torch.rand((), generator=g)) * (H // 2), float(torch.rand((), generator=g)) * W
        s = 1.5 + 1.5 * float(torch.rand((), generator=g))
        amp = (0.8 + 0.8 * torch.rand(2, generator=g)) * torch.where(torch.rand(2, generator=g) < 0.5, -1.0, 1.0)
        out += amp.view(2, 1, 1) * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return out


def _stripes(g):
    yy, xx = torch.meshgrid(torch.arange(H // 2, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    theta = float(torch.rand((), generator=g)) * math.pi
    freq = 0.12 + 0.2 * float(torch.rand((), generator=g))
    phase = float(torch.rand((), generator=g)) * 2 * math.pi
    arg = 2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase
    amp = 0.8 + 0.6 * float(torch.rand((), generator=g))
    return amp * torch.stack([torch.sin(arg), torch.cos(arg)])


def make_latent(kind, g):
    x = torch.zeros(4, H, W)
    if kind in (0, 2):
        x[0:2, : H // 2] = _blobs(g)
    if kind in (1, 2):
        x[2:4, H // 2:] = _stripes(g)
    return x + 0.02 * torch.randn(x.shape, generator=g)


def caption_table():
    """Learning-free 'text encoder': one-hot(kind) @ fixed random projection -> (TOKENS, CONTEXT_DIM)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(len(KINDS), TOKENS, CONTEXT_DIM, generator=g)


def make_set(n, kinds_p, seed):
    """n samples; kind drawn with probabilities kinds_p. Returns latents, kinds."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.multinomial(torch.tensor(kinds_p), n, replacement=True, generator=g)
    return torch.stack([make_latent(int(k), g) for k in kinds]), kinds


# ---------------------------------------------------------------- models
def build_unet(seed):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(seed)
    unet = UNetModel(**UNET, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    # comfy's ops skip weight init (weights come from checkpoints): initialise as torch would.
    for m in unet.modules():
        for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
                break
    return unet.float()


def noisy(schedule, x0, g):
    t = torch.randint(len(schedule), (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    sigma = schedule.sigmas[t]
    x_in = schedule.model_input(sigma, x0 + sigma.view(-1, 1, 1, 1) * noise)
    return x_in, t.float(), noise


def train_unet(unet, schedule, latents, kinds, ctx_table, steps, batch, lr, kind_p, seed):
    """Plain eps-MSE training; each batch draws kinds with probabilities kind_p."""
    g = torch.Generator().manual_seed(seed)
    by_kind = [torch.nonzero(kinds == k).flatten() for k in range(len(KINDS))]
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    unet.train().requires_grad_(True)
    loss = None
    for step in range(steps):
        ks = torch.multinomial(torch.tensor(kind_p), batch, replacement=True, generator=g)
        idx = torch.stack([by_kind[k][torch.randint(len(by_kind[k]), (1,), generator=g)][0] for k in ks])
        x_in, t, noise = noisy(schedule, latents[idx], g)
        pred = unet(x_in, t, context=ctx_table[kinds[idx]], transformer_options={})
        loss = (pred - noise).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        opt.step()
    return unet.eval().requires_grad_(False), float(loss.detach()) if loss is not None else float("nan")


def make_mixer(key, layout, n, seed):
    from afa_nodes.core.ensemble import BlockScalarMixer, SABWMixer, noise_average_mixer, uniform_mixer
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    points = len(layout.points)
    if key == "noise_avg":
        return noise_average_mixer(points, n), []
    if key == "block_avg":
        return uniform_mixer(points, n), []
    if key == "block_scalar":
        mixer = BlockScalarMixer(points, n)
        return mixer, list(mixer.parameters())
    agg = Aggregator(layout.point_channels, SABWConfig(num_models=n, hidden=32, heads=4, depth=1,
                                                       context_dim=layout.context_dim,
                                                       time_embed_dim=layout.time_embed_dim))
    agg.reset_parameters(seed)
    mixer = SABWMixer(agg, time_input=key != "sabw_no_time", text_input=key != "sabw_no_text")
    return mixer, list(agg.parameters())


def run_ensemble(executor, unets, x_in, t, ctx, step=None):
    """step: (sigma, rows) of a sampling step (map refresh tells steps apart by it), or None."""
    from afa_nodes.comfy_unet import ComfyExpert
    from afa_nodes.core.spec import StepContext
    experts = [ComfyExpert(u, {}, x_in, {}) for u in unets]
    call = StepContext() if step is None else StepContext(sigma=step[0], rows=step[1])
    return executor(experts, x_in, t, [ctx] * len(unets), None, None, call)


def train_mixer(params, executor, unets, schedule, latents, kinds, ctx_table, steps, batch, lr, seed):
    """Same budget for every trainable variant: same steps, batches, noise, AdamW settings."""
    if not params:
        return
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=g)
        x_in, t, noise = noisy(schedule, latents[idx], g)
        loss = (run_ensemble(executor, unets, x_in, t, ctx_table[kinds[idx]]) - noise).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10)
        opt.step()


@torch.no_grad()
def evaluate(executor, unets, val, ctx_table, bs=64):
    """Per-sample eps-MSE on the fixed held-out set."""
    latents, kinds, x_in, t, noise = val
    out = []
    for s in range(0, len(latents), bs):
        pred = run_ensemble(executor, unets, x_in[s:s + bs], t[s:s + bs], ctx_table[kinds[s:s + bs]])
        out.append((pred - noise[s:s + bs]).square().flatten(1).mean(1))
    return torch.cat(out)


@torch.no_grad()
def denoise(executor, unets, schedule, val, ctx_table, steps, seed):
    """Per-sample x0-MSE after noising the held-out latents to T_START and sampling back with
    Euler (sigma space) in `steps` steps; returns (mse, final latents)."""
    x0, kinds = val[0][:DENOISE_SAMPLES], val[1][:DENOISE_SAMPLES]
    ts = torch.linspace(T_START, 0, steps).round().long()
    sigmas = torch.cat([schedule.sigmas[ts], torch.zeros(1)])
    x = x0 + sigmas[0] * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    for i in range(steps):
        sigma = sigmas[i].expand(len(x))
        eps = run_ensemble(executor, unets, schedule.model_input(sigma, x), ts[i].float().expand(len(x)),
                           ctx_table[kinds], step=(float(sigmas[i]), ("val",)))
        x = x + eps * (sigmas[i + 1] - sigmas[i])
    return (x - x0).square().flatten(1).mean(1), x


def denoise_all(executors, unets, schedule, val, ctx_table, seed):
    """{variant: {steps: mean x0-MSE}} and the 10-step latents of the first samples (for a picture)."""
    from afa_nodes.core.ensemble import EnsembleExecutor, SABWMixer
    full = executors["sabw_full"].mixer
    executors = dict(executors)
    for k in (2, 3):
        executors[f"sabw_full_r{k}"] = EnsembleExecutor(executors["sabw_full"].layout,
                                                         SABWMixer(full.aggregator, refresh_every=k))
    out, pictures = {}, {}
    for key, _ in DENOISE_VARIANTS:
        models = [unets[int(key[-1]) - 1]] if key.startswith("expert") else unets
        out[key] = {}
        for steps in DENOISE_STEPS:
            mse, x = denoise(executors[key], models, schedule, val, ctx_table, steps, seed)
            out[key][steps] = float(mse.mean())
            pictures[key] = x[:PICTURE_SAMPLES]
    return out, pictures


def train_experts(seed, cfg, schedule, ctx_table):
    """The seed's data and its two experts fine-tuned from a shared base (also used by
    benchmarks/map_refresh_study.py). Returns (train latents, train kinds, val, unets, base loss)."""
    uniform_p = [1 / 3] * 3
    latents, kinds = make_set(cfg["train"], uniform_p, seed * 1000 + 1)
    v_lat, v_kinds = make_set(cfg["val"], uniform_p, seed * 1000 + 2)
    g = torch.Generator().manual_seed(seed * 1000 + 3)
    val = (v_lat, v_kinds, *noisy(schedule, v_lat, g))
    base, base_loss = train_unet(build_unet(seed), schedule, latents, kinds, ctx_table, cfg["base_steps"],
                                 cfg["batch"], 1e-3, uniform_p, seed * 1000 + 4)
    f = cfg["expert_focus"]
    rest = (1 - f) / 2
    unets = []
    for i, focus in enumerate((0, 1)):
        p = [rest] * 3
        p[focus] = f
        unet = build_unet(seed)
        unet.load_state_dict(base.state_dict())
        unets.append(train_unet(unet, schedule, latents, kinds, ctx_table, cfg["expert_steps"], cfg["batch"],
                                5e-4, p, seed * 1000 + 10 + i)[0])
    return latents, kinds, val, unets, base_loss


def run_seed(seed, cfg, schedule, ctx_table):
    from afa_nodes.core.ensemble import EnsembleExecutor, uniform_mixer
    from afa_nodes.core.layout import derive_layout
    t0 = time.perf_counter()
    latents, kinds, val, unets, base_loss = train_experts(seed, cfg, schedule, ctx_table)
    v_lat, v_kinds = val[:2]
    t_experts = time.perf_counter() - t0
    logger.info("  seed %d: base + experts trained in %.0f s", seed, t_experts)
    layout = derive_layout(unets[0])
    n, points = len(unets), len(layout.points)
    losses, executors = {}, {}
    for i in range(n):
        executors[f"expert{i + 1}"] = EnsembleExecutor(layout, uniform_mixer(points, 1))
        losses[f"expert{i + 1}"] = evaluate(executors[f"expert{i + 1}"], [unets[i]], val, ctx_table)
    for key, _ in VARIANTS[n:]:
        mixer, params = make_mixer(key, layout, n, seed)
        executors[key] = executor = EnsembleExecutor(layout, mixer)
        train_mixer(params, executor, unets, schedule, latents, kinds, ctx_table, cfg["agg_steps"],
                    cfg["agg_batch"], cfg["agg_lr"], seed * 1000 + 20)
        losses[key] = evaluate(executor, unets, val, ctx_table)
        logger.info("  seed %d %s: %.4f (%.0f s)", seed, key, float(losses[key].mean()), time.perf_counter() - t0)
    denoised, pictures = denoise_all(executors, unets, schedule, val, ctx_table, seed * 1000 + 30)
    logger.info("seed %d: base loss %.4f, experts %.0f s, total %.0f s; %s", seed, base_loss, t_experts,
                time.perf_counter() - t0, ", ".join(f"{k} {float(v.mean()):.4f}" for k, v in losses.items()))
    scores = {k: {"all": float(v.mean()), **{KINDS[j]: float(v[v_kinds == j].mean()) for j in range(len(KINDS))}}
              for k, v in losses.items()}
    return dict(eps=scores, denoise=denoised, pictures=dict(pictures, clean=v_lat[:PICTURE_SAMPLES]))


# ---------------------------------------------------------------- report
def summarize(per_seed):
    rows = []
    for key, label in VARIANTS:
        vals = [r["eps"][key]["all"] for r in per_seed]
        rows.append(dict(key=key, label=label, mean=statistics.mean(vals),
                         std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                         **{k: statistics.mean(r["eps"][key][k] for r in per_seed) for k in KINDS}))
    return rows


def denoise_markdown(per_seed):
    def cell(key, steps):
        vals = [r["denoise"][key][steps] for r in per_seed]
        return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.4f}"
    lines = ["| variant | " + " | ".join(f"x0-MSE after {s} Euler steps" for s in DENOISE_STEPS) + " |",
             "|---|" + "---|" * len(DENOISE_STEPS)]
    lines += [f"| {label} | " + " | ".join(cell(key, s) for s in DENOISE_STEPS) + " |" for key, label in DENOISE_VARIANTS]
    return "\n".join(lines)


def draw_samples(pictures, path):
    """Rows: clean held-out latents, then each variant's 10-step result. Latent channels 0, 2, 3 as RGB."""
    from PIL import Image, ImageDraw
    keys = ["clean"] + [k for k, _ in DENOISE_VARIANTS]
    labels = dict(DENOISE_VARIANTS, clean="held-out latent (target)")
    cell, left = 4 * H, 230
    img = Image.new("RGB", (left + PICTURE_SAMPLES * (cell + 4), len(keys) * (cell + 4) + 4), "white")
    d = ImageDraw.Draw(img)
    for row, key in enumerate(keys):
        y = 4 + row * (cell + 4)
        d.text((6, y + cell // 2 - 6), labels[key], fill="black")
        for col, latent in enumerate(pictures[key]):
            rgb = ((latent[[0, 2, 3]].clamp(-2, 2) + 2) / 4 * 255).byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(rgb).resize((cell, cell), Image.NEAREST)
            img.paste(tile, (left + col * (cell + 4), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def markdown(rows, seeds):
    best = min(r["mean"] for r in rows)
    lines = [f"| variant | eps-MSE mean ± std ({len(seeds)} seeds) | blobs | stripes | both |",
             "|---|---|---|---|---|"]
    for r in rows:
        mark = " **(best)**" if r["mean"] == best else ""
        lines.append(f"| {r['label']} | {r['mean']:.4f} ± {r['std']:.4f}{mark} | {r['blobs']:.4f} | "
                     f"{r['stripes']:.4f} | {r['both']:.4f} |")
    return "\n".join(lines)


def ordering_verdict(rows):
    by = {r["key"]: r["mean"] for r in rows}
    ens = ["noise_avg", "block_avg", "block_scalar", "sabw_no_time", "sabw_no_text", "sabw_full"]
    order = sorted(ens, key=lambda k: by[k])
    full_best = order[0] == "sabw_full"
    noise_worst = order[-1] == "noise_avg"
    return (f"Ensemble variants best to worst: {' < '.join(order)}. Paper's ordering (full SABW best, noise "
            f"averaging worst): full SABW best: {'yes' if full_best else 'NO'}; noise averaging worst: "
            f"{'yes' if noise_worst else 'NO'}.")


def draw_png(rows, path, title):
    from PIL import Image, ImageDraw
    w, h, left, top, bottom = 900, 460, 300, 40, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black")
    hi = max(r["mean"] + r["std"] for r in rows) * 1.1 or 1.0
    bar_h = (h - top - bottom) / len(rows)
    scale = (w - left - 80) / hi
    for i, r in enumerate(rows):
        y0 = top + i * bar_h + 4
        y1 = y0 + bar_h - 8
        color = (70, 120, 200) if r["key"].startswith(("sabw", "block_scalar")) else (160, 160, 160)
        if r["key"].startswith("expert"):
            color = (200, 150, 90)
        d.rectangle([left, y0, left + r["mean"] * scale, y1], fill=color)
        ym = (y0 + y1) / 2
        xl, xr = left + (r["mean"] - r["std"]) * scale, left + (r["mean"] + r["std"]) * scale
        d.line([xl, ym, xr, ym], fill="black", width=2)
        d.line([xl, ym - 5, xl, ym + 5], fill="black")
        d.line([xr, ym - 5, xr, ym + 5], fill="black")
        d.text((8, ym - 6), r["label"][:44], fill="black")
        d.text((xr + 6, ym - 6), f"{r['mean']:.4f}", fill="black")
    d.line([left, top, left, h - bottom], fill="black")
    d.text((left, h - bottom + 10), "held-out eps-MSE (lower is better), mean ± std over seeds", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def write_section(md_path, body):
    text = md_path.read_text(encoding="utf-8") if md_path.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start >= 0:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start].rstrip("\n") + ("\n\n" + text[nxt + 1:] if nxt >= 0 else "")
    md_path.write_text(text.rstrip("\n") + "\n\n" + SECTION + "\n\n" + body.strip() + "\n", encoding="utf-8")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings, < 60 s (smoke test)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--png", type=Path, default=None, help="bar chart (default benchmarks/results/quality.png; "
                                                            "--quick writes none unless given)")
    p.add_argument("--md", type=Path, default=None, help="BENCHMARKS.md to update (default the repo's; "
                                                           "--quick writes none unless given)")
    p.add_argument("--comfyui", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    from afa_nodes.comfy_env import boot_comfyui
    boot_comfyui(args.comfyui)
    from afa_nodes.core.train import NoiseSchedule
    cfg = dict(SETTINGS["quick" if args.quick else "full"])
    if args.seeds:
        cfg["seeds"] = args.seeds
    png = args.png or (None if args.quick else REPO / "benchmarks" / "results" / "quality.png")
    md = args.md or (None if args.quick else REPO / "BENCHMARKS.md")
    schedule, ctx_table = NoiseSchedule.scaled_linear(), caption_table()
    per_seed = [run_seed(s, cfg, schedule, ctx_table) for s in cfg["seeds"]]
    rows = summarize(per_seed)
    table = markdown(rows, cfg["seeds"]) + "\n\n" + denoise_markdown(per_seed)
    verdict = ordering_verdict(rows)
    runtime = time.perf_counter() - start
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = (f"{platform.processor() or platform.machine()}, {platform.system()}, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, CPU")
    settings = ", ".join(f"{k}={v}" for k, v in cfg.items())
    logger.info("\n%s\n\n%s\nruntime %.0f s", table, verdict, runtime)
    if png is not None:
        draw_png(rows, png, f"AFA ablations, synthetic latents, {len(cfg['seeds'])} seeds ({datetime.date.today()})")
        draw_samples(per_seed[0]["pictures"], png.with_name("quality_samples.png"))
        logger.info("plot: %s, samples: %s", png, png.with_name("quality_samples.png"))
    if md is not None:
        body = (f"Command: `{command.strip()}`  \nMachine: {machine}  \nDate: {datetime.date.today()}, "
                f"runtime {runtime / 60:.1f} min  \nSettings: {settings}  \n"
                "Synthetic 4x16x16 latents (blobs top / stripes bottom / both), 2 experts fine-tuned from a "
                "shared tiny base UNet (expert 1 mostly blobs, expert 2 mostly stripes); aggregators hidden 32, "
                "4 heads, depth 1, same budget each. Per-kind columns are means over seeds. "
                f"Second table: the first {DENOISE_SAMPLES} held-out latents noised to t={T_START} and denoised with Euler in "
                f"{' or '.join(map(str, DENOISE_STEPS))} steps (x0-MSE, lower is better); map_refresh k re-uses the "
                "maps for k steps. Plot: benchmarks/results/quality.png; samples (first seed, 10 steps; latent "
                "channels 0/2/3 as RGB): benchmarks/results/quality_samples.png\n\n" + table + "\n\n" + verdict)
        write_section(md, body)
        logger.info("updated %s", md)
    return dict(rows=rows, table=table, verdict=verdict, per_seed=per_seed, runtime=runtime)


if __name__ == "__main__":
    main()
