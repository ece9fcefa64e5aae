"""AFA Studio's Train tab on DiTs shared as split files, served for real (ComfyUI booted in this
process, gradio's own client): the tiny SD3 split files (tests/dit_files.py) in ComfyUI's
diffusion_models / text_encoders / vae folders show up in the Train tab's lists; /train_start
with diffusion_models + text_encoders + vae + clip_type trains an aggregator to the end on them;
giving both kinds of models or neither, an incomplete set or unknown files is refused with a
message naming the fix, a text encoder of the wrong width fails the run with the typed message,
and the app keeps serving."""
from types import SimpleNamespace

import pytest
from dit_files import check_trained, in_comfyui_folders, sd3_demo_files
from test_studio import DATASET, TRAIN, serve_studio, status, wait_for_training
from toy_dataset import make_dataset

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]  # gradio's own pandas deprecations
SPLIT_TRAIN = dict(TRAIN, batch_size=1)   # 64 px, 2 steps, save_every 0


@pytest.fixture(scope="module")
def split(comfy, sd15_checkpoints):
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
    """/refresh (and the 1-s poll) give the diffusion_models, text_encoders and vae lists after the others."""
    lists = [[c[0] for c in out["choices"]] for out in split.client.predict(api_name="/refresh")]
    diffusion_models, text_encoders, vaes = lists[-3:]
    assert set(split.names["diffusion_models"]) <= set(diffusion_models)
    assert set(split.names["text_encoders"]) <= set(text_encoders)
    assert vaes[0] == "none" and split.names["vae"][0] in vaes
    assert not set(split.names["diffusion_models"]) & set(lists[0])  # not offered as checkpoints
    params = split.client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/train_start"]
    names = [p["parameter_name"] for p in params["parameters"]]
    assert names[:5] == ["checkpoints", "diffusion_models", "text_encoders", "vae", "clip_type"]


@pytest.mark.parametrize("case, expected", [
    ("both kinds", "either checkpoints to ensemble or DiT split files .*not both"),
    ("neither", "choose the models to ensemble: at least 2 checkpoints .* or under 'DiT split files' 2-6 diffusion"),
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
