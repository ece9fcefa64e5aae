"""AFA Studio (afa_nodes.studio) served for real: ComfyUI booted in this process, a real gradio
server on 127.0.0.1, driven through gradio's own client (gradio_client) on the tiny synthetic
checkpoints; plus `python -m afa_nodes studio` in a subprocess that boots ComfyUI itself."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image
from toy_dataset import make_dataset

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]  # gradio's own pandas deprecations
REPO = Path(__file__).resolve().parents[1]
DATASET = "studio_ds"
SMALL = dict(width=64, height=64, steps=2, cfg=2.0, prompt="a red picture", negative="", seed=7)
TRAIN = dict(dataset_folder=DATASET, steps=2, batch_size=2, learning_rate=1e-3, resolution=64, save_every=0,
             validation_fraction=0.34, gradient_checkpointing=False)
ENDPOINTS = {"/generate", "/maps", "/train_start", "/train_stop", "/status", "/refresh", "/cancel",
             "/cache_clear", "/demo"}


@contextlib.contextmanager
def serve_studio(comfy):
    """A Studio on a free 127.0.0.1 port in this process; always closed (a training is stopped first)."""
    from comfy_server import free_port

    from afa_nodes.studio.app import build_app, launch
    from afa_nodes.studio.state import Studio
    studio = Studio()
    demo = build_app(studio)
    try:
        url, public = launch(demo, port=free_port(), allowed_paths=[str(comfy.output_dir)])
        assert public is None  # no share link unless asked for
        yield SimpleNamespace(url=url, studio=studio, demo=demo)
    finally:
        if studio.training is not None:
            studio.stop_training()
            studio.training.wait(120)
        demo.close()


@pytest.fixture(scope="module")
def app(comfy, sd15_checkpoints, sdxl_checkpoints):
    make_dataset(comfy.input_dir / DATASET)
    with serve_studio(comfy) as served:
        yield served


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client
    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def names(sd15_checkpoints):
    return [p.name for p in sd15_checkpoints[:2]]


@pytest.fixture(scope="module")
def studio_cli(comfyui_path, models_dir, sd15_checkpoints, tmp_path_factory):
    """`python -m afa_nodes studio` in a subprocess, started by the module's first test (it boots
    ComfyUI on the other core while the other tests run) and stopped with Ctrl-C by the last."""
    from comfy_server import free_port
    root = tmp_path_factory.mktemp("studio_cli")
    yaml = root / "extra_model_paths.yaml"
    yaml.write_text(f'studio_test:\n    base_path: "{models_dir}"\n    checkpoints: checkpoints\n    afa: afa\n')
    port, log = free_port(), root / "studio.log"
    demo_folder = root / "demo"   # --demo: the test cache's demo files linked there (nothing is built)
    demo_folder.mkdir()
    for p in sd15_checkpoints:
        (demo_folder / p.name).symlink_to(p.resolve())
    cmd = [sys.executable, "-m", "afa_nodes", "studio", "--port", str(port), "--extra-model-paths-config", str(yaml),
           "--input-directory", str(root / "input"), "--output-directory", str(root / "output"),
           "--demo", str(demo_folder), "--cache-checkpoints", "3"]
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path), OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield SimpleNamespace(proc=proc, port=port, log=log, interrupted=False, demo=demo_folder)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def wait_until_serving(cli, timeout=180) -> str:
    url, deadline = f"http://127.0.0.1:{cli.port}/", time.monotonic() + timeout
    while f"AFA Studio on {url}" not in cli.log.read_text():
        assert cli.proc.poll() is None, cli.log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"the studio did not start in {timeout} s"
        time.sleep(0.5)
    return url


def gallery(output):
    """(path, caption) pairs of the Generate tab's gallery output."""
    value = output["value"] if isinstance(output, dict) else output
    return [(Path(item["image"]), item["caption"]) for item in value]


