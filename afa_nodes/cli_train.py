"""`python -m afa_nodes train`: train an aggregator from the command line.

Trains through service.training.train, as the node and the studio do; the flags are generated
from core.train_config.TrainConfig (one flag per field the CLI shows, dest = the field name).

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

from . import logger
from .core.errors import AFAError
from .core.train_config import CLI, RUN_NEEDS, TrainConfig, options

EXIT_ERROR, EXIT_CANCELLED = 2, 130


def add_arguments(parser: argparse.ArgumentParser):
    """--checkpoint and --comfyui, then one flag per TrainConfig field the CLI shows (its Opt:
    flag, help, choices; the field's default; dest = the field's name)."""
    parser.add_argument("--checkpoint", action="append", required=True, metavar="FILE", type=os.path.expanduser,
                        help="a checkpoint of the ensemble (give 2-6, in order)")
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
    cuda = torch.cuda.is_available()
    comfy_env.boot_comfyui(args.comfyui, extra_args=["--cuda-device", str(local_rank)] if cuda and world > 1 else ())
    if world > 1:
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        from .core.train_config import Comm
        from .service import models, training

        experts, clip, vae = models.experts_from_files(args.checkpoint)
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
