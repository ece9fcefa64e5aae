"""The nodes are V3 (comfy_api io.ComfyNode, registered by comfy_entrypoint) and keep the V1
nodes' contract: ids, display names, inputs (names, types, defaults, ranges, tooltips,
widget order) and outputs, recorded from the V1 nodes in tests/fixtures/object_info_v1.json.

On a ComfyUI with Autogrow (v0.8.0) AFA Ensemble's MODELs and AFA CLIP Merge's CLIPs are one
growing input ("models.model_3"); without it (v0.3.64) they are the V1 fixed slots. API
prompts written in either naming run on both. Run with COMFYUI_PATH=~/comfy/ComfyUI-0.3.64
for the old ComfyUI.
"""
import importlib
import importlib.util
import json
from pathlib import Path

import pytest
from node_contract import AUTOGROW, as_fixed_slots, contract

pytestmark = pytest.mark.comfyui
TESTS = Path(__file__).resolve().parent
V1 = json.loads((TESTS / "fixtures" / "object_info_v1.json").read_text(encoding="utf-8"))
ALL_IDS = {"AFAEnsembleLoader": "AFA Ensemble Loader", "AFAEnsemble": "AFA Ensemble",
           "AFACLIPMerge": "AFA CLIP Merge (per-model text)", "AFALoadAggregator": "AFA Load Aggregator",
           "AFATrainAggregator": "AFA Train Aggregator", "AFARecordAttention": "AFA Record Attention",
           "AFAAttentionPreview": "AFA Attention Preview",
           # added after the V1 nodes (no V1 contract): win maps and held-out evaluation
           "AFAWinMap": "AFA Win Map", "AFAEvaluate": "AFA Evaluate"}
GROWING = {"AFAEnsemble": ("models", "model_", "MODEL"), "AFACLIPMerge": ("clips", "clip_", "CLIP")}
# Inputs added after the V1 contract was recorded: optional, at the end, and their default keeps
# the old behaviour, so saved workflows (positional widgets_values) load unchanged.
APPENDED = {"AFAEnsembleLoader": {"full_res": "exact"}, "AFAEnsemble": {"full_res": "exact"}}


def without_appended(live: dict, node_id: str) -> dict:
    """`live` without the inputs APPENDED after the V1 contract, checking that they are optional,
    the last inputs and widgets, and default to the listed old behaviour."""
    added = APPENDED.get(node_id, {})
    if not added:
        return live
    tail = live["inputs"][-len(added):]
    assert [(i["name"], i["section"], i.get("default")) for i in tail] == \
        [(name, "optional", default) for name, default in added.items()]
    assert live["widgets"][-len(added):] == list(added)
    return dict(live, inputs=live["inputs"][:-len(added)], widgets=live["widgets"][:-len(added)])


# ---------------------------------------------------------------- the running server
@pytest.fixture(scope="module")
def object_info(comfy_server, sd15_checkpoints):
    return comfy_server.object_info()


def test_object_info_lists_every_node_under_its_old_id(comfy_server, object_info):
    assert not comfy_server.import_failed(), comfy_server.log_tail()
    assert {k: object_info[k]["display_name"] for k in ALL_IDS if k in object_info} == ALL_IDS
    assert all(object_info[k]["category"] == "AFA" for k in ALL_IDS)


@pytest.mark.parametrize("node_id", sorted(V1))
def test_node_keeps_the_v1_contract(object_info, node_id):
    live = without_appended(contract(object_info[node_id]), node_id)
    old = V1[node_id]
    grows = [i for i in live["inputs"] if i["type"] == AUTOGROW]
    if grows:  # ComfyUI with Autogrow: the fixed slots became one growing input
        group, prefix, kind = GROWING[node_id]
        (g,) = grows
        assert (g["name"], g["slots"], g["min"], g["slot"]["type"]) == \
            (group, [f"{prefix}{i}" for i in range(1, 7)], 2, kind)
        assert g["tooltip"] and g["slot"]["tooltip"] == g["tooltip"]
        assert as_fixed_slots(live, slot_tooltip=False) == as_fixed_slots(old, slot_tooltip=False)
    else:
        assert live == old
    assert live["widgets"] == old["widgets"]   # saved widgets_values are positional