def status(client):
    return client.predict(api_name="/status")


def wait_for_training(client, done=lambda t: t["state"] not in ("starting", "running", "stopping"), timeout=180):
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        training = status(client)["training"]
        seen.append(training)
        if done(training):
            return training, seen
        time.sleep(0.3)
    raise AssertionError(f"training did not get there in {timeout} s; last status: {seen[-1]}")


def png_text(path):
    with Image.open(path) as im:
        return dict(im.text)


# ---------------------------------------------------------------- serving
def test_app_serves_on_localhost_with_named_endpoints(studio_cli, app, client):
    # (studio_cli: the subprocess boots meanwhile; test_cli_subcommand_... checks it at the end)
    import urllib.request
    assert urlparse(app.url).hostname == "127.0.0.1" and not app.demo.share
    assert ENDPOINTS <= set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    with urllib.request.urlopen(app.url + "config") as r:
        config = json.loads(r.read())
    assert config["title"] == "AFA Studio" and {"Generate", "Train", "Maps"} <= {
        c.get("props", {}).get("label") for c in config["components"]}
    assert status(client)["status"].startswith("Idle")


# ---------------------------------------------------------------- generate + maps
@pytest.fixture(scope="module")
def generated(client, names):
    out = client.predict(checkpoints=names, **SMALL, api_name="/generate")
    return SimpleNamespace(gallery=gallery(out[0]), summary=out[1], maps=out[2:])


def test_generate_saves_the_ensemble_beside_each_base_model_with_settings(generated, comfy, names):
    pictures = generated.gallery
    assert [c for _, c in pictures] == ["AFA ensemble (block-wise average)",
                                        f"base model 1: {names[0]}", f"base model 2: {names[1]}"]
    saved = sorted((comfy.output_dir / "afa_studio").glob("afa_*_*.png"))
    ensemble = [p for p in saved if p.name.endswith("_ensemble_0.png")][-1]
    bases = [ensemble.with_name(ensemble.name.replace("ensemble_0", f"base{i}_0")) for i in (1, 2)]
    assert all(p.is_file() for p in bases) and str(ensemble.parent) in generated.summary
    settings = json.loads(png_text(ensemble)["afa"])
    assert settings["checkpoints"] == names and settings["seed"] == 7 and settings["steps"] == 2
    assert settings["image"] == "ensemble" and settings["mode"] == "block-wise average"
    graph = json.loads(png_text(ensemble)["prompt"])
    assert graph["1"]["class_type"] == "AFAEnsembleLoader" and graph["1"]["inputs"]["ckpt_2"] == names[1]
    assert graph["5"]["inputs"]["seed"] == 7 and graph["7"]["class_type"] == "SaveImage"
    base_graph = json.loads(png_text(bases[0])["prompt"])
    assert base_graph["1"] == {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names[0]}}
    # what the client downloaded is the saved file, text chunks included
    assert json.loads(png_text(pictures[0][0])["afa"]) == settings
    assert np.array_equal(np.asarray(Image.open(pictures[1][0])), np.asarray(Image.open(bases[0])))


def test_generated_images_equal_the_cli_code_path(generated, names, tmp_path):
    """The studio runs the service layer's sequence, as `python -m afa_nodes generate` and the nodes
    do: same pixels for the same seed."""
    from afa_nodes.core.image_file import save_png
    from afa_nodes.core.spec import EnsembleSpec
    from afa_nodes.service import models, sampling
    settings = sampling.SampleSettings(**SMALL, sampler="euler", scheduler="normal")
    with torch.inference_mode():
        loaded = models.load_ensemble(EnsembleSpec(checkpoints=tuple(names[:2])))
        images = sampling.sample(loaded.model, loaded.clip, loaded.vae, settings)[1]
    cli_ensemble = save_png(images[0], tmp_path / "ensemble.png")
    pixels = lambda p: np.asarray(Image.open(p).convert("RGB"))  # noqa: E731
    studio_ensemble, studio_base = generated.gallery[0][0], generated.gallery[1][0]
    assert np.array_equal(pixels(studio_ensemble), pixels(cli_ensemble))
    assert not np.array_equal(pixels(studio_ensemble), pixels(studio_base))


