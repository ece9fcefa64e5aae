"""AFA Studio on DiTs shared as split files, served for real (ComfyUI booted in this process,
gradio's own client): the tiny SD3 split files (tests/dit_files.py) in ComfyUI's
diffusion_models / text_encoders / vae folders show up in the Train and Generate tabs' lists;
/train_start with diffusion_models + text_encoders + vae + clip_type trains an aggregator to the
end on them; giving both kinds of models or neither, an incomplete set or unknown files is
refused with a message naming the fix, a text encoder of the wrong width fails the run with the
typed message, and the app keeps serving. /generate makes the ensemble of the diffusion models
beside each one alone from the cache (each file loaded once), the pixels of the service layer's
sequence, and saves the workflow with ComfyUI's split-file loaders, valid for ComfyUI."""
import json

from types import SimpleNamespace

import numpy as np
import pytest
from dit_files import check_trained, in_comfyui_folders, sd3_demo_files
from PIL import Image
from test_studio import DATASET, SMALL, TRAIN, gallery, serve_studio, status, wait_for_training
from toy_dataset import make_dataset

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]  # gradio's own pandas deprecations
SPLIT_TRAIN = dict(TRAIN, batch_size=1)   # 64 px, 2 steps, save_every 0


@pytest.fixture(scope="module")
def split(comfy, comfy_nodes, sd15_checkpoints):   # comfy_nodes: ComfyUI validates the saved workflows
    files = sd3_demo_files(sd15_checkpoints[0])
    make_dataset(comfy.input_dir / DATASET)
    with in_comfyui_folders(files) as names, serve_studio(comfy) as app:
        from gradio_client import Client
        yield SimpleNamespace(files=files, names=names, app=app, client=Client(app.url, verbose=False),
                              checkpoints=[p.name for p in sd15_checkpoints[:2]])


def split_args(names: dict, **changes) -> dict:
    args = dict(diffusion_models=names["diffusion_models"], text_encoders=names["text_encoders"],
                vae=names["vae"][0], clip_type="auto")
    return {**args, **changes}


def test_the_train_tab_lists_the_split_files(split):
    """/refresh (and the 1-s poll) give the Train and the Generate tabs' diffusion_models,
    text_encoders and vae lists after the others; both endpoints take them as named parameters."""
    lists = [[c[0] for c in out["choices"]] for out in split.client.predict(api_name="/refresh")]
    assert len(lists) == 11 and lists[5:8] == lists[8:11]
    diffusion_models, text_encoders, vaes = lists[5:8]
    assert set(split.names["diffusion_models"]) <= set(diffusion_models)
    assert set(split.names["text_encoders"]) <= set(text_encoders)
    assert vaes[0] == "none" and split.names["vae"][0] in vaes
    assert not set(split.names["diffusion_models"]) & set(lists[0])  # not offered as checkpoints
    endpoints = split.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for endpoint in ("/train_start", "/generate"):
        names = [p["parameter_name"] for p in endpoints[endpoint]["parameters"]]
        assert names[:5] == ["checkpoints", "diffusion_models", "text_encoders", "vae", "clip_type"], endpoint


@pytest.mark.parametrize("case, expected", [
    ("both kinds", "either checkpoints to ensemble or DiT split files .*not both"),
    ("neither", "choose at least 2 checkpoints to ensemble .* or under 'DiT split files' 2-6 diffusion model files"),
    ("one diffusion model", r"choose 2-6 diffusion model files to ensemble \(chosen: 1\)"),
    ("no text encoder", r"choose the diffusion models' text encoder file\(s\): 1-3 \(chosen: 0"),
    ("no VAE", r"choose the diffusion models' VAE \(models/vae"),
    ("unknown file", "diffusion_models file\\(s\\) no_such.safetensors not found in ComfyUI's diffusion_models"),
])
def test_a_wrong_choice_of_models_is_refused_with_a_message(split, case, expected):
    from gradio_client.exceptions import AppError
    args = {"both kinds": split_args(split.names, checkpoints=split.checkpoints),
            "neither": dict(checkpoints=[]),
            "one diffusion model": split_args(split.names, diffusion_models=split.names["diffusion_models"][:1]),
            "no text encoder": split_args(split.names, text_encoders=[]),
            "no VAE": split_args(split.names, vae="none"),
            "unknown file": split_args(split.names, diffusion_models=[split.names["diffusion_models"][0],
                                                                      "no_such.safetensors"]),
            }[case]
    with pytest.raises(AppError, match=expected):
        split.client.predict(**args, **SPLIT_TRAIN, save_name="never", api_name="/train_start")
    now = status(split.client)
    assert now["status"].startswith("Idle") and now["training"]["state"] in ("idle", "failed", "finished")


