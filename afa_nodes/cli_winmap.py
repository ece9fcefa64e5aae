"""`python -m afa_nodes winmap`: which model denoises best where, before any training.

Runs service.winmap.win_map, as the AFA Win Map node and the studio do, and writes to --out:
winmap.png (every step's winners + the proportion of wins), winmap_wins.png (the plot),
winmap_step_<k>.png (one per step), winmap.json (shares, winners, errors, verdict) and
winmap.csv (one row per step: each model's share of wins and mean error). The verdict goes to
the log. With --evaluate (held-out evaluation; give images the aggregator was not trained
on) the ensemble of --mode / --aggregator is measured beside each model: evaluation.png and
evaluation.txt.

    python -m afa_nodes winmap --checkpoint a.safetensors --checkpoint b.safetensors \
        --data my_images/ --out winmap_out/ --steps 4 --seeds 4
    python -m afa_nodes winmap --checkpoint a.safetensors --checkpoint b.safetensors \
        --data held_out/ --out eval_out/ --evaluate --mode aggregator --aggregator mine.safetensors

Ctrl-C stops after the current (image, step) and writes what was measured.
"""
import argparse
import csv
import json
import os
import signal
from pathlib import Path

from . import logger
from .core.errors import AFAError
from .core.files import atomic_write
from .core.image_file import save_png
from .core.spec import MODE_HELP, MODE_NAMES, WEIGHTS_HELP, EnsembleSpec, Mode
from .core.winmap import GRID, MAX_STEPS

EXIT_ERROR, EXIT_CANCELLED = 2, 130


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--checkpoint", action="append", required=True, metavar="FILE", type=os.path.expanduser,
                        help="a checkpoint to compare (give 2-6, in order)")
    parser.add_argument("--data", required=True, metavar="DIR", type=os.path.expanduser,
                        help="folder of images with same-name .txt captions (or metadata.jsonl)")
    parser.add_argument("--out", required=True, metavar="DIR", type=os.path.expanduser,
                        help="folder for the pictures, winmap.json and winmap.csv (created)")
    parser.add_argument("--steps", type=int, default=4, help=f"noise levels, 1-{MAX_STEPS} (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per image (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the first noise seed (default: %(default)s)")
    parser.add_argument("--grid", type=int, default=GRID, help="regions per side (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=512, help="square crop size (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=0, help="use at most this many images (0: all)")
    parser.add_argument("--evaluate", action="store_true",
                        help="also measure the ensemble (--mode, --aggregator) beside each model")
    parser.add_argument("--mode", choices=MODE_NAMES, default=Mode.BLOCK_AVERAGE.value,
                        help="the evaluated ensemble's mode (default: %(default)s). " + MODE_HELP.replace("%", "%%"))
    parser.add_argument("--aggregator", default=None, help=f"aggregator file (mode '{Mode.AGGREGATOR.value}')")
    parser.add_argument("--weights", default="", help=WEIGHTS_HELP.replace("%", "%%"))
    parser.add_argument("--model-index", type=int, default=1,
                        help=f"mode '{Mode.SINGLE_MODEL.value}': which model (1-based)")
    parser.add_argument("--comfyui", default=None, metavar="PATH", help="ComfyUI folder (default: found automatically)")


def run(args) -> int:
    try:
        return _run(args)
    except AFAError as e:
        logger.error("%s", e)
        return EXIT_ERROR


def _run(args) -> int:
    from .comfy_env import boot_comfyui

    spec = None
    if args.evaluate:  # bad flags fail before ComfyUI boots
        spec = EnsembleSpec.from_ui(args.checkpoint, args.mode, args.aggregator, args.weights,
                                    args.model_index).checked()
    boot_comfyui(args.comfyui)
    from .service import models, winmap

    settings = winmap.WinMapSettings(dataset=Path(args.data).resolve(), steps=args.steps,
                                     seeds=tuple(range(args.seed, args.seed + args.seeds)), grid=args.grid,
                                     resolution=args.resolution, max_images=args.max_images)
    if not settings.dataset.is_dir():
        raise AFAError(f"--data {args.data}: no such folder of captioned images.")
    experts, clip, vae = models.experts_from_files(args.checkpoint)
    stop = {"flag": False}
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        stop["flag"] = True
        logger.warning("stopping after this image and step")
    signal.signal(signal.SIGINT, on_sigint)
    last = {"pct": -1}

    def progress(done, total):
        pct = 100 * done // total
        if pct // 10 != last["pct"] // 10 or done == total:
            logger.info("win map: %d/%d (image, step) done", done, total)
        last["pct"] = pct
    try:
        result = winmap.win_map(experts, clip, vae, settings, spec, progress=progress,
                                should_stop=lambda: stop["flag"], status=lambda text: logger.info("%s", text))
    finally:
        signal.signal(signal.SIGINT, previous)
    write_outputs(Path(args.out), result)
    logger.info("verdict: %s", result.verdict)
    if result.report:
        logger.info("%s", result.report)
    return EXIT_CANCELLED if result.table.stopped else 0


def write_outputs(out: Path, result) -> None:
    """The pictures, winmap.json and winmap.csv (and the evaluation) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    table = result.table
    save_png(result.overview[0], out / "winmap.png", {"afa_winmap": table.to_dict()})
    save_png(result.share_plot[0], out / "winmap_wins.png")
    for k in range(result.winners.shape[0]):
        save_png(result.winners[k], out / f"winmap_step_{k + 1}.png")
    text = json.dumps(table.to_dict(), indent=1)
    atomic_write(out / "winmap.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    names = table.names[:table.num_experts]
    share, errors = table.step_share(), table.step_errors()

    def write_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["step", "timestep", "sigma"] + [f"wins {n}" for n in names] + [f"error {n}" for n in table.names])
            for s, t in enumerate(table.timesteps):
                w.writerow([s + 1, t, f"{table.sigmas[s]:.6g}"] + [f"{float(v):.6f}" for v in share[s]]
                           + [f"{float(v):.6g}" for v in errors[s]])
    atomic_write(out / "winmap.csv", write_csv)
    if result.evaluation is not None:
        save_png(result.evaluation[0], out / "evaluation.png")
        atomic_write(out / "evaluation.txt", lambda tmp: Path(tmp).write_text(result.report + "\n", encoding="utf-8"))
    logger.info("wrote %s (winmap.png, winmap.json, winmap.csv%s)", out,
                ", evaluation.png" if result.evaluation is not None else "")
