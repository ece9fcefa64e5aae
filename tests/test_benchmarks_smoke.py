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
    out = run("inference_cost.py", "--quick", "--full-res", "--comfyui", str(comfyui_path))
    rows = re.findall(r"^\| (\d) \| 64 \| ([^|]+?) \| ([\d.]+) \| ([\d.]+) \|", out, re.M)
    variants = {(n, v) for n, v, _, _ in rows}
    for n in "23":
        assert {(n, "N single steps"), (n, "SABW"), (n, "block-wise average"), (n, "SABW map_refresh 2"),
                (n, "SABW pooled attention"), (n, "SABW half resolution")} <= variants
    assert all(float(s) > 0 and float(r) > 0 for _, _, s, r in rows)
    assert re.search(r"SABW \| [\d.]+ \| [\d.]+ \| \d+\.\d% \(8x8", out)


def test_inference_memory_quick(comfyui_path):
    out = run("inference_cost.py", "--quick", "--memory", "--models", "2", "--comfyui", str(comfyui_path))
    rows = re.findall(r"^\| 2 \| 64 \| (AFA \(SABW\)|N single models) \| (\d+) \| (\d+) \|", out, re.M)
    assert len(rows) == 2 and all(int(peak) >= int(loaded) > 0 for _, loaded, peak in rows)


def test_recording_overhead_quick(comfyui_path):
    out = run("recording_overhead.py", "--size", "64", "--steps", "2", "--repeats", "2", "--comfyui", str(comfyui_path))
    assert re.search(r"ratio", out, re.I)


def test_full_res_quality_quick(comfyui_path):
    out = run("full_res_quality.py", "--quick", "--seeds", "0", "--comfyui", str(comfyui_path))
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([\d.]+) \| [\d.]+ \| [\d.]+ \|$", out, re.M))
    assert {"exact", "pooled attention", "half resolution", "map_refresh 2", "half resolution + map_refresh 2",
            "exact, second training", "block-wise average"} <= set(rows)
    assert all(float(v) > 0 for v in rows.values())
