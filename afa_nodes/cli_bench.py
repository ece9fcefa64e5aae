"""`python -m afa_nodes bench [--full]`: runs benchmarks/run.py (quick versions by default)."""
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def add_arguments(p):
    p.add_argument("--full", action="store_true", help="the full-size runs (slow on a CPU)")


def run(args) -> int:
    return subprocess.call([sys.executable, str(RUNNER)] + (["--full"] if args.full else []))