def test_file_choices_are_the_servers_files(object_info, sd15_checkpoints):
    loader = object_info["AFAEnsembleLoader"]["input"]
    names = [p.name for p in sd15_checkpoints]
    assert set(names) <= set(loader["required"]["ckpt_1"][1]["options"])
    assert loader["optional"]["ckpt_3"][1]["options"][0] == "none"
    assert loader["optional"]["ckpt_3"][1]["default"] == "none"
    assert loader["required"]["aggregator"][1]["options"][0] == "none"


def _ensemble_prompt(ckpts, style):
    """Load Checkpoint x N -> AFA Ensemble + AFA CLIP Merge -> KSampler, slots named in `style`:
    'v1' (model_3) or 'autogrow' (models.model_3)."""
    name = (lambda g, s: s) if style == "v1" else (lambda g, s: f"{g}.{s}")
    p = {str(10 + i): {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": c}} for i, c in enumerate(ckpts)}
    p["1"] = {"class_type": "AFAEnsemble", "inputs": {
        "mode": "block-wise average", "weights": "", "model_index": 1, "map_refresh": len(style),
        **{name("models", f"model_{i + 1}"): [str(10 + i), 0] for i in range(len(ckpts))}}}
    p["2"] = {"class_type": "AFACLIPMerge", "inputs": {
        name("clips", f"clip_{i + 1}"): [str(10 + i), 1] for i in range(len(ckpts))}}
    p["3"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a lighthouse"}}
    p["4"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}}
    p["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["6"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": len(style),
        "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    p["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["10", 2]}}
    p["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"afa_v3_{style}"}}
    return p


@pytest.mark.parametrize("style", ["v1", "autogrow"])
def test_api_prompts_in_either_slot_naming_run(comfy_server, sd15_checkpoints, style):
    srv = comfy_server
    ckpts = [p.name for p in sd15_checkpoints] + [sd15_checkpoints[0].name]   # 4 models
    log_start = len(srv.log_text())
    entry = srv.run(_ensemble_prompt(ckpts, style), timeout=600)
    (image,) = srv.output_images(entry)
    from PIL import Image
    with Image.open(image) as im:
        assert im.size == (64, 64)
    log = srv.log_text()[log_start:]
    assert "AFA ensemble of 4 models" in log, log   # ran (other map_refresh and seed per style: no cache)
    assert "Traceback" not in log
    from afa_nodes.nodes_ensemble import AUTOGROW
    renamed = ("v1" if AUTOGROW else "autogrow") == style
    assert ("renamed 8 input(s)" in log) == renamed, log


# ---------------------------------------------------------------- in the test process
@pytest.fixture(scope="module")
def pack(comfy_nodes):
    from afa_nodes import nodes, nodes_ensemble
    return nodes, nodes_ensemble


def test_the_nodes_are_v3_and_registered_through_comfy_entrypoint(pack, comfy_nodes):
    import asyncio

    from comfy_api.v0_0_2 import ComfyExtension, io
    nodes, _ = pack
    ext = nodes.comfy_entrypoint()
    assert isinstance(ext, ComfyExtension)
    classes = asyncio.run(ext.get_node_list())
    assert {c.GET_SCHEMA().node_id for c in classes} == set(ALL_IDS)
    assert all(issubclass(c, io.ComfyNode) for c in classes)
    assert all(comfy_nodes[k] in classes for k in ALL_IDS)   # what ComfyUI registered


def test_root_package_exports_the_entrypoint_and_no_v1_mappings():
    spec = importlib.util.spec_from_file_location("afa_root_probe", TESTS.parent / "__init__.py")
    root = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root)
    assert root.WEB_DIRECTORY == "./web" and callable(root.comfy_entrypoint)
    # ComfyUI uses NODE_CLASS_MAPPINGS when present and then ignores comfy_entrypoint
    assert not hasattr(root, "NODE_CLASS_MAPPINGS")


def test_importing_registers_nothing_and_on_load_does(pack):
    import asyncio

    import folder_paths
    nodes, _ = pack
    saved = folder_paths.folder_names_and_paths.pop("afa", None)
    try:
        importlib.reload(nodes)
        assert "afa" not in folder_paths.folder_names_and_paths    # nothing at import
        asyncio.run(nodes.comfy_entrypoint().get_node_list())
        assert "afa" in folder_paths.folder_names_and_paths        # ComfyUI's load step did it
    finally:
        if saved is not None:
            folder_paths.folder_names_and_paths["afa"] = saved


def test_slot_names_are_renamed_to_this_comfyuis_style(pack):
    _, ne = pack
    own, other = (("models.model_3", "model_3") if ne.AUTOGROW else ("model_3", "models.model_3"))
    prompt = {"1": {"class_type": "AFAEnsemble", "inputs": {other: ["9", 0], "mode": "aggregator"}},
              "2": {"class_type": "AFACLIPMerge", "inputs": {other.replace("model", "clip"): ["9", 1]}},
              "3": {"class_type": "KSampler", "inputs": {"model_3": ["1", 0]}}}
    assert ne.legacy_prompt_inputs(prompt) == 2
    assert prompt["1"]["inputs"] == {own: ["9", 0], "mode": "aggregator"}
    assert prompt["2"]["inputs"] == {own.replace("model", "clip"): ["9", 1]}
    assert prompt["3"]["inputs"] == {"model_3": ["1", 0]}                    # other nodes untouched
    assert ne.legacy_prompt_inputs(prompt) == 0


def test_growing_values_in_slot_order_from_either_style(pack):
    from afa_nodes.core.errors import AFAError
    _, ne = pack
    got = ne.grown_values("AFAEnsemble", {"model_3": "c", "model_1": "a"}, {"model_2": "b", "mode": "x"})
    assert got == [("model_1", "a"), ("model_2", "b"), ("model_3", "c")]
    assert ne.grown_values("AFACLIPMerge", None, {"clip_2": None, "clip_1": "a"}) == [("clip_1", "a")]
    with pytest.raises(AFAError, match="model_7.*model_1 to model_6"):
        ne.grown_values("AFAEnsemble", {"model_7": "x"}, {})


def test_ensemble_and_clip_merge_execute_with_both_input_shapes(pack, sd15_checkpoints):
    import comfy.sd as comfy_sd

    from afa_nodes.core.errors import AFAError
    from afa_nodes.ensemble_model import require_ensemble
    from afa_nodes.per_model_clip import PerModelCLIP
    _, ne = pack
    loaded = [comfy_sd.load_checkpoint_guess_config(str(p))[:2] for p in sd15_checkpoints]
    models = {f"model_{i + 1}": m for i, (m, _) in enumerate(loaded)}
    clips = {f"clip_{i + 1}": c for i, (_, c) in enumerate(loaded)}
    grown = ne.AFAEnsemble.execute("block-wise average", "", 1, 1, None, models=models).args[0]
    flat = ne.AFAEnsemble.execute("block-wise average", "", 1, 1, None, **models).args[0]
    for m in (grown, flat):
        assert require_ensemble(m).names == ["model 1", "model 2", "model 3"]
    merged = ne.AFACLIPMerge.execute(clips=clips).args[0]
    assert isinstance(merged, PerModelCLIP) and ne.AFACLIPMerge.execute(**clips).args[0] is not None
    with pytest.raises(AFAError, match="2 to 6"):
        ne.AFAEnsemble.execute("block-wise average", "", 1, 1, None, models={"model_1": loaded[0][0]})
    with pytest.raises(AFAError, match="2 to 6 CLIPs, got 1"):
        ne.AFACLIPMerge.execute(clips={"clip_1": loaded[0][1]})
