"""`python -m afa_nodes train`: train an aggregator from the command line (same code path as the node).

    python -m afa_nodes train --checkpoint a.safetensors --checkpoint b.safetensors \
        --data my_images/ --out models/afa/mine.safetensors --steps 1000 --batch-size 8

Data parallel: launch with torchrun, e.g. `torchrun --nproc_per_node 2 -m afa_nodes train ...`
(gloo on CPU, nccl on GPU). `--batch-size` is the GLOBAL batch: each rank takes a shard of
every micro-batch and the aggregator gradients are summed over ranks, so the result matches
one process. Only rank 0 writes files and logs. Ctrl-C stops cleanly after the current step
and leaves a file that `--resume` continues.
"""
import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from . import logger
from .core.errors import AFAError

EXIT_ERROR, EXIT_CANCELLED = 2, 130


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--checkpoint", action="append", required=True, metavar="FILE",
                        help="a checkpoint of the ensemble (give 2-6, in order)")
    parser.add_argument("--data", required=True, metavar="DIR", help="folder of images with same-name .txt captions")
    parser.add_argument("--out", required=True, metavar="FILE", help="aggregator file to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=1000, help="total optimizer steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch per micro-step (default 8)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    parser.add_argument("--resolution", type=int, default=512, help="training size in pixels (square; with --buckets, the area) (default 512)")
    parser.add_argument("--crop", choices=["center", "random"], default="center",
                        help="center crop, or seeded random crops (validation: always center; default center)")
    parser.add_argument("--crop-variants", type=int, default=4, metavar="K",
                        help="with --crop random: crops cached per training image (default 4)")
    parser.add_argument("--buckets", action=argparse.BooleanOptionalAction, default=False,
                        help="aspect-ratio buckets of about resolution^2 pixels (default off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=500, help="save and validate every K steps (0: at the end)")
    parser.add_argument("--resume", action="store_true", help="continue --out (same checkpoints required)")
    parser.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute frozen blocks in backprop (default: on with a GPU, off on CPU)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of images held out (default 0.1)")
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto")
    parser.add_argument("--cache-dir", default=None, help="encode cache (default DIR/.afa_cache)")
    parser.add_argument("--comfyui", default=None, metavar="PATH", help="ComfyUI folder (default: found automatically)")


def _distributed():
    """(rank, world_size, local_rank) from torchrun's environment."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _load_models(paths):
    import comfy.sd
    import folder_paths

    from .core.aggregator_file import file_sha256
    from .ensemble_model import build_ensemble
    from .per_model_clip import PerModelCLIP

    patchers, clips, vae = [], [], None
    for path in paths:
        if not path.is_file():
            raise AFAError(f"checkpoint not found: {path}")
        model, clip, this_vae = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
        if model is None or clip is None:
            raise AFAError(f"{path.name} has no diffusion model or no text encoder: training needs full checkpoints.")
        patchers.append(model)
        clips.append(clip)
        vae = vae or this_vae
    names = [p.name for p in paths]
    model = build_ensemble(patchers, names, [file_sha256(p) for p in paths], mode="block-wise average",
                           sources=[str(p) for p in paths])
    return model, PerModelCLIP.from_clips(clips), vae


def run(args) -> int:
    rank, world, local_rank = _distributed()
    if rank != 0:
        logger.setLevel(logging.WARNING)
    try:
        return _run(args, rank, world, local_rank)
    except AFAError as e:
        logger.error("%s", e)
        return EXIT_ERROR


def _run(args, rank, world, local_rank) -> int:
    import torch

    from . import comfy_env

    cuda = torch.cuda.is_available()
    comfy_env.boot_comfyui(args.comfyui, extra_args=["--cuda-device", str(local_rank)] if cuda and world > 1 else ())
    if world > 1:
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        from .core.train import Comm, TrainConfig
        from .training_host import train_from_comfy

        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                             weight_decay=args.weight_decay, warmup_steps=args.warmup, seed=args.seed,
                             save_every=args.save_every, caption_dropout=args.caption_dropout,
                             mixed_precision=args.mixed_precision, gradient_checkpointing=args.grad_checkpointing)
        if len(args.checkpoint) < 2:
            raise AFAError("give at least two --checkpoint files to ensemble.")
        model, clip, vae = _load_models([Path(p).expanduser() for p in args.checkpoint])
        stop = {"flag": False}
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            if stop["flag"]:  # second Ctrl-C: give up at once
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            stop["flag"] = True
            logger.warning("stopping after this step (Ctrl-C again to abort without saving)")
        signal.signal(signal.SIGINT, on_sigint)
        bar = _progress_bar(args.steps) if rank == 0 else None
        try:
            result = train_from_comfy(model, clip, vae, Path(args.data).expanduser(), Path(args.out).expanduser(),
                                      config, resolution=args.resolution, val_fraction=args.val_fraction,
                                      resume=args.resume, should_stop=lambda: stop["flag"],
                                      progress=bar, status=lambda text: logger.info("%s", text),
                                      comm=Comm.current(), cache_dir=args.cache_dir, crop=args.crop,
                                      crop_variants=args.crop_variants, buckets=args.buckets)
        finally:
            signal.signal(signal.SIGINT, previous)
            if bar is not None:
                bar.close()
        if rank == 0:
            logger.info("%s", result.report)
            if result.stopped and result.path is None:
                logger.info("stopped before the first step: %s was not written", args.out)
            else:
                logger.info("%s %s (step %d)", "cancelled; resumable:" if result.stopped else "wrote", args.out,
                            result.step)
        return EXIT_CANCELLED if result.stopped else 0
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class _progress_bar:
    """tqdm on stderr when available, else a log line every 5% of the steps."""

    def __init__(self, total):
        self.total, self.tqdm = total, None

    def __call__(self, step, total, loss):
        if self.tqdm is None:  # created at the first step: encoding the dataset is not training time
            try:
                from tqdm import tqdm
                self.tqdm = tqdm(total=total, initial=step - 1, desc="AFA training", unit="step",
                                 file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self.tqdm = False
        if self.tqdm:
            self.tqdm.set_postfix(loss=f"{loss:.5f}", refresh=False)
            self.tqdm.update(step - self.tqdm.n)
        elif step == total or step % max(1, total // 20) == 0:
            logger.info("step %d/%d  loss %.5f", step, total, loss)

    def close(self):
        if self.tqdm:
            self.tqdm.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m afa_nodes.cli_train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
