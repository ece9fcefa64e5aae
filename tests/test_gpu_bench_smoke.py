"""benchmarks/gpu.sh (the fp16 GPU run of the inference-cost benchmark) runs to completion with
--device cpu on tiny UNets, and prints one inference-cost table per architecture and size."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_gpu_script_runs_on_the_cpu(comfyui_path):
    done = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--device", "cpu", "--quick", "--models", "2",
                           "--refresh", "2", "--comfyui", str(comfyui_path)],
                          capture_output=True, text=True, timeout=900, env={"PYTHON": sys.executable,
                                                                              "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    runs = re.findall(r"^== (sd15|sdxl) (\d+) px, fp16 on cpu$", out, re.M)
    assert runs == [("sd15", "512"), ("sd15", "1024"), ("sdxl", "512"), ("sdxl", "1024")]
    assert len(re.findall(r"^(sd15|sdxl) UNets on cpu in fp16 \(aggregator softmax fp32\)", out, re.M)) == 4
    rows = re.findall(r"^\| 2 \| 64 \| (N single steps|block-wise average|SABW|SABW map_refresh 2) \| ([\d.]+) \| "
                      r"([\d.]+) \|", out, re.M)
    assert len(rows) == 16 and all(float(s) > 0 and float(r) > 0 for _, s, r in rows)
    assert out.count("single-model outputs finite: yes") == 4