def test_maps_of_the_last_generation_per_session(generated, client, app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    caption, point, step = generated.maps[:3]
    assert caption.startswith("point middle") and point["value"] == 2 and step["maximum"] == 1
    assert "input 0, input 1, middle, output 0, final" in point["label"]
    caption, *images, hover = client.predict(point=0, step=0, branch="uncond", image=0, api_name="/maps")
    assert caption.startswith("point input 0 (1/5), step 0") and "uncond" in caption
    assert 'class="afa-hover-map"' in hover and "data-weights=" in hover  # the hover view of that map
    sizes = [Image.open(p).size for p in images]
    assert len(sizes) == 4 and all(w > 100 and h > 100 for w, h in sizes)
    with pytest.raises(AppError, match="greater than maximum value 4"):  # the session's slider fits the run
        client.predict(point=9, step=0, branch="cond", image=0, api_name="/maps")
    with pytest.raises(AppError, match="no maps yet in this browser session"):
        Client(app.url, verbose=False).predict(point=0, step=0, branch="cond", image=0, api_name="/maps")


def test_progress_queue_and_busy_status_are_visible(client, names):
    """Two requests at once: the second waits in the studio's queue (one job at a time) and the
    status line lists it, the first reports progress through ComfyUI's progress hook, then the
    second runs; /status names the running job and what waits."""
    first = client.submit(checkpoints=names, **SMALL, api_name="/generate")
    deadline = time.monotonic() + 60
    while not status(client)["status"].startswith("Busy: generation"):  # the second must queue behind it
        assert time.monotonic() < deadline and not first.done(), "the first generation did not start"
        time.sleep(0.05)
    second = client.submit(checkpoints=names, **SMALL, compare=False, api_name="/generate")
    progress, lines, queues = set(), [], []
    while not (first.done() and second.done()):
        s = first.status()
        progress |= {p.desc for p in (s.progress_data or []) if p.desc}
        now = status(client)
        lines.append(now["status"])
        queues.append(now["queue"])
        time.sleep(0.1)
    assert len(gallery(first.result()[0])) == 3 and len(gallery(second.result()[0])) == 1
    assert any(line.startswith("Busy: generation") and "waiting: 1. generation (2 models" in line
               for line in lines), lines
    assert [{"kind": "generation", "label": "2 models, block-wise average, 2 steps, 64x64"}] in queues
    assert any(d.startswith("AFA ensemble: step") for d in progress)
    assert any(d.startswith("base model 2/2") for d in progress)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("case,expected", [
    ("no checkpoints", "choose at least 2 checkpoints"),
    ("one checkpoint", "choose at least 2 checkpoints"),
    ("mixed architectures", "does not match .* all models must share one architecture"),
    ("aggregator mode without aggregator", "needs a trained aggregator"),
    ("unknown checkpoint", "not found in ComfyUI's checkpoints folders"),
    ("width not a multiple of 8", "multiple of 8"),
])
def test_bad_generate_input_is_refused_with_a_message(client, names, sdxl_checkpoints, case, expected):
    from gradio_client.exceptions import AppError
    args = dict(SMALL, checkpoints=names)
    args.update({"no checkpoints": dict(checkpoints=[]), "one checkpoint": dict(checkpoints=names[:1]),
                 "mixed architectures": dict(checkpoints=[names[0], sdxl_checkpoints[0].name]),
                 "aggregator mode without aggregator": dict(mode="aggregator", aggregator="none"),
                 "unknown checkpoint": dict(checkpoints=[names[0], "../../etc/passwd"]),
                 "width not a multiple of 8": dict(width=100)}[case])
    with pytest.raises(AppError, match=expected):
        client.predict(**args, api_name="/generate")
    assert status(client)["status"].startswith("Idle")  # the board was released, the app keeps serving


@pytest.mark.parametrize("folder", ["../outside", "/etc", f"{DATASET}/../../x", "no_such_folder"])
def test_training_data_outside_the_input_directory_is_refused(client, names, folder):
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="input directory|does not exist"):
        client.predict(checkpoints=names, **dict(TRAIN, dataset_folder=folder, save_name="never"),
                       api_name="/train_start")
    assert status(client)["training"]["state"] in ("idle", "finished", "stopped")


