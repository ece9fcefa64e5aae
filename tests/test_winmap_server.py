"""workflows/afa_win_map.json on a real ComfyUI server: AFA Win Map and AFA Evaluate run from the
UI workflow (converted with tests/workflow_api.py against the server's /object_info), shrunk to
tiny settings, on the synthetic SD1.5 demo checkpoints; their pictures are saved and their
texts shown. A run cancelled through the server's interrupt leaves the server working."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from toy_dataset import make_dataset
from workflow_api import load_workflow, nodes_of, set_inputs, to_api

pytestmark = pytest.mark.comfyui
REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "afa_win_map.json"
ARTIFACTS = REPO / "test-artifacts" / "workflows" / "afa_win_map"
TINY = dict(resolution=64, steps=2, seeds=1, max_images=2, grid=4)


@pytest.fixture(scope="module")
def server(comfy_server, sd15_checkpoints):
    return comfy_server


def prompt_of(srv) -> dict:
    prompt = to_api(load_workflow(WORKFLOW), srv.object_info(), WORKFLOW.name)
    for cls in ("AFAWinMap", "AFAEvaluate"):
        assert set_inputs(prompt, cls, **TINY) == len(TINY)
        for _, node in nodes_of(prompt, cls):
            folder = srv.input_dir / node["inputs"]["dataset_folder"]
            if not folder.is_dir():  # rewriting it would change its fingerprint: every node would run again
                make_dataset(folder, n=4)
    return prompt


def test_win_map_workflow_runs_on_the_server(server):
    prompt = prompt_of(server)
    (_, win), = nodes_of(prompt, "AFAWinMap")
    assert win["inputs"]["dataset_folder"] == "afa_example_dataset" and isinstance(win["inputs"]["seed"], int)
    entry = server.run(prompt, timeout=900)
    outputs = entry["outputs"]
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    saved = {}
    for node_id, node in nodes_of(prompt, "SaveImage"):
        paths = server.output_images({"outputs": {node_id: outputs[node_id]}})
        saved[node["inputs"]["filename_prefix"]] = paths
        for p in paths:
            arr = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
            assert arr.std() > 1.0, p.name
            shutil.copy2(p, ARTIFACTS / p.name)
    assert len(saved["afa_winmap/winners"]) == TINY["steps"]          # one picture per step
    assert len(saved["afa_winmap/wins"]) == 1 and len(saved["afa_winmap/evaluation"]) == 1
    texts = {prompt[i]["inputs"]["source"][0]: "".join(outputs[i]["text"]) for i, _ in nodes_of(prompt, "PreviewAny")}
    (win_id, _), = nodes_of(prompt, "AFAWinMap")
    (eval_id, _), = nodes_of(prompt, "AFAEvaluate")
    assert any(v in texts[win_id] for v in ("complementary", "dominates everywhere", "nearly the same"))
    assert texts[eval_id].splitlines()[2].strip().startswith("ensemble: block-wise average")
    assert outputs[win_id]["images"] and outputs[win_id]["text"] == [texts[win_id]]  # the node's own preview
    (ARTIFACTS / "texts.txt").write_text("\n\n".join(texts.values()), encoding="utf-8")


def test_interrupt_cancels_a_win_map_and_the_server_keeps_working(server):
    prompt = prompt_of(server)
    keep = {k: v for k, v in prompt.items() if v["class_type"] in ("AFAEnsembleLoader", "AFAWinMap")}
    (_, win), = nodes_of(keep, "AFAWinMap")
    win["inputs"].update(steps=50, seeds=8, seed=123, max_images=0)  # long enough to interrupt
    log_start = len(server.log_text())
    prompt_id = server.queue(keep)
    deadline = time.monotonic() + 300
    while "measuring 2 models" not in server.log_text()[log_start:] and time.monotonic() < deadline:
        time.sleep(0.2)
    server.interrupt()
    started = time.monotonic()
    while (server.history(prompt_id) or {}).get("status", {}).get("completed") is None:
        assert time.monotonic() - started < 120, server.log_tail()
        time.sleep(0.2)
    status = server.history(prompt_id)["status"]
    assert any(event == "execution_interrupted" for event, _ in status["messages"]), status
    win["inputs"].update(TINY, seed=7)
    (win_id, _), = nodes_of(keep, "AFAWinMap")
    assert server.run(keep, timeout=900)["outputs"][win_id]["text"]
