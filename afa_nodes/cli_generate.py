"""`python -m afa_nodes generate`: run an AFA ensemble through ComfyUI (as a library) and
write the image, next to each base model's image for the same seed.

Without --checkpoint it builds small SYNTHETIC demo checkpoints (random weights, clearly
named so) to show the whole pipeline working in about a minute on a CPU.
"""
from pathlib import Path

import torch

from . import logger
from .core.image_file import save_png

DEMO_DIR = Path.home() / ".cache" / "comfyui-afa" / "demo-checkpoints"


def add_arguments(p):
    p.add_argument("--checkpoint", action="append", default=[],
                   help="checkpoint file (2-6 times); default: synthetic demo checkpoints")
    p.add_argument("--aggregator", help="aggregator .safetensors (mode 'aggregator')")
    p.add_argument("--mode", default=None, help="aggregator | block-wise average | noise average | "
                   "fixed weights | single model (default: aggregator if given, else block-wise average)")
    p.add_argument("--weights", default="", help="for 'fixed weights', e.g. '0.6,0.4'")
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
    import comfy.sd
    import folder_paths
    import nodes

    from .core.aggregator_file import load_aggregator
    from .nodes_ensemble import AFAEnsembleLoader, NONE

    synthetic = not args.checkpoint
    if synthetic:
        from .demo_checkpoints import ensure_demo_checkpoints
        paths = ensure_demo_checkpoints(DEMO_DIR, "sd15", 3)
        logger.warning("No --checkpoint given: using SYNTHETIC demo checkpoints with random weights in %s. "
                       "The images show the pipeline works, not a picture. Pass --checkpoint A "
                       "--checkpoint B to ensemble your own models.", DEMO_DIR)
    else:
        paths = [Path(p).expanduser().resolve() for p in args.checkpoint]
    for path in paths:
        if not path.is_file():
            logger.error("checkpoint not found: %s", path)
            return 2
        folder_paths.add_model_folder_path("checkpoints", str(path.parent))
    if args.aggregator:
        folder_paths.add_model_folder_path("afa", str(Path(args.aggregator).resolve().parent))
    mode = args.mode or ("aggregator" if args.aggregator else "block-wise average")
    width = args.width or (128 if synthetic else 512)
    height = args.height or (128 if synthetic else 512)
    steps = args.steps or (8 if synthetic else 20)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(prompt=args.prompt, negative=args.negative, width=width, height=height, steps=steps,
                    cfg=args.cfg, sampler=args.sampler, scheduler=args.scheduler, seed=args.seed, mode=mode,
                    checkpoints=[p.name for p in paths], aggregator=args.aggregator, synthetic=synthetic)

    with torch.inference_mode():
        ckpts = {f"ckpt_{i + 1}": p.name for i, p in enumerate(paths)}
        agg_name = Path(args.aggregator).name if args.aggregator else NONE
        if args.aggregator:
            load_aggregator(args.aggregator)  # fail early with the file's own message
        model, clip, vae = AFAEnsembleLoader().load(agg_name, mode, args.weights, 1, **ckpts)
        recorder = None
        if args.maps != "none" and mode != "single model":
            from .nodes_maps import record
            model, recorder = record(model, points="all")
        path, samples, image = _sample_and_save(nodes, model, clip, vae, settings, out_dir / "afa_ensemble.png")
        written = [path]
        if recorder is not None:
            written += _save_maps(recorder, samples, image, args.maps, out_dir)
        if not args.no_compare:
            for path in paths:
                base, base_clip, base_vae = comfy.sd.load_checkpoint_guess_config(str(path))[:3]
                written.append(_sample_and_save(nodes, base, base_clip, base_vae, settings,
                                                out_dir / f"base_{path.stem}.png")[0])
    for path in written:
        logger.info("wrote %s", path)
    return 0


def _sample_and_save(nodes, model, clip, vae, settings, path):
    s = settings
    positive = nodes.CLIPTextEncode().encode(clip, s["prompt"])[0]
    negative = nodes.CLIPTextEncode().encode(clip, s["negative"])[0]
    latent = nodes.EmptyLatentImage().generate(s["width"], s["height"], 1)[0]
    samples = nodes.KSampler().sample(model, s["seed"], s["steps"], s["cfg"], s["sampler"], s["scheduler"],
                                      positive, negative, latent)[0]
    images = nodes.VAEDecode().decode(vae, samples)[0]
    save_png(images[0], path, {"afa": dict(s, image=path.name)})
    return path, samples, images


def _save_maps(recorder, samples, image, points, out_dir):
    """Attention maps of the ensemble run: grid per point (rows = steps), dominant model, overlay, chart."""
    from .nodes_maps import AFAAttentionPreview
    grids, dominant, overlay, chart = AFAAttentionPreview().preview(
        recorder, samples, points, -1, "cond", 0, 96, image)["result"]
    outputs = [(f"afa_maps_grid_{i}.png", g) for i, g in enumerate(grids)]
    outputs += [("afa_maps_dominant.png", dominant[0]), ("afa_maps_overlay.png", overlay[0]),
                ("afa_maps_chart.png", chart[0])]
    return [save_png(img, out_dir / name) for name, img in outputs]