# ---------------------------------------------------------------- the command line
def test_cli_subcommand_boots_comfyui_and_serves_on_localhost(studio_cli, sd15_checkpoints):
    """Placed mid-module: the process booted while the tests above ran, and it shuts down (gradio
    waits for open connections) while the training tests below run."""
    from gradio_client import Client
    client = Client(wait_until_serving(studio_cli), verbose=False)
    now = client.predict(api_name="/status")
    assert now["status"].startswith("Idle") and now["cache"]["capacity"] == 3
    assert str(studio_cli.demo) in now["checkpoint_folders"]  # --demo: its folder is read too
    checkpoints = [c[0] for c in client.predict(api_name="/refresh")[0]["choices"]]
    assert {p.name for p in sd15_checkpoints} <= set(checkpoints)  # found through extra_model_paths.yaml
    client.close()
    studio_cli.proc.send_signal(signal.SIGINT)  # test_cli_subcommand_stops_cleanly_... checks the exit
    studio_cli.interrupted = True


# ---------------------------------------------------------------- training
def test_train_tab_follows_the_node_inputs(comfy):
    """The Train tab shows every input of AFA Train Aggregator (both generated from TrainConfig), and
    its values become the TrainConfig that service.training trains with, checked like the node."""
    from afa_nodes.core.errors import AFAError
    from afa_nodes.core.train_config import STUDIO
    from afa_nodes.nodes_train import AFATrainAggregator
    from afa_nodes.service.training import config_from_ui
    from afa_nodes.studio.training import check_options, option_specs
    node = AFATrainAggregator.INPUT_TYPES()
    assert (set(node["required"]) | set(node.get("optional", {}))) - {"model", "clip", "vae"} <= set(option_specs())
    make_dataset(comfy.input_dir / DATASET)
    options = check_options({"dataset_folder": DATASET, "steps": 7.0})
    assert options["steps"] == 7 and options["save_name"] == node["required"]["save_name"][1]["default"]
    config = config_from_ui(options, STUDIO)
    assert config.steps == 7 and config.lr == options["learning_rate"]
    assert config.val_fraction == options["validation_fraction"] and config.resume is False
    assert config.dataset == comfy.input_dir / DATASET and config.out.name == "afa_aggregator.safetensors"
    for bad, message in (({"steps": 0}, "between 1 and"), ({"steps": 2.5}, "whole number"),
                         ({"warp_drive": True}, "unknown training option")):
        with pytest.raises(AFAError, match=message):
            check_options(bad)


