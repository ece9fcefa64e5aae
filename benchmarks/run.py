"""Quick versions of every benchmark in one go (a few minutes on a CPU).

    python benchmarks/run.py          # quick: tiny UNets, tiny sizes
    python benchmarks/run.py --full   # the documented full-size runs (slow on a CPU; see BENCHMARKS.md)
"""
import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK = [["inference_cost.py", "--quick"], ["recording_overhead.py", "--size", "64", "--steps", "2", "--repeats", "2"],
         ["train_throughput.py", "--quick"], ["quality.py", "--quick"]]
FULL = [["inference_cost.py", "--size", "256", "--models", "2", "3", "--repeats", "5"],
        ["inference_cost.py", "--size", "512", "--models", "2", "3", "--repeats", "3"],
        ["recording_overhead.py", "--full", "--size", "256"],
        ["train_throughput.py"], ["quality.py"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true")
    args = p.parse_args(argv)
    failed = 0
    for script, *rest in FULL if args.full else QUICK:
        if not (HERE / script).exists():
            continue
        failed += subprocess.call([sys.executable, str(HERE / script), *rest]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
