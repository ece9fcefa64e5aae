"""Every example workflow in workflows/ and workflows/dit/ runs on a real ComfyUI server.

The workflows are UI (litegraph) files, as artists drag and drop them. Besides workflows/,
copies of the workflows shared before the nodes became V3 (tests/fixtures/workflows_v1/,
never edited: SHA256SUMS) must still load and run unchanged. Each is converted
to an API prompt with tests/workflow_api.py against the server's /object_info (which also
checks every node type, input and widget value the file uses), shrunk to tiny settings
(96x64 latents, a tenth of the sampling steps, 2 training steps), queued with POST /prompt
and checked: images of the right size in the output folder, not constant (a NaN image is
saved as a constant one). Images and the converted prompts are copied to
test-artifacts/workflows/<workflow>/. The DiT workflows run on the tiny SD3 demo files and
(slow: ~1 GB each) the smallest files ComfyUI detects as FLUX
(afa_nodes.comfy_dit_models), linked into the server's diffusion_models, text_encoders and vae.

Bad input (an SD1.5 and an SDXL checkpoint in one ensemble, a corrupt aggregator file, a
missing dataset folder) must give an error that names the problem, after which the server
still runs prompts. When chromium is installed, the frontend itself loads every workflow
and its graphToPrompt() must equal the converter's prompt; its picture of the FLUX workflow is
the README's (docs/images/flux_ensemble_workflow.png, rewritten when AFA_UPDATE_DOCS_IMAGES=1).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from comfy_server import ComfyServerError
from PIL import Image
from workflow_api import (
    WorkflowError,
    input_specs,
    iter_workflows,
    load_workflow,
    node_types,
    nodes_of,
    set_inputs,
    to_api,
)

pytestmark = pytest.mark.comfyui

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS_DIR = REPO_ROOT / "workflows"
DIT_DIR = WORKFLOWS_DIR / "dit"
ARTIFACTS = REPO_ROOT / "test-artifacts" / "workflows"
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures" / "workflows_v1"
WORKFLOWS = list(iter_workflows(WORKFLOWS_DIR)) + list(iter_workflows(DIT_DIR)) + list(iter_workflows(FIXTURES_DIR))
FLUX_WORKFLOW = DIT_DIR / "afa_flux_ensemble.json"
FLUX_PICTURE = REPO_ROOT / "docs" / "images" / "flux_ensemble_workflow.png"
OUR_NODES = ["AFAEnsembleLoader", "AFAEnsemble", "AFACLIPMerge", "AFALoadAggregator", "AFATrainAggregator",
             "AFARecordAttention", "AFAAttentionPreview"]
DEMO_CKPT = "afa_demo_sd15_synthetic_{}.safetensors"
WIDTH, HEIGHT = 96, 64          # not square: a transposed image would show
DATASET = "afa_example_dataset"
DATASET_NODES = ("AFATrainAggregator", "AFAWinMap", "AFAEvaluate")  # nodes reading a dataset folder
TIMEOUT = 900

# What each workflow must contain and produce ({class: count}, SaveImage outputs). A new
# workflow file without an entry here still has to run and give sane images.
EXPECT = {
    "afa_2_models_txt2img.json": {"nodes": {"AFAEnsembleLoader": 1, "KSampler": 1}, "saved": 1, "models": 2},
    "afa_3_models_txt2img.json": {"nodes": {"AFAEnsembleLoader": 1, "KSampler": 1}, "saved": 1, "models": 3},
    "afa_vs_base_models.json": {"nodes": {"AFAEnsemble": 1, "CheckpointLoaderSimple": 2, "KSampler": 3},
                                "saved": 3},
    "afa_fewer_steps.json": {"nodes": {"AFAEnsemble": 1, "KSampler": 2}, "saved": 2},
    "afa_attention_maps.json": {"nodes": {"AFARecordAttention": 1, "AFAAttentionPreview": 1}, "saved": 2},
    "afa_train_aggregator.json": {"nodes": {"AFATrainAggregator": 1, "AFAEnsemble": 2}, "saved": 2},
    "afa_5_models_txt2img.json": {"nodes": {"CheckpointLoaderSimple": 5, "AFAEnsemble": 1, "AFACLIPMerge": 1,
                                            "KSampler": 1}, "saved": 1, "grown": 5},
    "afa_flux_ensemble.json": {"nodes": {"UNETLoader": 2, "CLIPLoader": 1, "VAELoader": 1, "AFAEnsemble": 1,
                                         "FluxGuidance": 1, "KSampler": 1}, "saved": 1, "models": 2},
    "afa_sd3_ensemble.json": {"nodes": {"UNETLoader": 2, "CLIPLoader": 1, "VAELoader": 1, "AFAEnsemble": 1,
                                        "KSampler": 1}, "saved": 1, "models": 2},
}


def demo_files() -> set:
    """The file names the workflows may use: the SD1.5 demo checkpoints and the DiT demo files."""
    from afa_nodes.comfy_dit_models import FLUX_DEMO_FILES, SD3_DEMO_FILES
    return ({DEMO_CKPT.format(i) for i in range(3)}
            | {n for files in (SD3_DEMO_FILES, FLUX_DEMO_FILES) for names in files.values() for n in names})


def label(path: Path) -> str:
    """Test id / artifacts folder of a workflow file (fixtures prefixed v1_)."""
    return ("v1_" if path.parent == FIXTURES_DIR else "") + path.stem


def test_the_example_workflows_are_there():
    assert WORKFLOWS, f"no workflows in {WORKFLOWS_DIR}"
    missing = sorted(set(EXPECT) - {p.name for p in WORKFLOWS if p.parent in (WORKFLOWS_DIR, DIT_DIR)})
    assert not missing, f"workflows named in EXPECT but not in {WORKFLOWS_DIR} or {DIT_DIR}: {missing}"


def test_the_pre_v3_workflow_copies_are_unchanged():
    import hashlib
    sums = dict(line.split()[::-1] for line in (FIXTURES_DIR / "SHA256SUMS").read_text().splitlines())
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in iter_workflows(FIXTURES_DIR)}
    assert files == sums and len(files) >= 6


# ---------------------------------------------------------------- fixtures
def link_files(models_dir: Path, files: dict, created: list) -> None:
    """{kind: [paths]} (afa_nodes.comfy_dit_models' demo files) linked into models_dir/<kind>/."""
    for kind, paths in files.items():
        (models_dir / kind).mkdir(exist_ok=True)
        for p in paths:
            link = models_dir / kind / p.name
            if not link.exists():
                link.symlink_to(p)
                created.append(link)


@pytest.fixture(scope="module")
def server(comfy_server, sd15_checkpoints, sdxl_checkpoints, models_dir):
    from conftest import checkpoint_cache_dir

    from afa_nodes.comfy_dit_models import ensure_flux_demo_files, ensure_sd3_demo_files
    srv = comfy_server
    assert [p.name for p in sd15_checkpoints] == [DEMO_CKPT.format(i) for i in range(3)], \
        "the workflows use the demo checkpoints' names (afa_nodes.demo_checkpoints.demo_checkpoint_name)"
    created = []
    for ensure in (ensure_sd3_demo_files, ensure_flux_demo_files):  # FLUX: built once into the cache, ~2 GB, ~20 s
        link_files(Path(models_dir), ensure(checkpoint_cache_dir() / "dit", sd15_checkpoints[0].resolve()), created)
    yield srv, created
    for p in created:  # leave models/ as other tests expect it
        for f in p.parent.glob(p.name + "*"):
            f.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def object_info(server):
    return server[0].object_info()


def test_pack_imported(server, object_info):
    srv, _ = server
    missing = [n for n in OUR_NODES if n not in object_info]
    assert not missing, f"AFA nodes missing from /object_info: {missing}\n{srv.log_tail()}"
    # --quick-test-for-ci exits 0 even when a pack fails to import: read the log
    assert not srv.import_failed(), "ComfyUI logged IMPORT FAILED for ComfyUI-AFA:\n" + srv.log_tail()
    assert all(object_info[n]["category"] == "AFA" for n in OUR_NODES)


# ---------------------------------------------------------------- conversion
@pytest.mark.parametrize("path", WORKFLOWS, ids=[label(p) for p in WORKFLOWS])
def test_workflow_fits_the_server(path, object_info):
    wf = load_workflow(path)
    prompt = to_api(wf, object_info, path.name)           # raises naming workflow, node and input
    expect = EXPECT.get(path.name, {})
    for cls, count in expect.get("nodes", {}).items():
        assert len(nodes_of(prompt, cls)) == count, f"{path.name}: expected {count} {cls}"
    for cls in node_types(wf):
        assert cls in object_info
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert notes and any("own checkpoints" in n["widgets_values"][0] for n in notes), \
        f"{path.name}: needs a Note telling artists to pick their own checkpoints"
    for _, node in nodes_of(prompt, "KSampler"):
        assert isinstance(node["inputs"]["seed"], int)
    files, models = set(), []
    for _, node in nodes_of(prompt, "CheckpointLoaderSimple") + nodes_of(prompt, "AFAEnsembleLoader"):
        files |= {v for k, v in node["inputs"].items() if k.startswith("ckpt") and v != "none"}
    for cls, key in (("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name")):
        files |= {node["inputs"][key] for _, node in nodes_of(prompt, cls)}
        models += [node["inputs"][key] for _, node in nodes_of(prompt, cls) if cls == "UNETLoader"]
    assert files and files <= demo_files(), files
    if "models" in expect:
        if models:  # DiTs: Load Diffusion Model x N -> AFA Ensemble
            (_, ens), = nodes_of(prompt, "AFAEnsemble")
        else:
            (_, ens), = nodes_of(prompt, "AFAEnsembleLoader")
            models = [v for k, v in ens["inputs"].items() if k.startswith("ckpt") and v != "none"]
        assert len(set(models)) == expect["models"] and ens["inputs"]["mode"] == "block-wise average"
    if "grown" in expect:  # the growing input, named as this server declares it
        (_, ens), = nodes_of(prompt, "AFAEnsemble")
        (_, merge), = nodes_of(prompt, "AFACLIPMerge")
        grown = "models" in object_info["AFAEnsemble"]["input"]["required"]
        slots = [f"models.model_{i}" if grown else f"model_{i}" for i in range(1, expect["grown"] + 1)]
        assert [k for k in ens["inputs"] if isinstance(ens["inputs"][k], list)] == slots
        assert [k for k in merge["inputs"]] == [s.replace("model", "clip") for s in slots]


def test_converter_names_what_is_missing(object_info):
    wf = load_workflow(WORKFLOWS_DIR / "afa_2_models_txt2img.json")
    loader = next(n for n in wf["nodes"] if n["type"] == "AFAEnsembleLoader")
    ksampler = next(n for n in wf["nodes"] if n["type"] == "KSampler")

    bad = json.loads(json.dumps(wf))
    next(n for n in bad["nodes"] if n["id"] == loader["id"])["type"] = "AFANoSuchNode"
    with pytest.raises(WorkflowError, match=r"afa_2_models_txt2img\.json.*AFANoSuchNode.*not registered"):
        to_api(bad, object_info, "afa_2_models_txt2img.json")

    bad = json.loads(json.dumps(wf))
    node = next(n for n in bad["nodes"] if n["id"] == ksampler["id"])
    node["inputs"].append({"name": "no_such_input", "type": "INT", "widget": {"name": "no_such_input"},
                           "link": None})
    with pytest.raises(WorkflowError, match=r"afa_2_models_txt2img\.json.*KSampler.*'no_such_input' does not exist"):
        to_api(bad, object_info, "afa_2_models_txt2img.json")

    bad = json.loads(json.dumps(wf))
    node = next(n for n in bad["nodes"] if n["id"] == ksampler["id"])
    node["widgets_values"][1] = 20               # control_after_generate value missing
    with pytest.raises(WorkflowError, match="control after generate"):
        to_api(bad, object_info, "w.json")

    bad = json.loads(json.dumps(wf))
    node = next(n for n in bad["nodes"] if n["id"] == loader["id"])
    node["widgets_values"][3] = "no such mode"
    with pytest.raises(WorkflowError, match=r"AFAEnsembleLoader.*'mode' = 'no such mode'"):
        to_api(bad, object_info, "w.json")

    bad = json.loads(json.dumps(wf))
    node = next(n for n in bad["nodes"] if n["id"] == ksampler["id"])
    model_in = next(i for i in node["inputs"] if i["name"] == "model")
    bad["links"] = [l for l in bad["links"] if l[0] != model_in["link"]]
    model_in["link"] = None
    with pytest.raises(WorkflowError, match="required input 'model'"):
        to_api(bad, object_info, "w.json")


def test_converter_follows_primitive_nodes_and_reroutes(object_info):
    wf = load_workflow(WORKFLOWS_DIR / "afa_vs_base_models.json")
    prompt = to_api(wf, object_info, "afa_vs_base_models.json")
    seeds = {n["inputs"]["seed"] for _, n in nodes_of(prompt, "KSampler")}
    assert seeds == {42}                                     # one shared PrimitiveNode
    texts = {n["inputs"]["text"] for _, n in nodes_of(prompt, "CLIPTextEncode")}
    assert len(texts) == 2                                   # shared positive and negative
    assert not any(n["class_type"] in ("PrimitiveNode", "Note") for n in prompt.values())

    # a Reroute between the EmptyLatentImage and the KSamplers
    wf = json.loads(json.dumps(wf))
    latent = next(n for n in wf["nodes"] if n["type"] == "EmptyLatentImage")
    rid, lid = wf["last_node_id"] + 1, wf["last_link_id"] + 1
    out_links = latent["outputs"][0]["links"]
    wf["nodes"].append({"id": rid, "type": "Reroute", "pos": [0, 0], "size": [75, 26], "flags": {}, "order": 0,
                        "mode": 0, "inputs": [{"name": "", "type": "*", "link": lid}],
                        "outputs": [{"name": "", "type": "LATENT", "links": list(out_links)}],
                        "properties": {"showOutputText": False, "horizontal": False}})
    for link in wf["links"]:
        if link[0] in out_links:
            link[1], link[2] = rid, 0
    latent["outputs"][0]["links"] = [lid]
    wf["links"].append([lid, latent["id"], 0, rid, 0, "LATENT"])
    rerouted = to_api(wf, object_info, "rerouted.json")
    assert rerouted == prompt


# ---------------------------------------------------------------- running
def tiny(prompt: dict) -> dict:
    """Tiny settings for a CPU: 96x64, a tenth of the steps (at least 2), 2 training steps."""
    set_inputs(prompt, "EmptyLatentImage", width=WIDTH, height=HEIGHT, batch_size=1)
    set_inputs(prompt, "EmptySD3LatentImage", width=WIDTH, height=HEIGHT, batch_size=1)
    for _, node in nodes_of(prompt, "KSampler"):
        steps = node["inputs"]["steps"]
        if not isinstance(steps, list):
            node["inputs"]["steps"] = max(2, round(steps / 10))  # 20 -> 2, 50 -> 5: ratios kept
    set_inputs(prompt, "AFATrainAggregator", steps=2, resolution=64, batch_size=1, save_every=0,
               gradient_checkpointing=False, validation_fraction=0.25)
    set_inputs(prompt, "AFAAttentionPreview", cell=48)
    for cls in DATASET_NODES[1:]:
        set_inputs(prompt, cls, resolution=64, steps=2, seeds=1, max_images=2)
    return prompt


def reseed(prompt: dict, offset: int) -> None:
    """Add `offset` to every literal seed input (KSampler, the trainer, ...)."""
    for node in prompt.values():
        for k, v in node["inputs"].items():
            if "seed" in k and isinstance(v, int) and not isinstance(v, bool):
                node["inputs"][k] = v + offset


def make_dataset(folder: Path, count: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    captions = ["a red lighthouse", "a blue sea", "a green hill at dawn", "a yellow boat"]
    for i in range(count):
        y, x = np.mgrid[0:80, 0:80]
        base = np.stack([(x * (i + 1)) % 256, (y * 3) % 256, ((x + y) * 2) % 256], -1)
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(captions[i % len(captions)], encoding="utf-8")


def origin_class(prompt: dict, node_id: str, input_name: str) -> str:
    ref = prompt[node_id]["inputs"][input_name]
    return prompt[ref[0]]["class_type"] if isinstance(ref, list) else "literal"


def check_image(path: Path, size=None) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        im.load()
        if size is not None:
            assert im.size == size, f"{path.name}: {im.size} != {size}"
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert np.isfinite(arr).all()
    assert arr.std() > 1.0, f"{path.name} is (nearly) constant: std {arr.std():.3f}"
    return arr


def artifacts_dir(name: str) -> Path:
    d = ARTIFACTS / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def run_and_wait(srv, prompt: dict, timeout: float = TIMEOUT) -> dict:
    """History entry of the prompt, whatever its status (ComfyServer.run raises on errors)."""
    prompt_id = srv.queue(prompt)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = srv.history(prompt_id)
        if entry is not None and (entry.get("status") or {}).get("completed") is not None:
            return entry
        assert srv.running, f"ComfyUI exited while running the prompt.\n{srv.log_tail()}"
        time.sleep(0.25)
    srv.interrupt()
    raise AssertionError(f"prompt did not finish within {timeout}s\n{srv.log_tail()}")


def execution_error(entry: dict) -> dict | None:
    for event, data in (entry.get("status") or {}).get("messages") or []:
        if event == "execution_error":
            return data
    return None


@pytest.mark.parametrize("path", WORKFLOWS, ids=[label(p) for p in WORKFLOWS])
def test_workflow_runs(path, server, object_info, models_dir):
    srv, created = server
    name = path.name
    prompt = tiny(to_api(load_workflow(path), object_info, name))
    if path.parent == FIXTURES_DIR:  # other seeds than workflows/' same file: really run, not from the cache
        reseed(prompt, 1000)
    art = artifacts_dir(label(path))
    (art / "prompt_api.json").write_text(json.dumps(prompt, indent=2), encoding="utf-8")
    trains = nodes_of(prompt, "AFATrainAggregator")
    for cls in DATASET_NODES:
        for _, node in nodes_of(prompt, cls):
            make_dataset(srv.input_dir / node["inputs"]["dataset_folder"])
    for _, node in trains:
        created.append(Path(models_dir) / "afa" / f"{node['inputs']['save_name']}.safetensors")

    log_start = len(srv.log_text())
    t0 = time.monotonic()
    try:
        entry = srv.run(prompt, timeout=TIMEOUT)
    except ComfyServerError as e:
        pytest.fail(f"{name} failed on the server: {e}\n{srv.log_tail(40)}")
    elapsed = time.monotonic() - t0
    log = srv.log_text()[log_start:]
    (art / "server.log").write_text(log, encoding="utf-8")
    assert "Traceback" not in log and "!!! Exception" not in log, f"{name}: errors in the server log:\n{log}"
    (art / "history.json").write_text(json.dumps(entry.get("outputs"), indent=2), encoding="utf-8")

    outputs = entry.get("outputs") or {}
    saved = []
    for node_id, node in nodes_of(prompt, "SaveImage"):
        images = outputs.get(node_id, {}).get("images") or []
        assert images, f"{name}: SaveImage {node_id} wrote nothing"
        decoded = origin_class(prompt, node_id, "images") == "VAEDecode"
        for p in srv.output_images({"outputs": {node_id: {"images": images}}}):
            assert p.parent.is_relative_to(srv.output_dir)
            arr = check_image(p, (WIDTH, HEIGHT) if decoded else None)
            saved.append((node_id, p, arr))
            shutil.copy2(p, art / p.name)
    expect = EXPECT.get(name, {})
    if "saved" in expect:
        assert len(saved) == expect["saved"], [p.name for _, p, _ in saved]
    print(f"{name}: {elapsed:.1f}s, {len(saved)} saved image(s) -> {art}")

    if name in ("afa_vs_base_models.json", "afa_fewer_steps.json"):
        # the ensemble's image is not any base model's image (same seed, same prompt)
        seeds = {n["inputs"]["seed"] for _, n in nodes_of(prompt, "KSampler")}
        assert len(seeds) == 1
        by_prefix = {prompt[i]["inputs"]["filename_prefix"]: arr for i, _, arr in saved}
        ens = [a for k, a in by_prefix.items() if "afa" in k.split("/")[-1]]
        bases = [a for k, a in by_prefix.items() if "model_" in k.split("/")[-1]]
        assert len(ens) == 1 and bases, list(by_prefix)
        for b in bases:
            assert np.abs(ens[0] - b).mean() > 0.5, "the ensemble's image equals a base model's image"
    if name == "afa_fewer_steps.json":
        steps = sorted(n["inputs"]["steps"] for _, n in nodes_of(prompt, "KSampler"))
        assert steps == [2, 5]
    for node_id, _ in nodes_of(prompt, "AFAAttentionPreview"):
        ui = outputs[node_id]
        info = ui["afa_maps"][0]
        assert info["steps"] == [0, 1] and len(info["models"]) == 2
        previews = srv.output_images({"outputs": {node_id: ui}})
        points = [x for x in prompt[node_id]["inputs"]["points"].split(",") if x.strip()]
        assert len(previews) == len(points) + 3     # a grid per point, dominant, overlay, chart
        for p in previews:
            check_image(p)
            shutil.copy2(p, art / p.name)
        body = srv.get_json(f"/afa/maps/{info['run_id']}")
        assert body["run_id"] == info["run_id"]
    for node_id, node in trains:
        agg = Path(models_dir) / "afa" / f"{node['inputs']['save_name']}.safetensors"
        assert agg.is_file() and agg.stat().st_size > 0
        curve = [arr for i, _, arr in saved if origin_class(prompt, i, "images") == "AFATrainAggregator"]
        assert curve and curve[0].shape[:2] == (360, 640)
        for pid, _ in nodes_of(prompt, "PreviewAny"):
            text = "".join(outputs[pid]["text"])
            assert text.strip(), "empty training report"
            (art / "report.txt").write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- bad input
def _loader_prompt(ckpt_1, ckpt_2, mode="block-wise average", aggregator="none"):
    return {
        "1": {"class_type": "AFAEnsembleLoader", "inputs": {
            "ckpt_1": ckpt_1, "ckpt_2": ckpt_2, "aggregator": aggregator, "mode": mode, "weights": "",
            "model_index": 1}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "afa_bad_input_check"}},
    }


def _assert_still_serving(srv, good_prompt, seed):
    """A good prompt runs after the error (a new seed, so ComfyUI cannot answer from its cache)."""
    assert srv.running
    assert srv.get_json("/system_stats")["system"]
    good_prompt = json.loads(json.dumps(good_prompt))
    good_prompt["5"]["inputs"]["seed"] = seed
    entry = srv.run(good_prompt, timeout=TIMEOUT)
    (p,) = srv.output_images(entry)
    check_image(p, (WIDTH, HEIGHT))


def test_bad_inputs_give_errors_and_the_server_keeps_serving(server, sd15_checkpoints, sdxl_checkpoints,
                                                             models_dir, object_info):
    srv, created = server
    sd15_a, sd15_b = sd15_checkpoints[0].name, sd15_checkpoints[1].name
    good = _loader_prompt(sd15_a, sd15_b)

    # 1. SD1.5 + SDXL in one ensemble: an execution_error naming both files and the architecture
    entry = run_and_wait(srv, _loader_prompt(sd15_a, sdxl_checkpoints[0].name))
    err = execution_error(entry)
    assert err is not None, f"expected an execution_error, got status {entry.get('status')}"
    msg = err["exception_message"]
    assert err["node_type"] == "AFAEnsembleLoader", err
    assert sdxl_checkpoints[0].name in msg and sd15_a in msg and "architecture" in msg, msg
    assert "Traceback" not in msg
    messages = [f"SD1.5 + SDXL: {err['node_type']}: {err['exception_type']}: {msg}"]
    _assert_still_serving(srv, good, seed=101)

    # 2. a corrupt aggregator file in models/afa
    corrupt = Path(models_dir) / "afa" / "afa_test_corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    created.append(corrupt)
    entry = run_and_wait(srv, _loader_prompt(sd15_a, sd15_b, mode="aggregator", aggregator=corrupt.name))
    err = execution_error(entry)
    assert err is not None, f"expected an execution_error, got status {entry.get('status')}"
    assert corrupt.name in err["exception_message"] and "safetensors" in err["exception_message"], err
    messages.append(f"corrupt aggregator: {err['node_type']}: {err['exception_type']}: {err['exception_message']}")
    _assert_still_serving(srv, good, seed=102)

    # 3. the training workflow pointed at a folder that does not exist: rejected at validation,
    #    with the folder named
    prompt = tiny(to_api(load_workflow(WORKFLOWS_DIR / "afa_train_aggregator.json"), object_info,
                         "afa_train_aggregator.json"))
    set_inputs(prompt, "AFATrainAggregator", dataset_folder="afa_no_such_dataset")
    with pytest.raises(ComfyServerError, match=r"rejected the prompt.*afa_no_such_dataset") as rejected:
        srv.queue(prompt)
    messages.append(f"missing dataset folder: {rejected.value}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "bad_inputs.txt").write_text("\n\n".join(messages) + "\n", encoding="utf-8")
    _assert_still_serving(srv, good, seed=103)


# ---------------------------------------------------------------- the frontend agrees
def test_frontend_loads_workflows_and_agrees_with_converter(server, object_info):
    """The real frontend loads each file and its graphToPrompt() equals the converter's prompt
    (inputs the server does not define, e.g. PreviewAny's display widgets, left aside)."""
    from browser import Browser, chromium_path
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    srv, _ = server
    srv.post_json("/settings/Comfy.TutorialCompleted", True)
    b = Browser(exe)
    try:
        b.send("Page.enable")
        b.send("Page.navigate", {"url": srv.base_url + "/"})
        b.wait_for("!!(window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.AFAEnsembleLoader)",
                   what="the frontend with the AFA nodes")

        def known(prompt):
            out = {}
            for k, v in prompt.items():
                names = {n for n, _, _ in input_specs(object_info[v["class_type"]])}  # growing inputs' slots too
                out[k] = {"class_type": v["class_type"],
                          "inputs": {i: x for i, x in v["inputs"].items() if i in names}}
            return out

        for path in WORKFLOWS:
            wf = load_workflow(path)
            res = json.loads(b.eval(
                "(async () => { const app = window.comfyAPI.app.app;"
                f" await app.loadGraphData({json.dumps(wf)}, true, true, {json.dumps(path.name)});"
                " await new Promise(r => setTimeout(r, 300));"
                " const p = await app.graphToPrompt();"
                " return JSON.stringify({out: p.output, n: app.graph.nodes.length,"
                "  types: app.graph.nodes.map(n => n.type),"
                "  afa: app.graph.nodes.filter(n => n.type.startsWith('AFA'))"
                "   .map(n => [n.type, (n.inputs || []).map(i => i.name)])}); })()"))
            assert res["n"] == len(wf["nodes"]), f"{path.name}: the frontend dropped nodes"
            assert known(res["out"]) == known(to_api(wf, object_info, path.name)), path.name
            for cls, sockets in res["afa"]:  # no stray sockets of an older naming (web/afa_slots.js)
                declared = {n for n, _, _ in input_specs(object_info[cls])}
                assert set(sockets) <= declared, f"{path.name}: {cls} shows {sorted(set(sockets) - declared)}"
            if path == FLUX_WORKFLOW:
                picture_of_the_graph(b, ARTIFACTS / FLUX_PICTURE.name)
    finally:
        b.close()
    if os.environ.get("AFA_UPDATE_DOCS_IMAGES") == "1":  # the README's picture, kept small (256 colours)
        from PIL import Image
        with Image.open(ARTIFACTS / FLUX_PICTURE.name) as im:
            im.convert("RGB").quantize(256).save(FLUX_PICTURE, optimize=True)


def picture_of_the_graph(b, path: Path) -> None:
    """The loaded graph fitted to a 1600x1200 page (at a zoom the frontend draws in full detail,
    no minimap), as a screenshot; checked not to be blank."""
    b.send("Emulation.setDeviceMetricsOverride", {"width": 1600, "height": 1200, "deviceScaleFactor": 1,
                                                  "mobile": False})
    b.eval("(async () => { const app = window.comfyAPI.app.app, c = app.canvas, s = app.extensionManager.setting;"
           " await s.set('Comfy.Minimap.Visible', false);"
           " await s.set('LiteGraph.Canvas.LowQualityRenderingZoomThreshold', 0.1);"
           " await new Promise(r => setTimeout(r, 300));"
           " const xs = app.graph.nodes.flatMap(n => [n.pos[0], n.pos[0] + n.size[0]]);"
           " const ys = app.graph.nodes.flatMap(n => [n.pos[1] - 30, n.pos[1] + n.size[1]]);"
           " const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];"
           " const r = c.canvas.getBoundingClientRect(), [left, top, right, bottom] = [70, 80, 20, 20];"
           " const [w, h] = [r.width - left - right, r.height - top - bottom];"
           " const scale = Math.min(w / (x1 - x0), h / (y1 - y0), 1);"
           " c.ds.scale = scale;"
           " c.ds.offset = [(left + (w - (x1 - x0) * scale) / 2) / scale - x0,"
           "                (top + (h - (y1 - y0) * scale) / 2) / scale - y0];"
           " c.setDirty(true, true); c.draw(true, true);"
           " await new Promise(r => setTimeout(r, 500)); })()")
    b.screenshot(path)
    b.send("Emulation.clearDeviceMetricsOverride")
    from PIL import Image
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1200, 1600) and pixels.std() > 10, f"{path}: blank screenshot"