def test_training_shows_live_progress_and_the_result_joins_the_aggregator_list(client, comfy, names):
    """...and renders a sample image at every save, the image /generate makes with that file."""
    sample = dict(sample_prompt=SMALL["prompt"], sample_steps=SMALL["steps"], sample_cfg=SMALL["cfg"], seed=SMALL["seed"])
    started = client.predict(checkpoints=names, **{**TRAIN, "save_every": 1}, **sample, save_name="studio_agg",
                             api_name="/train_start")
    assert started.startswith("Started: studio_agg.safetensors")
    final, _ = wait_for_training(client)
    assert final["state"] == "finished" and final["step"] == 2 and "step 2/2" in final["report"], final
    folder = comfy.models_dir / "afa" / "studio_agg.samples"
    assert final["samples"] == [[1, str(folder / "step_000001.png")], [2, str(folder / "step_000002.png")]]
    samples = [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for _, p in final["samples"]]
    assert samples[0].shape == (64, 64, 3) and samples[0].std() > 1  # a picture, not a blank
    assert json.loads(Image.open(folder / "step_000002.png").text["afa"])["sample"]["prompt"] == SMALL["prompt"]
    assert [r[0] for r in final["validation"]][:2] == ["AFA aggregator (trained)", "block-wise average (untrained)"]
    assert sorted(r[0] for r in final["validation"][2:]) == [f"single model: {n}" for n in names]
    assert sum(r[2] == "best" for r in final["validation"]) == 1
    path = comfy.models_dir / "afa" / "studio_agg.safetensors"
    assert path.is_file() and Path(final["file"]) == path
    # no restart: the Generate tab's list has it, and generating with it works
    aggregators = client.predict(api_name="/refresh")[1]["choices"]
    assert ["studio_agg.safetensors"] * 2 in aggregators
    out = client.predict(checkpoints=names, **SMALL, mode="aggregator", aggregator="studio_agg.safetensors",
                         compare=False, api_name="/generate")
    assert gallery(out[0])[0][1] == "AFA ensemble (aggregator studio_agg.safetensors)"
    assert out[2].startswith("point middle")
    generated = np.asarray(Image.open(gallery(out[0])[0][0]).convert("RGB"), dtype=np.int16)
    assert np.abs(generated - samples[1]).max() <= 1  # the last sample is what the file generates


def test_stop_twice_leaves_a_resumable_file_and_refuses_generation_meanwhile(client, comfy, names):
    from gradio_client.exceptions import AppError
    quick = dict(TRAIN, save_every=0, validation_fraction=0.0)  # no validation passes: stop and resume only
    client.predict(checkpoints=names, **dict(quick, steps=500), save_name="studio_stop", sample_prompt="a red picture",
                   api_name="/train_start")  # a stop saves at once: no sample image to wait for
    running, _ = wait_for_training(client, done=lambda t: t["step"] >= 2 or t["state"] == "failed")
    assert running["state"] == "running" and running["eta_seconds"] > 0, running  # the time left is estimated
    with pytest.raises(AppError, match=r"busy: training \(studio_stop.safetensors.*press Stop"):
        client.predict(checkpoints=names, **SMALL, api_name="/generate")
    assert client.predict(api_name="/train_stop").startswith("Stopping: studio_stop.safetensors")
    assert client.predict(api_name="/train_stop").startswith("Already stopping")
    final, _ = wait_for_training(client)
    assert final["state"] == "stopped" and 1 <= final["step"] < 500 and "resume" in final["message"], final
    path = comfy.models_dir / "afa" / "studio_stop.safetensors"
    assert path.is_file() and path.with_name(path.name + ".train-state").is_file()
    assert final["samples"] == [] and not path.with_suffix(".samples").exists()
    assert client.predict(api_name="/train_stop").startswith("No training is running")
    # resumable: one more step continues from the saved step
    client.predict(checkpoints=names, **dict(quick, steps=final["step"] + 1), resume=True, save_name="studio_stop",
                   api_name="/train_start")
    resumed, _ = wait_for_training(client)
    assert resumed["state"] == "finished" and resumed["step"] == final["step"] + 1, resumed


# ---------------------------------------------------------------- the command line, at the end
def test_cli_subcommand_stops_cleanly_on_ctrl_c(studio_cli):
    if not studio_cli.interrupted:  # run alone
        wait_until_serving(studio_cli)
        studio_cli.proc.send_signal(signal.SIGINT)
    assert studio_cli.proc.wait(60) == 0
    text = studio_cli.log.read_text()
    assert "Booted ComfyUI" in text and "Closing server" in text and "gradio.live" not in text
