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


def test_full_size_unets_are_sd15_and_sdxl(comfy):
    """The sizes gpu.sh benchmarks: built on the meta device (no memory), the parameter counts of
    ComfyUI's SD1.5 (859.5M) and SDXL (2.567B) UNets and their aggregation layouts."""
    import torch
    sys.path.insert(0, str(BENCH))
    import inference_cost
    from afa_nodes.core.layout import derive_layout
    for arch, params, points, context in (("sd15", 859_520_964, 25, 768), ("sdxl", 2_567_463_684, 19, 2048)):
        unet = inference_cost.build_unet(inference_cost.ARCHS[arch][2], 0, arch, torch.device("meta"), torch.float16)
        layout = derive_layout(unet)
        assert sum(p.numel() for p in unet.parameters()) == params, arch
        assert {p.dtype for p in unet.parameters()} == {torch.float16}
        assert (len(layout.points), layout.context_dim) == (points, context)
