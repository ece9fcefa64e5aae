"""Per-step cost of recording AFA weight maps (all points, all steps) vs recording off.

Two random-weight SD1.5-architecture UNets ensembled with a paper-size aggregator (SABW
d=128, depth 2), sampled through ComfyUI's real sampler path (KSampler's
comfy.sample.sample, euler, CFG so cond and uncond are both recorded). "off" is the AFA
MODEL as the loader returns it; "on" is AFA Record Attention's clone with points "all",
steps "all". Runs alternate off/on (order flipped each repeat) in one process; the
medians of seconds per step are compared.

    python benchmarks/recording_overhead.py                  # tiny UNet, 256 px (32x32 latent)
    python benchmarks/recording_overhead.py --full --size 256 # full SD1.5 UNet (~7 GB RAM fp32)
"""
import argparse
import datetime
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afa_nodes import logger

from unet_configs import BASE, SD15_FULL, SD15_TINY  # noqa: E402


def build_patcher(config, seed):
    """A ModelPatcher around a random-weight SD1.5-architecture model."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    torch.manual_seed(seed)
    model = comfy.supported_models.SD15(dict(BASE, **config)).get_model({})
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.normal_(0, 0.02)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_afa_model(patchers, folder):
    from afa_nodes.core.aggregator_file import load_aggregator, save_aggregator
    from afa_nodes.core.layout import derive_layout
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    from afa_nodes.core.spec import EnsembleSpec, Mode
    from afa_nodes.ensemble_model import build_ensemble
    layout = derive_layout(patchers[0].model.diffusion_model)
    agg = Aggregator(layout.point_channels, SABWConfig(len(patchers)))
    with torch.no_grad():
        for block in agg.blocks:
            block.conv_out.weight.normal_(0, 0.1)  # non-uniform maps: the real work
    path = Path(folder) / "bench_aggregator.safetensors"
    save_aggregator(path, agg, layout, [])
    names = [f"model {i + 1}" for i in range(len(patchers))]
    return build_ensemble(patchers, names, EnsembleSpec(mode=Mode.AGGREGATOR), load_aggregator(path))


def seconds_per_step(model, latent, steps, cond):
    import comfy.sample
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    comfy.sample.sample(model, noise, steps, 4.0, "euler", "normal", cond, cond, latent, disable_pbar=True, seed=0)
    return (time.perf_counter() - start) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="full SD1.5 UNet instead of the tiny one")
    p.add_argument("--size", type=int, default=None, help="image side in px (default 256)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--comfyui", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from afa_nodes.comfy_env import boot_comfyui
    boot_comfyui(args.comfyui)
    from afa_nodes.ensemble_model import with_recorder
    from afa_nodes.service.maps import record_maps
    size = args.size or 256
    patchers = [build_patcher(SD15_FULL if args.full else SD15_TINY, seed) for seed in range(2)]
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        off = build_afa_model(patchers, folder)
        on, recorder = record_maps(off, points="all", steps="all", max_side=64, cap_mb=4096)
        spent = [0.0]

        def timed_recorder(point, weights, ctx):  # the recorder's own time, free of machine noise
            start = time.perf_counter()
            recorder(point, weights, ctx)
            spent[0] += time.perf_counter() - start
        on = with_recorder(on, timed_recorder)  # keeps the clone's OUTER_SAMPLE "afa_maps" wrapper
        latent = torch.zeros(1, 4, size // 8, size // 8)
        cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
        seconds_per_step(off, latent, 1, cond)  # warm-up
        seconds_per_step(on, latent, 1, cond)
        times = {"off": [], "on": []}
        for r in range(args.repeats):  # interleaved, order flipped: machine noise hits both alike
            for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
                times[name].append(seconds_per_step(off if name == "off" else on, latent, args.steps, cond))
        run = recorder.runs[-1]
        self_time = spent[0] / (len(times["on"]) * args.steps + 1)
    t_off, t_on = statistics.median(times["off"]), statistics.median(times["on"])
    arch = "full SD1.5" if args.full else "tiny SD1.5"
    logger.info("| UNet | px | steps x repeats | off s/step (median) | on s/step (median) | ratio on/off |")
    logger.info("|---|---|---|---|---|---|")
    logger.info("| %s | %d | %d x %d | %.4f | %.4f | %.3f |", arch, size, args.steps, args.repeats, t_off, t_on,
                t_on / t_off)
    logger.info("recorder's own time: %.2f ms per step (%.2f%% of an 'off' step)", self_time * 1e3,
                100 * self_time / t_off)
    logger.info("recorded per run: %s", run.summary())
    logger.info("command: python benchmarks/recording_overhead.py %s | %s, torch %s, %d threads, %s",
                " ".join(argv if argv is not None else sys.argv[1:]), platform.processor() or platform.machine(),
                torch.__version__, torch.get_num_threads(), datetime.date.today())
    return t_off, t_on


if __name__ == "__main__":
    main()