def test_a_text_encoder_of_the_wrong_width_fails_the_run_with_the_typed_message(split, comfy):
    """The width is known once the text encoder is loaded: in the run, which fails with the
    message naming the files and the fix; the board is free again."""
    split.client.predict(**split_args(split.names, clip_type="stable_diffusion"), **SPLIT_TRAIN,
                         save_name="studio_sd3_wrong", api_name="/train_start")
    final, _ = wait_for_training(split.client)
    assert final["state"] == "failed", final
    assert ("afa_demo_clip_l.safetensors (type stable_diffusion) give 768-wide encodings but "
            "'afa_demo_sd3_tiny_1.safetensors' takes 4096") in final["message"]
    assert "give the model's own text encoders and type" in final["message"]
    assert not (comfy.models_dir / "afa" / "studio_sd3_wrong.safetensors").exists()
    assert status(split.client)["status"].startswith("Idle")


def test_a_split_file_ensemble_trains_to_the_end(split, comfy):
    started = split.client.predict(**split_args(split.names), **SPLIT_TRAIN, save_name="studio_sd3",
                                   api_name="/train_start")
    assert started.startswith("Started: studio_sd3.safetensors: 2 models, 2 steps"), started
    final, _ = wait_for_training(split.client)
    assert final["state"] == "finished" and final["step"] == 2 and "step 2/2" in final["report"], final
    path = comfy.models_dir / "afa" / "studio_sd3.safetensors"
    assert final["file"] == str(path)
    agg = check_trained(path, split.files, "mmdit")
    assert agg.layout["context_dim"] == 4096   # auto: type sd3 (CLIP-L padded to SD3's context)
    assert sorted(r[0] for r in final["validation"][2:]) == [
        f"single model: {n}" for n in split.names["diffusion_models"]]
    aggregators = [c[0] for c in split.client.predict(api_name="/refresh")[1]["choices"]]
    assert "studio_sd3.safetensors" in aggregators
    # and the Generate tab uses it on the same files (the aggregator checks their sha256)
    out = split.client.predict(**split_args(split.names), **SMALL, mode="aggregator",
                               aggregator="studio_sd3.safetensors", compare=False, record_maps=False,
                               api_name="/generate")
    (picture, caption), = gallery(out[0])
    assert caption == "AFA ensemble (aggregator studio_sd3.safetensors)"
    assert validated(picture)["AFALoadAggregator"] == [{"aggregator": "studio_sd3.safetensors"}]


# ---------------------------------------------------------------- generate
def validated(path) -> dict:
    """The ComfyUI graph in a PNG, checked as ComfyUI's /prompt checks it (the pack's on_prompt
    handler, then validate_prompt: node types, inputs, links, files); -> class type -> nodes."""
    import asyncio

    import execution

    from afa_nodes.nodes import accept_both_slot_names
    graph = json.loads(Image.open(path).text["prompt"])
    accept_both_slot_names({"prompt": graph})   # v0.3.64 names the growing slots 'model_1', not 'models.model_1'
    valid, error, _, node_errors = asyncio.run(execution.validate_prompt("afa-studio-test", graph, None))
    assert valid, (error, node_errors)
    by_type = {}
    for node in graph.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    return by_type


