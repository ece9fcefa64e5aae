"""`python -m afa_nodes train`: train an aggregator from the command line.

Trains through service.training.train, as the node and the studio do; the flags are generated
from core.train_config.TrainConfig (one flag per field the CLI shows, dest = the field name).

    python -m afa_nodes train --checkpoint a.safetensors --checkpoint b.safetensors \
        --data my_images/ --out models/afa/mine.safetensors --steps 1000 --batch-size 8

DiTs shared as split files (FLUX, SD3.5, Chroma, ...): the diffusion models, their text encoders
with the type ComfyUI's "Load CLIP" / DualCLIPLoader would use, and the VAE (names from
ComfyUI's models/diffusion_models, text_encoders and vae folders, or paths):

    python -m afa_nodes train --diffusion-model flux_a.safetensors flux_b.safetensors \
        --clip clip_l.safetensors t5xxl_fp16.safetensors --clip-type flux --vae ae.safetensors \
        --data my_images/ --out models/afa/flux_mine.safetensors

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

from . import logger
from .core.errors import AFAError
from .core.spec import CLIP_TYPES
from .core.train_config import CLI, RUN_NEEDS, TrainConfig, options

EXIT_ERROR, EXIT_CANCELLED = 2, 130


def add_arguments(parser: argparse.ArgumentParser):
    """The experts (--checkpoint, or --diffusion-model with --clip, --clip-type, --vae) and
    --comfyui, then one flag per TrainConfig field the CLI shows (its Opt: flag, help, choices;
    the field's default; dest = the field's name)."""
    parser.add_argument("--checkpoint", action="append", metavar="FILE", type=os.path.expanduser,
                        help="a checkpoint of the ensemble (give 2-6, in order)")
    parser.add_argument("--diffusion-model", action="extend", nargs="+", metavar="FILE", type=os.path.expanduser,
                        help="instead of --checkpoint: 2-6 diffusion model files (models/diffusion_models, as "
                             "'Load Diffusion Model' reads them), in order; needs --clip and --vae")
    parser.add_argument("--clip", action="extend", nargs="+", metavar="FILE", type=os.path.expanduser,
                        help="the text encoder file(s) shared by the --diffusion-model experts (models/text_encoders; "
                             "FLUX: clip_l t5xxl, SD3/SD3.5: clip_l clip_g t5xxl)")
    parser.add_argument("--clip-type", choices=CLIP_TYPES, default="auto",
                        help="the text encoders' type, as in ComfyUI's Load CLIP / DualCLIPLoader (default: auto, "
                             "from the experts' family)")
    parser.add_argument("--vae", metavar="FILE", type=os.path.expanduser,
                        help="the VAE file of the --diffusion-model experts (models/vae; FLUX: ae.safetensors)")
    for f in options(CLI):
        o = f.metadata["afa"]
        kind = o.kind_of(f)
        text = (o.cli_help or o.help).replace("%", "%%")
        kw = dict(dest=f.name, default=f.default, metavar=o.metavar,
                  help=text if f.default is None or f.name in RUN_NEEDS else f"{text} (default: %(default)s)")
        if kind == "bool":
            kw.update(action=argparse.BooleanOptionalAction, metavar=None)
        elif o.choices:
            kw.update(choices=o.choices, metavar=None)
        else:
            kw["type"] = {"int": int, "float": float}.get(kind, os.path.expanduser)
        parser.add_argument(o.name_in(f, CLI), required=f.name in RUN_NEEDS, **kw)
    parser.add_argument("--comfyui", default=None, metavar="PATH", help="ComfyUI folder (default: found automatically)")


def config_from_args(args) -> TrainConfig:
    """Parsed flags -> the checked TrainConfig (ConfigError naming the flag otherwise)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in options(CLI)})


def check_sources(args):
    """Checkpoints, or diffusion models with their text encoders and VAE: AFAError naming the flags otherwise."""
    if args.checkpoint and args.diffusion_model:
        raise AFAError("give either --checkpoint files or --diffusion-model files, not both: an ensemble is of one kind.")
    if args.checkpoint:
        if args.clip or args.vae or args.clip_type != "auto":
            raise AFAError("--clip, --clip-type and --vae go with --diffusion-model: a checkpoint carries its own "
                           "text encoder and VAE.")
    elif args.diffusion_model:
        missing = [flag for flag, value in (("--clip", args.clip), ("--vae", args.vae)) if not value]
        if missing:
            raise AFAError(f"--diffusion-model files need {' and '.join(missing)}: the text encoder file(s) and the VAE "
                           "the models were made for (e.g. FLUX: --clip clip_l.safetensors t5xxl_fp16.safetensors "
                           "--vae ae.safetensors).")
    else:
        raise AFAError("give the models: 2-6 --checkpoint files, or --diffusion-model files with --clip and --vae.")


def experts_from_args(args):
    """(ExpertSet, CLIP, VAE) of the flags, through the service layer (ComfyUI booted)."""
    from .service import models, split_files

    if args.checkpoint:
        return models.experts_from_files(args.checkpoint)
    return split_files.experts_from_split_files(args.diffusion_model, args.clip, args.vae, args.clip_type)


def _distributed():
    """(rank, world_size, local_rank) from torchrun's environment."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


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

    config = config_from_args(args).for_run()  # bad flags fail before ComfyUI boots
    check_sources(args)
    cuda = torch.cuda.is_available()
    comfy_env.boot_comfyui(args.comfyui, extra_args=["--cuda-device", str(local_rank)] if cuda and world > 1 else ())
    if world > 1:
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        from .core.train_config import Comm
        from .service import training

        experts, clip, vae = experts_from_args(args)
        stop = {"flag": False}
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            if stop["flag"]:  # second Ctrl-C: give up at once
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            stop["flag"] = True
            logger.warning("stopping after this step (Ctrl-C again to abort without saving)")
        signal.signal(signal.SIGINT, on_sigint)
        bar = _progress_bar(config.steps) if rank == 0 else None
        try:
            result = training.train(experts, clip, vae, config, progress=bar, should_stop=lambda: stop["flag"],
                                    status=lambda text: logger.info("%s", text), comm=Comm.current())
        finally:
            signal.signal(signal.SIGINT, previous)
            if bar is not None:
                bar.close()
        if rank == 0:
            logger.info("%s", result.report)
            if result.stopped and result.path is None:
                logger.info("stopped before the first step: %s was not written", config.out)
            else:
                logger.info("%s %s (step %d)", "cancelled; resumable:" if result.stopped else "wrote", config.out,
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
