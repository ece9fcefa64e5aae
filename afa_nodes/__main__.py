"""Command line: python -m afa_nodes {generate,train,winmap,bench,studio} ...

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`.
"""
import argparse
import importlib
import logging
import sys

SUBCOMMANDS = {
    "generate": ("afa_nodes.cli_generate", "run an AFA ensemble through ComfyUI and write the image"),
    "train": ("afa_nodes.cli_train", "train an aggregator on a folder of captioned images"),
    "winmap": ("afa_nodes.cli_winmap", "which model denoises best where (win maps), and held-out evaluation"),
    "bench": ("afa_nodes.cli_bench", "run the benchmarks (quick versions by default)"),
    "studio": ("afa_nodes.studio.cli", "serve AFA Studio, a web UI to generate, train and explore maps"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m afa_nodes", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = module
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