def test_generate_with_split_files_beside_each_model_alone(split):
    split.client.predict(api_name="/cache_clear")   # (an earlier test generated with these files)
    dms, loads = split.names["diffusion_models"], status(split.client)["cache"]["loads"]
    out = split.client.predict(**split_args(split.names), **SMALL, api_name="/generate")
    pictures = gallery(out[0])
    assert [c for _, c in pictures] == ["AFA ensemble (block-wise average)", f"base model 1: {dms[0]}",
                                        f"base model 2: {dms[1]}"]
    cache = status(split.client)["cache"]
    assert cache["loads"] - loads == 4   # each diffusion model, the text encoder, the VAE: once
    assert {"text encoder afa_demo_clip_l.safetensors (sd3)", "VAE afa_demo_taesd16.safetensors"} <= \
        {name for name, _ in cache["checkpoints"]}
    settings = json.loads(Image.open(pictures[0][0]).text["afa"])
    assert settings["checkpoints"] == [] and settings["split_files"] == {
        "diffusion_models": dms, "text_encoders": split.names["text_encoders"], "vae": split.names["vae"][0],
        "clip_type": "sd3"}   # auto: the family's type, as the workflow's loader needs it
    graph = validated(pictures[0][0])
    assert [n["unet_name"] for n in graph["UNETLoader"]] == dms and len(graph["AFAEnsemble"]) == 1
    assert graph["CLIPLoader"] == [{"clip_name": "afa_demo_clip_l.safetensors", "type": "sd3"}]
    assert graph["VAELoader"] == [{"vae_name": "afa_demo_taesd16.safetensors"}]
    assert "CheckpointLoaderSimple" not in graph and "AFAEnsembleLoader" not in graph
    base = validated(pictures[2][0])
    assert [n["unet_name"] for n in base["UNETLoader"]] == dms[1:] and "AFAEnsemble" not in base
    # again, another mode: every file from the cache
    again = split.client.predict(**split_args(split.names), **SMALL, mode="fixed weights", weights="0.3, 0.7",
                                 compare=False, api_name="/generate")
    assert gallery(again[0])[0][1] == "AFA ensemble (fixed weights)"
    assert status(split.client)["cache"]["loads"] == cache["loads"]
    pixels = [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in
              (pictures[0][0], pictures[1][0], gallery(again[0])[0][0])]
    assert pixels[0].shape == (64, 64, 3) and np.abs(pixels[0] - pixels[1]).max() > 0
    assert np.abs(pixels[0] - pixels[2]).max() > 0


def test_generated_split_file_images_equal_the_service_sequence(split):
    """The studio runs service.split_files + models.ensemble_of_checkpoints(shared_clip) + sampling:
    the same pixels for the same seed (the graph's loaders load the same files the same way)."""
    import torch

    from afa_nodes.core.spec import EnsembleSpec
    from afa_nodes.service import models, sampling, split_files
    out = split.client.predict(**split_args(split.names), **SMALL, compare=False, record_maps=False,
                               api_name="/generate")
    settings = sampling.SampleSettings(**SMALL, sampler="euler", scheduler="normal")
    with torch.inference_mode():
        ckpts, _ = split_files.load_split_files(split.files["diffusion_models"], split.files["text_encoders"],
                                                split.files["vae"][0])
        loaded = models.ensemble_of_checkpoints(ckpts, EnsembleSpec(checkpoints=("a", "b")), shared_clip=True)
        images = sampling.sample(loaded.model, loaded.clip, loaded.vae, settings)[1]
    expected = (images[0].cpu().numpy() * 255).round().clip(0, 255).astype(np.int16)
    got = np.asarray(Image.open(gallery(out[0])[0][0]).convert("RGB"), dtype=np.int16)
    assert np.abs(got - expected).max() <= 1


@pytest.mark.parametrize("case, expected", [
    ("both kinds", "either checkpoints to ensemble or DiT split files"),
    ("LoRA", "DiT split files take none here"),
    ("no VAE", r"choose the diffusion models' VAE"),
])
def test_bad_split_file_generation_is_refused_with_a_message(split, case, expected):
    from gradio_client.exceptions import AppError
    args = {"both kinds": split_args(split.names, checkpoints=split.checkpoints),
            "LoRA": dict(split_args(split.names), loras="all: x.safetensors"),
            "no VAE": split_args(split.names, vae="none")}[case]
    with pytest.raises(AppError, match=expected):
        split.client.predict(**args, **SMALL, api_name="/generate")
    assert status(split.client)["status"].startswith("Idle")
