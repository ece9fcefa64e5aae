"""Training inside real ComfyUI: the AFA Train Aggregator node (in process, under inference_mode,
and through a real server prompt), service.training on experts without an ensemble MODEL, the
`train` CLI and its 2-process gloo data-parallel run, and the front ends generated from TrainConfig."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from toy_dataset import make_dataset

from afa_nodes.core.aggregator_file import load_aggregator
from afa_nodes.core.errors import DatasetError, TrainingError
from afa_nodes.core.spec import Mode
from afa_nodes.core.files import file_sha256
from afa_nodes.core.train import state_path

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[1]
TRAIN_ARGS = dict(steps=3, batch_size=2, learning_rate=1e-3, resolution=64, seed=0, save_every=2, resume=False,
                  gradient_checkpointing=False, caption_dropout=0.1, validation_fraction=0.34)


@pytest.fixture(scope="module")
def env(comfy, comfy_nodes, sd15_checkpoints):
    import folder_paths
    dataset = make_dataset(comfy.input_dir / "afa_train_ds")
    return dict(nodes=comfy_nodes, folder_paths=folder_paths, ckpts=sd15_checkpoints, dataset=dataset)


def load_ensemble(env, indices, mode=Mode.BLOCK_AVERAGE.value, aggregator="none"):
    """AFA Ensemble Loader's outputs (MODEL, CLIP, VAE), as ComfyUI's executor runs it."""
    ckpts = {f"ckpt_{i + 1}": env["ckpts"][k].name for i, k in enumerate(indices)}
    with torch.inference_mode():
        return env["nodes"]["AFAEnsembleLoader"].execute(aggregator=aggregator, mode=mode, weights="", model_index=1,
                                                         **ckpts).result


def train_node(env, model, clip, vae, save_name, dataset="afa_train_ds", **kw):
    """The V3 node's execute, as ComfyUI's executor runs it (under inference_mode) -> its outputs."""
    args = dict(TRAIN_ARGS, **kw)
    with torch.inference_mode():
        out = env["nodes"]["AFATrainAggregator"].execute(model=model, clip=clip, vae=vae, dataset_folder=dataset,
                                                         save_name=save_name, **args)
    assert out.ui["images"] and out.ui["text"] == (out.result[2],)  # the curve and the report on the node
    return out.result


@pytest.fixture(scope="module")
def trained(env):
    model, clip, vae = load_ensemble(env, [0, 1])
    agg, curve, report = train_node(env, model, clip, vae, "afa_test_node")
    from afa_nodes.service.training import aggregator_save_path
    return dict(agg=agg, curve=curve, report=report, path=aggregator_save_path("afa_test_node"))


def test_node_trains_under_inference_mode_and_writes_metadata(env, trained):
    path = trained["path"]
    assert path.is_file() and state_path(path).is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    loaded = load_aggregator(path)
    meta = loaded.training
    assert meta["step"] == 3 and meta["finished"] and meta["samples_seen"] == 6
    assert meta["data"]["images"] == 6 and meta["data"]["val_images"] == 2 and meta["data"]["train_samples"] == 4
    assert meta["data"]["resolution"] == 64 and meta["config"]["caption_dropout"] == 0.1
    assert [e["name"] for e in loaded.experts] == [p.name for p in env["ckpts"][:2]]
    assert [e["sha256"] for e in loaded.experts] == [file_sha256(p) for p in env["ckpts"][:2]]
    names = [r["name"] for r in meta["validation"]["rows"]]
    assert names[:2] == ["AFA aggregator (trained)", "block-wise average (untrained)"] and len(names) == 4
    assert meta["final_val_loss"] == meta["validation"]["rows"][0]["loss"] > 0
    assert trained["agg"].training["step"] == 3  # the node outputs the loaded file
    curve = trained["curve"]
    assert curve.shape == (1, 360, 640, 3) and 0.0 <= curve.min() and curve.max() <= 1.0 and curve.std() > 0
    assert "block-wise average (untrained)" in trained["report"] and "step 3/3" in trained["report"]


def test_trained_file_drives_the_loader_and_the_ensemble_node(env, trained):
    from afa_nodes.ensemble_model import require_ensemble
    model, clip, _ = load_ensemble(env, [0, 1], mode=Mode.AGGREGATOR.value, aggregator=trained["path"].name)
    ensemble = require_ensemble(model)
    assert ensemble.aggregator is not None and ensemble.mode is Mode.AGGREGATOR
    nodes = env["nodes"]
    with torch.inference_mode():
        positive = nodes["CLIPTextEncode"]().encode(clip, "a red picture")[0]
        negative = nodes["CLIPTextEncode"]().encode(clip, "")[0]
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        out = nodes["KSampler"]().sample(model, 1, 1, 2.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    import comfy.sd
    plain = [comfy.sd.load_checkpoint_guess_config(str(p))[0] for p in env["ckpts"][:2]]
    with torch.inference_mode():
        mixed = nodes["AFAEnsemble"].execute(mode=Mode.AGGREGATOR.value, weights="", model_index=1,
                                             aggregator=trained["agg"], model_1=plain[0], model_2=plain[1]).result[0]
    assert require_ensemble(mixed).aggregator is not None


@pytest.mark.parametrize("folder", ["../outside", "/tmp", "afa_train_ds/../../x", "", "no_such_folder"])
def test_dataset_folder_must_be_inside_the_input_directory(env, folder):
    from afa_nodes.nodes_train import AFATrainAggregator
    from afa_nodes.service.training import dataset_in_input_dir
    with pytest.raises(DatasetError, match="input directory|does not exist|give the dataset folder"):
        dataset_in_input_dir(folder)
    message = AFATrainAggregator.validate_inputs(folder, "ok_name")
    assert isinstance(message, str) and folder.split("/")[-1] in message
    assert AFATrainAggregator.validate_inputs("afa_train_ds", "ok_name") is True
    assert "plain file name" in AFATrainAggregator.validate_inputs("afa_train_ds", "../evil")


def test_resuming_with_other_models_is_refused_naming_them(env, trained):
    model, clip, vae = load_ensemble(env, [0, 2])
    before = trained["path"].read_bytes()
    with pytest.raises(TrainingError, match=rf"{env['ckpts'][1].name}.*models now are.*{env['ckpts'][2].name}"):
        train_node(env, model, clip, vae, "afa_test_node", steps=5, resume=True)
    assert trained["path"].read_bytes() == before


def test_experts_from_files_train_and_evaluate_gives_the_table_the_training_wrote(env, tmp_path):
    """service.training on experts loaded from files (no ensemble MODEL anywhere); evaluate()
    re-computes the file's validation table (the file's seed wins over the config's)."""
    from afa_nodes.core.errors import AggregatorMismatchError
    from afa_nodes.core.train import TrainConfig
    from afa_nodes.service import models, training
    names = [p.name for p in env["ckpts"]]
    experts, clip, vae = models.experts_from_files(names[:2])
    assert experts.hashes == [file_sha256(p) for p in env["ckpts"][:2]]
    config = TrainConfig(dataset=env["dataset"], out=tmp_path / "files.safetensors", steps=2, batch_size=2, lr=1e-3,
                         resolution=64, save_every=0, val_fraction=0.34, gradient_checkpointing=False, seed=5,
                         hidden=32, heads=4, depth=1)
    result = training.train(experts, clip, vae, config)
    written = load_aggregator(config.out).training["validation"]
    assert result.step == 2 and written["seed"] == 5 and len(written["rows"]) == 4
    table = training.evaluate(experts, clip, vae, config.replace(seed=0), aggregator=config.out)
    assert [r["name"] for r in table["rows"]] == [r["name"] for r in written["rows"]] and table["seed"] == 5
    for got, want in zip(table["rows"], written["rows"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["name"]
    references = training.evaluate(experts, clip, vae, config)  # no aggregator: the block-wise average and singles
    assert [r["name"] for r in references["rows"]] == [r["name"] for r in written["rows"][1:]]
    assert references["rows"][0]["loss"] == pytest.approx(written["rows"][1]["loss"], rel=1e-5)
    three, clip3, vae3 = models.experts_from_files(names)
    with pytest.raises(AggregatorMismatchError, match="trained for 2 models, this ensemble has 3"):
        training.evaluate(three, clip3, vae3, config, aggregator=config.out)


# ------------------------------------------------------------------ random crops, buckets, SDXL
BUCKET_ARGS = dict(resolution=96, crop="random", crop_variants=2, buckets=True, save_every=0)  # buckets 128x64, 64x128


@pytest.fixture(scope="module")
def bucket_runs(env):
    """The node with random crops and buckets on wide (160x64) and tall (64x160) images:
    2 steps straight, and 1 step then resumed to 2."""
    make_dataset(env["dataset"].parent / "afa_bucket_ds", n=6, size=64, aspect=True)
    model, clip, vae = load_ensemble(env, [0, 1])
    runs = {}
    for name, steps in (("afa_test_buckets", [2]), ("afa_test_buckets_resumed", [1, 2])):
        for k, n in enumerate(steps):
            runs[name] = train_node(env, model, clip, vae, name, "afa_bucket_ds", steps=n, resume=k > 0, **BUCKET_ARGS)
    from afa_nodes.service.training import aggregator_save_path
    return dict(model=model, clip=clip, vae=vae, folder=env["dataset"].parent / "afa_bucket_ds",
                paths={name: aggregator_save_path(name) for name in runs}, reports={k: v[2] for k, v in runs.items()})


def test_node_with_random_crop_and_buckets_records_them_and_resumes_exactly(bucket_runs):
    straight, resumed = (load_aggregator(bucket_runs["paths"][n]) for n in ("afa_test_buckets", "afa_test_buckets_resumed"))
    data = straight.training["data"]
    assert straight.training["step"] == 2 and straight.training["finished"]
    assert (data["crop"], data["crop_variants"], data["val_crop"], data["buckets"]) == ("random", 2, "center", True)
    assert data["bucket_images"] == {"128x64": 4, "64x128": 2} and data["resolution"] == 96
    assert "Validation at step 2" in bucket_runs["reports"]["afa_test_buckets"]
    assert resumed.training["step"] == 2
    for k, v in straight.state_dict.items():
        assert torch.equal(resumed.state_dict[k], v), k
    side = [torch.load(state_path(bucket_runs["paths"][n]), weights_only=True) for n in bucket_runs["paths"]]
    assert side[0]["position"] == side[1]["position"] == 4
    for a, b in zip(side[0]["optimizer"]["state"].values(), side[1]["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_encoded_buckets_give_one_shape_per_batch_random_train_crops_and_center_validation(bucket_runs):
    from afa_nodes.core.dataset import ImageDataset
    from afa_nodes.core.train import TrainConfig
    from afa_nodes.core.train_data import DataOrder, make_batch
    from afa_nodes.service.models import experts_of
    from afa_nodes.training_host import encode_dataset
    r = bucket_runs
    config = TrainConfig(dataset=r["folder"], resolution=96, val_fraction=0.34, crop="random", crop_variants=3,
                         buckets=True)
    with torch.inference_mode(False):
        data, meta = encode_dataset(experts_of(r["model"]), r["clip"], r["vae"], config)
    order = DataOrder(len(data.train), 2, 0, data.train_buckets)
    assert order.bucketed
    shapes = {tuple(make_batch(data, order, [p, p + 1], False, seed=0, timesteps=1000, caption_dropout=0.1,
                               num_models=2, device="cpu").latents.shape[1:])
              for p in range(0, 3 * order.epoch_length, 2)}
    assert shapes == {(4, 8, 16), (4, 16, 8)}
    train_set, val_set = data.train.dataset, data.val.dataset
    boxes = [train_set.latents.boxes[i] for i in sorted(set(train_set.samples))]
    assert all(len(row) == 3 for row in boxes) and any(len(set(row)) > 1 for row in boxes)
    center = ImageDataset(r["folder"], resolution=96, bucketing=True)
    for k, i in enumerate(val_set.samples):
        assert val_set.at(k, 5)["crop_box"] == center.crop_box(i)
    assert meta["crop_variants"] == 3


class FakeSDXLClip:
    """Stands in for the AFA loader's CLIP over N SDXL-family models (the synthetic SDXL
    checkpoints carry no text encoders, and a real clip_g has ~700M parameters): per-model
    stacks cond [1, 77, N*2048] and pooled_output [1, N*1280], a fixed function of the caption."""
    layer_idx = None

    def __init__(self, n):
        self.n, self.others = n, []
        self.cond_stage_model = torch.nn.Linear(2, 2)  # fingerprinted for the text cache key
        self.patcher = type("Patcher", (), {"patches": {}})()

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        g = torch.Generator().manual_seed(sum(map(ord, tokens)) + 1)
        return {"cond": torch.randn(1, 77, self.n * 2048, generator=g) * 0.1,
                "pooled_output": torch.randn(1, self.n * 1280, generator=g) * 0.1}


@pytest.fixture(scope="module")
def sdxl_env(env, sdxl_checkpoints):
    """Two SDXL-family experts as service.models.ExpertSet: no ensemble MODEL is built."""
    import comfy.sd as comfy_sd
    from afa_nodes.service.models import ExpertSet
    paths = sdxl_checkpoints[:2]
    patchers = [comfy_sd.load_checkpoint_guess_config(str(p))[0] for p in paths]
    experts = ExpertSet(patchers, [p.name for p in paths], [file_sha256(p) for p in paths], [str(p) for p in paths])
    vae = comfy_sd.load_checkpoint_guess_config(str(env["ckpts"][0]))[2]  # a 4-channel VAE (SDXL ones have none)
    return dict(experts=experts, vae=vae, clip=FakeSDXLClip(2))


def test_sdxl_y_per_model_equals_each_models_own_encode_adm(sdxl_env):
    from afa_nodes.training_host import adm_maker, experts_layout
    experts = sdxl_env["experts"]
    layout = experts_layout(experts)
    make = adm_maker(experts.models[0], 2, layout.adm_dim)
    pooled = torch.randn(2 * 1280)
    item = {"size": (300, 200), "crop_box": (96, 64, 16, 0), "target": (64, 64)}
    ys = make(pooled, item)
    assert len(ys) == 2 and all(y.shape == (2816,) for y in ys)
    for i, y in enumerate(ys):
        own = experts.models[i].encode_adm(pooled_output=pooled[None, i * 1280:(i + 1) * 1280], width=300, height=200,
                                           crop_w=16, crop_h=0, target_width=64, target_height=64)
        assert torch.equal(y, own[0].float())
    moved = make(pooled, dict(item, crop_box=(96, 64, 0, 0)))
    assert torch.equal(moved[0][:1280], ys[0][:1280]) and not torch.equal(moved[0], ys[0])  # crop conditioning
    with pytest.raises(TrainingError, match="pooled text output has width 1000"):
        make(torch.randn(1000), item)


def test_sdxl_family_experts_train_without_an_ensemble_model(env, sdxl_env, tmp_path):
    from afa_nodes.core.spec import EnsembleSpec, Mode
    from afa_nodes.core.train import TrainConfig
    from afa_nodes.ensemble_model import build_ensemble
    from afa_nodes.service import training
    folder = make_dataset(tmp_path / "xl_ds", n=4, size=64)
    config = TrainConfig(dataset=folder, out=tmp_path / "xl.safetensors", steps=2, batch_size=2, lr=1e-3,
                         save_every=0, hidden=32, heads=4, depth=1, gradient_checkpointing=False, resolution=64,
                         val_fraction=0.25)
    experts = sdxl_env["experts"]
    with torch.inference_mode():
        result = training.train(experts, sdxl_env["clip"], sdxl_env["vae"], config)
    meta = result.metadata
    assert result.step == 2 and meta["finished"] and "SDXL" in meta["data"]["label_input"]
    assert all(r["loss"] > 0 for r in result.validation["rows"]) and len(result.validation["rows"]) == 4
    agg = load_aggregator(tmp_path / "xl.safetensors")
    assert agg.layout["adm_dim"] == 2816 and len(agg.layout["points"]) == 19
    assert [e["sha256"] for e in agg.experts] == experts.hashes
    build_ensemble(experts.patchers, experts.names, EnsembleSpec(mode=Mode.AGGREGATOR), agg, experts.hashes)  # fits


@pytest.fixture(scope="module")
def server(comfyui_path, models_dir, sd15_checkpoints):
    """Our own server with one OpenMP thread: training on shared cores is several times faster."""
    from comfy_server import ComfyServer
    with ComfyServer(comfyui_path, models_dir=models_dir, env=dict(os.environ, OMP_NUM_THREADS="1")) as srv:
        yield srv


def test_server_prompt_trains_and_cancel_leaves_a_resumable_file(server, sd15_checkpoints):
    """A real prompt execution (nodes run under inference_mode in ComfyUI's executor), then /interrupt."""
    srv = server
    make_dataset(srv.input_dir / "afa_srv_ds")
    afa_dir = Path(srv.models_dir) / "afa"

    def prompt(save_name, steps, save_every):
        return {
            "1": {"class_type": "AFAEnsembleLoader", "inputs": dict(
                srv.widget_defaults("AFAEnsembleLoader"), ckpt_1=sd15_checkpoints[0].name, ckpt_2=sd15_checkpoints[1].name,
                aggregator="none", mode="block-wise average", weights="", model_index=1)},
            "2": {"class_type": "AFATrainAggregator", "inputs": dict(
                TRAIN_ARGS, model=["1", 0], clip=["1", 1], vae=["1", 2], dataset_folder="afa_srv_ds",
                save_name=save_name, steps=steps, save_every=save_every)},
        }
    srv.run(prompt("afa_srv", 2, 0), timeout=300)
    assert load_aggregator(afa_dir / "afa_srv.safetensors").training["step"] == 2

    target = afa_dir / "afa_srv_cancel.safetensors"
    prompt_id = srv.queue(prompt("afa_srv_cancel", 100_000, 1))
    deadline = time.monotonic() + 240
    while not target.exists():  # saved after every step: training is under way
        assert time.monotonic() < deadline and srv.history(prompt_id) is None, srv.log_tail()
        time.sleep(0.2)
    srv.interrupt()
    with pytest.raises(Exception, match="interrupted"):
        srv.wait(prompt_id, timeout=120)
    meta = load_aggregator(afa_dir / "afa_srv_cancel.safetensors").training
    assert 1 <= meta["step"] < 100_000 and not meta["finished"]
    assert torch.load(state_path(afa_dir / "afa_srv_cancel.safetensors"), weights_only=True)["step"] == meta["step"]


# ---------------------------------------------------------------------------------- CLI
def cli(args, tmp, *, nproc=1, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    from afa_nodes.comfy_find import find_comfyui
    env["COMFYUI_PATH"] = str(find_comfyui())
    launch = [sys.executable, "-m", "afa_nodes"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "afa_nodes"]
    # own session: on a timeout the whole group (torchrun's workers too) is killed, nothing is left behind
    proc = subprocess.Popen(launch + ["train"] + [str(a) for a in args], cwd=tmp, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"train CLI did not finish in {timeout}s:\n{stdout[-2000:]}{stderr[-4000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def cli_args(env, out, data):
    """Random crops and aspect-ratio buckets (128x64 and 64x128 at resolution 96) on the wide/tall dataset."""
    args = ["--data", data, "--out", out, "--steps", 3, "--batch-size", 4, "--resolution", 96, "--lr", 1e-3,
            "--warmup", 0, "--save-every", 2, "--val-fraction", 0.34, "--seed", 1, "--no-grad-checkpointing",
            "--crop", "random", "--crop-variants", 2, "--buckets"]
    for p in env["ckpts"][:2]:
        args += ["--checkpoint", p]
    return args


@pytest.fixture(scope="module")
def cli_single(env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    data = make_dataset(tmp / "data", aspect=True)
    done = cli(cli_args(env, tmp / "single.safetensors", data), tmp)
    return dict(tmp=tmp, data=data, out=tmp / "single.safetensors", log=done.stdout + done.stderr)


def test_cli_trains_end_to_end(env, cli_single):
    out = cli_single["out"]
    meta = load_aggregator(out).training
    assert meta["step"] == 3 and meta["finished"] and meta["config"]["world_size"] == 1
    assert (meta["data"]["crop"], meta["data"]["crop_variants"], meta["data"]["buckets"]) == ("random", 2, True)
    assert meta["data"]["bucket_images"] == {"128x64": 4, "64x128": 2}
    assert [e["sha256"] for e in load_aggregator(out).experts] == [file_sha256(p) for p in env["ckpts"][:2]]
    assert "Validation at step 3" in cli_single["log"] and "block-wise average (untrained)" in cli_single["log"]
    assert (cli_single["data"] / ".afa_cache" / "latents").is_dir()


def test_cli_two_process_gloo_run_matches_one_process(env, cli_single):
    tmp = cli_single["tmp"]
    out = tmp / "ddp.safetensors"
    done = cli(cli_args(env, out, cli_single["data"]), tmp, nproc=2)
    ddp, single = load_aggregator(out), load_aggregator(cli_single["out"])
    assert ddp.training["config"]["world_size"] == 2 and ddp.training["step"] == 3
    for (_, a), (_, b) in zip(ddp.training["loss_curve"], single.training["loss_curve"]):
        assert a == pytest.approx(b, rel=1e-4)
    assert ddp.training["final_val_loss"] == pytest.approx(single.training["final_val_loss"], rel=1e-4)
    for k, v in single.state_dict.items():
        torch.testing.assert_close(ddp.state_dict[k], v, rtol=1e-3, atol=1e-5, msg=k)
    assert (done.stdout + done.stderr).count("Validation at step 3") == 1  # only rank 0 logs


def test_benchmark_quick_smoke():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("2", "off"), ("2", "on"), ("3", "off"), ("3", "on")]
    assert all(float(r[2]) > 0 for r in rows)
