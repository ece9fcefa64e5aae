"""Benchmarks are not tests: this only checks each script still runs on tiny settings."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run(*args):
    done = subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_inference_cost_quick(comfyui_path):
    out = run("inference_cost.py", "--quick", "--comfyui", str(comfyui_path))
    rows = re.findall(r"^\| (\d) \| 64 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", out, re.M)
    assert [r[0] for r in rows] == ["2", "3"] and all(float(r[3]) > 0 for r in rows)


def test_recording_overhead_quick(comfyui_path):
    out = run("recording_overhead.py", "--size", "64", "--steps", "2", "--repeats", "2", "--comfyui", str(comfyui_path))
    assert re.search(r"ratio", out, re.I)
