"""`python -m afa_nodes generate`: run an AFA ensemble through ComfyUI (as a library) and
write the image, next to each base model's image for the same seed.

Without --checkpoint it builds small SYNTHETIC demo checkpoints (random weights, clearly
named so) to show the whole pipeline working in about a minute on a CPU.
"""
from dataclasses import asdict
from pathlib import Path

import torch

from . import logger
from .core.image_file import save_png
from .core.spec import FULL_RES_HELP, FULL_RES_NAMES, MODE_NAMES, FullRes, Mode


def add_arguments(p):
    p.add_argument("--checkpoint", action="append", default=[],
                   help="checkpoint file (2-6 times); default: synthetic demo checkpoints")
    p.add_argument("--aggregator", help="aggregator .safetensors (mode 'aggregator')")
    p.add_argument("--mode", default=None, help=f"{' | '.join(MODE_NAMES)} (default: {Mode.AGGREGATOR} "
                   f"if --aggregator is given, else {Mode.BLOCK_AVERAGE})")
    p.add_argument("--weights", default="", help=f"for '{Mode.FIXED_WEIGHTS}', e.g. '0.6,0.4'")
    p.add_argument("--full-res", default=FullRes.EXACT.value, choices=FULL_RES_NAMES, help=FULL_RES_HELP)
    p.add_argument("--prompt", default="a watercolor painting of a lighthouse at dawn")
    p.add_argument("--negative", default="")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compare", action="store_true", help="skip each base model's own image")
    p.add_argument("--maps", default="middle, final", help="aggregation points whose attention maps are "
                   "written (e.g. 'all', '0-11', 'middle'); 'none' to skip")
    p.add_argument("--out", default="afa_output", help="output folder")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH, the one "
                   "this pack is installed in, ~/comfy/ComfyUI)")


def run(args) -> int:
    from .comfy_env import boot_comfyui
    boot_comfyui(args.comfyui)
    from .core.errors import AFAError
    from .core.spec import EnsembleSpec, parse_mode
    from .service import maps, models, sampling

    synthetic = not args.checkpoint
    if synthetic:
        from .demo_checkpoints import ensure_demo_checkpoints
        paths = ensure_demo_checkpoints(models.DEMO_DIR, "sd15", models.DEMO_COUNT)
        logger.warning("No --checkpoint given: using SYNTHETIC demo checkpoints with random weights in %s. "
                       "The images show the pipeline works, not a picture. Pass --checkpoint A "
                       "--checkpoint B to ensemble your own models.", models.DEMO_DIR)
    else:
        paths = [Path(p).expanduser().resolve() for p in args.checkpoint]
    try:
        mode = parse_mode(args.mode) if args.mode else (Mode.AGGREGATOR if args.aggregator else Mode.BLOCK_AVERAGE)
        spec = EnsembleSpec.from_ui([str(p) for p in paths], mode, args.aggregator, args.weights,
                                    full_res=args.full_res).checked()
        size = 128 if synthetic else 512
        settings = sampling.SampleSettings(
            prompt=args.prompt, negative=args.negative, width=args.width or size, height=args.height or size,
            steps=args.steps or (8 if synthetic else 20), cfg=args.cfg, sampler=args.sampler,
            scheduler=args.scheduler, seed=args.seed).checked()
        written = _generate(spec, settings, synthetic, args, models, sampling, maps)
    except AFAError as e:
        logger.error("%s", e)
        return 2
    for path in written:
        logger.info("wrote %s", path)
    return 0


def _generate(spec, settings, synthetic, args, models, sampling, maps) -> list:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [Path(p).name for p in spec.checkpoints]
    meta = dict(asdict(settings), mode=spec.mode.value, checkpoints=names, aggregator=args.aggregator,
                synthetic=synthetic)
    with torch.inference_mode():
        loaded = models.load_ensemble(spec)
        model, recorder = loaded.model, None
        if args.maps != "none" and spec.mode.mixes:
            model, recorder = maps.record_maps(model, points="all")
        samples, images = sampling.sample(model, loaded.clip, loaded.vae, settings)
        written = [save_png(images[0], out_dir / "afa_ensemble.png", {"afa": dict(meta, image="afa_ensemble.png")})]
        if recorder is not None:
            preview = maps.preview_maps(recorder, samples, args.maps, -1, "cond", 0, 96, images)
            outputs = [(f"afa_maps_grid_{i}.png", g) for i, g in enumerate(preview.grid)]
            outputs += [("afa_maps_dominant.png", preview.dominant[0]), ("afa_maps_overlay.png", preview.overlay[0]),
                        ("afa_maps_chart.png", preview.chart[0])]
            written += [save_png(img, out_dir / name) for name, img in outputs]
        if not args.no_compare:  # each base model once, re-using the ensemble's loaded checkpoints
            for ckpt in {c.path: c for c in loaded.checkpoints}.values():
                path = out_dir / f"base_{ckpt.path.stem}.png"
                _, base_images = sampling.sample(ckpt.model, ckpt.clip, ckpt.vae, settings)
                written.append(save_png(base_images[0], path, {"afa": dict(meta, image=path.name)}))
    return written
