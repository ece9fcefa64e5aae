"""Hostile and broken input (issue #14 part 4): every kind is refused with a typed error that
names the thing and the fix, the ComfyUI server keeps serving (the next good prompt runs),
and no good file is touched (sha256 before/after).

Through a real ComfyUI server (one shared `comfy_server`) for what reaches the pack through a
prompt: aggregator files, checkpoints, ensembles, map recording, training datasets. In the
library for what only a dataset or a file for training holds (image formats, captions,
decompression bombs); 60 s on 2 idle cores. Each case is one row of
docs/reliability.md "Hostile input"; the rows seen go to test-artifacts/reliability/hostile.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from comfy_server import ComfyServerError
from PIL import Image
from reliability import layout_of, make_image, png_header_bomb, save_agg
from safetensors.torch import load_file, save_file
from test_maps_comfy import maps_api_prompt
from toy_dataset import make_dataset

from afa_nodes.core.errors import AggregatorFileError, DatasetError
from afa_nodes.core.files import file_sha256

pytestmark = [pytest.mark.comfyui, pytest.mark.reliability]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "reliability"
ROWS: list = []
TRAIN = dict(steps=1, batch_size=2, learning_rate=1e-3, resolution=64, seed=0, save_every=0, resume=False,
             gradient_checkpointing=False, validation_fraction=0.0)


@pytest.fixture(scope="module")
def env(comfy, comfy_server, sd15_checkpoints, sdxl_checkpoints, models_dir, tmp_path_factory):
    srv, afa, ckpts = comfy_server, models_dir / "afa", models_dir / "checkpoints"
    sd15, sdxl = layout_of(sd15_checkpoints[0]), layout_of(sdxl_checkpoints[0])
    a, b = sd15_checkpoints[0].name, sd15_checkpoints[1].name
    good = afa / save_agg(afa / "hostile_good.safetensors", sd15)
    raw = good.read_bytes()
    files = {
        "wrong_n": save_agg(afa / "hostile_three_models.safetensors", sd15, n=3),
        "wrong_layout": save_agg(afa / "hostile_sdxl_layout.safetensors", sdxl),
        "nan": save_agg(afa / "hostile_nan.safetensors", sd15, nan=True),
        "other_experts": save_agg(afa / "hostile_other_experts.safetensors", sd15, experts=[
            {"name": "someone_elses_a.safetensors", "sha256": "a" * 64},
            {"name": "someone_elses_b.safetensors", "sha256": "b" * 64}]),
    }
    (afa / "hostile_truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    corrupt = bytearray(raw)
    corrupt[8:40] = b"\xff" * 32                                   # the JSON header overwritten
    (afa / "hostile_corrupt.safetensors").write_bytes(bytes(corrupt))
    marker = tmp_path_factory.mktemp("pickle") / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"weights": Payload()}, afa / "hostile_pickle.safetensors")
    save_file({"w": torch.zeros(4)}, afa / "hostile_big_metadata.safetensors",
              metadata={"afa": json.dumps({"pad": "x" * (50 << 20)})})
    save_file({"lora_up.weight": torch.zeros(4, 4)}, afa / "hostile_lora.safetensors")
    (ckpts / "hostile_truncated_ckpt.safetensors").write_bytes(sd15_checkpoints[0].read_bytes()[: 5 << 20])
    torch.save({"state_dict": {"w": Payload()}}, ckpts / "hostile_pickle_ckpt.safetensors")

    inp = srv.input_dir
    make_dataset(inp / "hostile_good_ds")
    outside = make_dataset(tmp_path_factory.mktemp("outside") / "private_ds")
    (inp / "hostile_link_ds").symlink_to(outside, target_is_directory=True)
    (inp / "hostile_empty_ds").mkdir()
    (inp / "hostile_corrupt_ds").mkdir()
    (inp / "hostile_corrupt_ds" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (inp / "hostile_bomb_ds").mkdir()
    png_header_bomb(inp / "hostile_bomb_ds" / "bomb.png")
    latin = make_dataset(inp / "hostile_latin1_ds")
    (latin / "img_0.txt").write_bytes("un caf\xe9 cr\xe8me".encode("latin-1"))

    guarded = [good, *(p.resolve() for p in sd15_checkpoints[:2]), *sorted((inp / "hostile_good_ds").iterdir()),
               *sorted(outside.iterdir())]
    before = {p: file_sha256(p) for p in guarded}
    srv.check_nodes(["AFAEnsembleLoader", "AFAEnsemble", "AFATrainAggregator", "AFARecordAttention"])
    yield SimpleNamespace(srv=srv, a=a, b=b, xl=sdxl_checkpoints[0].name, good=good.name, files=files,
                          marker=marker, seed=[0], guarded=guarded, before=before, afa=afa)
    for p in ["hostile_truncated_ckpt.safetensors", "hostile_pickle_ckpt.safetensors"]:
        (ckpts / p).unlink(missing_ok=True)
    for p in afa.glob("hostile_*"):
        p.unlink()


def loader(env, ckpt_2=None, **kw):
    inputs = dict(ckpt_1=env.a, ckpt_2=ckpt_2 or env.b, aggregator="none", mode="block-wise average", weights="",
                  model_index=1)
    return {"class_type": "AFAEnsembleLoader", "inputs": dict(inputs, **kw)}


def sample(env, model=("1", 0), clip=("1", 1)):
    """Nodes 2-6: encode, 1 Euler step at 64x64, SaveLatent (a new seed each call: never cached)."""
    env.seed[0] += 1
    return {
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": list(clip), "text": "a lighthouse"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": list(clip), "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": list(model), "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": env.seed[0], "steps": 1, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "afa_hostile"}}}


def ensemble_prompt(env, **kw):
    return {"1": loader(env, **kw), **sample(env)}


def train_prompt(env, dataset):
    return {"1": loader(env), "7": {"class_type": "AFATrainAggregator", "inputs": dict(
        env.srv.widget_defaults("AFATrainAggregator"), **TRAIN, model=["1", 0], clip=["1", 1], vae=["1", 2],
        dataset_folder=dataset, save_name="hostile_trained")}}


def refused(env, kind, prompt, pattern, rejected=False):
    """The prompt fails with `pattern` (at validation: HTTP 400 when `rejected`), the server then
    runs a good prompt, and the guarded files are unchanged. One row of the docs table."""
    srv = env.srv
    with pytest.raises(ComfyServerError, match=pattern) as err:
        if rejected:
            srv.queue(prompt)
        else:
            srv.run(prompt, timeout=900)
    assert ("rejected the prompt (HTTP 400)" in str(err.value)) == rejected
    assert srv.running
    entry = srv.run(ensemble_prompt(env), timeout=900)
    alive = any("latents" in out for out in entry["outputs"].values())
    intact = all(file_sha256(p) == h for p, h in env.before.items() if p.suffix != ".safetensors" or p.parent == env.afa)
    assert alive and intact
    message = str(err.value).split("\n")[0]
    message = validation_errors(message) if rejected else message[message.find(":") + 1:].strip()
    ROWS.append({"input": kind, "shown": message[:240], "where": "server",
                 "server_alive": alive, "files_intact": intact})


def validation_errors(message: str) -> str:
    """ComfyUI's HTTP 400 body (node_errors) as one line."""
    body = json.loads(message.split("HTTP 400): ", 1)[1])
    errors = [e for node in (body.get("node_errors") or {}).values() for e in node.get("errors", [])]
    return "ComfyUI refuses the prompt (HTTP 400): " + "; ".join(f"{e.get('message')}: {e.get('details')}"
                                                                  for e in errors)


# ---------------------------------------------------------------- through the server
def test_ensembles_of_incompatible_models(env):
    refused(env, "mixed architectures (SD1.5 + SDXL)", ensemble_prompt(env, ckpt_2=env.xl),
            r"IncompatibleModelsError.*(SDXL|2048|context|architecture)")
    one = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": env.a}},
           "7": {"class_type": "AFAEnsemble", "inputs": {"model_1": ["1", 0], "mode": "block-wise average",
                                                         "weights": "", "model_index": 1}}}
    refused(env, "N=1 (AFA Ensemble with one model)", {**one, **sample(env, ("7", 0), ("1", 1))},
            r"AFAError.*needs 2 to 6 models, got 1")
    seven = {**one, **{"7": {"class_type": "AFAEnsemble", "inputs": dict(
        {f"model_{i}": ["1", 0] for i in range(1, 8)}, mode="block-wise average", weights="", model_index=1)}}}
    refused(env, "N=7 (above the maximum of 6)", {**seven, **sample(env, ("7", 0), ("1", 1))},
            r"model_7.*(slots are|6)")


def test_aggregators_that_do_not_fit_or_are_broken(env):
    f = env.files
    agg = dict(mode="aggregator")
    refused(env, "aggregator trained for N=3 on a 2-model ensemble",
            ensemble_prompt(env, aggregator=f["wrong_n"], **agg), r"AggregatorMismatchError.*trained for 3 models")
    refused(env, "aggregator of another layout (SDXL's on SD1.5)",
            ensemble_prompt(env, aggregator=f["wrong_layout"], **agg),
            r"AggregatorMismatchError.*hostile_sdxl_layout.safetensors was trained on another architecture")
    refused(env, "truncated aggregator .safetensors", ensemble_prompt(env, aggregator="hostile_truncated.safetensors", **agg),
            r"AggregatorFileError.*hostile_truncated.safetensors is not a readable .safetensors file")
    refused(env, "corrupt aggregator header", ensemble_prompt(env, aggregator="hostile_corrupt.safetensors", **agg),
            r"AggregatorFileError.*hostile_corrupt.safetensors is not a readable")
    refused(env, "pickle file renamed .safetensors (aggregator)",
            ensemble_prompt(env, aggregator="hostile_pickle.safetensors", **agg),
            r"AggregatorFileError.*hostile_pickle.safetensors is a PyTorch/pickle file.*never unpickles")
    assert not env.marker.exists()                      # its payload never ran
    refused(env, "aggregator metadata JSON of 50 MB", ensemble_prompt(env, aggregator="hostile_big_metadata.safetensors", **agg),
            r"AggregatorFileError.*metadata is 50.0 MB")
    refused(env, "NaN weights in an aggregator", ensemble_prompt(env, aggregator=f["nan"], **agg),
            r"AggregatorFileError.*hostile_nan.safetensors holds NaN/inf weights \(blocks.0.conv_out.weight\)")
    refused(env, "a LoRA (no AFA metadata) in models/afa", ensemble_prompt(env, aggregator="hostile_lora.safetensors", **agg),
            r"AggregatorFileError.*hostile_lora.safetensors has no AFA metadata")
    refused(env, "missing aggregator file", ensemble_prompt(env, aggregator="deleted.safetensors", **agg),
            r"aggregator.*deleted.safetensors", rejected=True)
    refused(env, "mode 'aggregator' without an aggregator", ensemble_prompt(env, **agg),
            r"needs an aggregator file")


def test_aggregator_trained_for_other_experts_warns_and_runs(env):
    """Policy: a file trained on other checkpoints (sha256 differ) RUNS with a warning naming both
    lists: fine-tunes of one base share features, and the user chose the file on purpose.
    Resuming TRAINING on other experts is refused (test_train_comfy)."""
    srv = env.srv
    entry = srv.run(ensemble_prompt(env, mode="aggregator", aggregator=env.files["other_experts"]), timeout=900)
    assert any("latents" in out for out in entry["outputs"].values())
    assert "hostile_other_experts.safetensors was trained on ['someone_elses_a.safetensors'" in srv.log_text()
    ROWS.append({"input": "aggregator trained for other experts (sha256 mismatch)",
                 "shown": "warning in the log: '<file> was trained on [...], not on [...]: it will run, but its "
                          "weights were not learned for these models' (policy: warn, run)",
                 "where": "server", "server_alive": True, "files_intact": True})


def test_broken_checkpoints_and_bad_settings(env):
    refused(env, "truncated checkpoint .safetensors", ensemble_prompt(env, ckpt_2="hostile_truncated_ckpt.safetensors"),
            r"AFAError.*checkpoint 'hostile_truncated_ckpt.safetensors' cannot be loaded.*Re-download")
    refused(env, "pickle file renamed .safetensors (checkpoint)",
            ensemble_prompt(env, ckpt_2="hostile_pickle_ckpt.safetensors"),
            r"AFAError.*checkpoint 'hostile_pickle_ckpt.safetensors' cannot be loaded")
    assert not env.marker.exists()
    refused(env, "missing checkpoint file", ensemble_prompt(env, ckpt_2="deleted_ckpt.safetensors"),
            r"ckpt_2.*deleted_ckpt.safetensors", rejected=True)
    refused(env, "fixed weights that are not numbers", ensemble_prompt(env, mode="fixed weights", weights="0.5, lots"),
            r"AFAError.*weights")
    refused(env, "single model index 5 of 2 models", ensemble_prompt(env, mode="single model", model_index=5),
            r"AFAError.*(model_index|model 5|index)")
    # Not refused, by design: ComfyUI floors a size to whole latents (60 -> 7 latents = 56 px) and the
    # ensemble mixes the odd 7x7 latent block by block like any size.
    odd = {**ensemble_prompt(env), "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 60, "height": 60,
                                                                                   "batch_size": 1}}}
    (out,) = [o for o in env.srv.run(odd, timeout=900)["outputs"].values() if "latents" in o]
    latent = load_file(str(env.srv.output_dir / out["latents"][0].get("subfolder", "") / out["latents"][0]["filename"]))
    assert latent["latent_tensor"].shape == (1, 4, 7, 7) and torch.isfinite(latent["latent_tensor"]).all()
    ROWS.append({"input": "image size not a multiple of 8 (60x60)", "shown": "runs: ComfyUI floors it to 7x7 "
                 "latents (56 px); the ensemble mixes odd latent sizes", "where": "server", "server_alive": True,
                 "files_intact": True})


def test_map_recording_input(env):
    base = maps_api_prompt(env.a, env.b, steps=1)
    bad_point = json.loads(json.dumps(base))
    bad_point["2"]["inputs"]["points"] = "input 99, nowhere"
    refused(env, "unknown map point (record)", bad_point, r"AFAError.*aggregation point")
    preview_point = json.loads(json.dumps(base))
    preview_point["8"]["inputs"]["points"] = "output 42"
    refused(env, "unknown map point (preview)", preview_point, r"AFAError.*point")
    bad_steps = json.loads(json.dumps(base))
    bad_steps["2"]["inputs"]["steps"] = "every 0"
    refused(env, "unreadable steps selection", bad_steps, r"K must be at least 1", rejected=True)
    plain = json.loads(json.dumps(base))
    plain["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": env.a}}
    refused(env, "a non-AFA model into AFA Record Attention", plain, r"AFAError.*needs an AFA MODEL")
    other_latent = json.loads(json.dumps(base))
    other_latent["8"]["inputs"]["latent"] = ["5", 0]            # the empty latent, not the sampler's
    refused(env, "a latent no recorded run produced into AFA Attention Preview", other_latent, r"AFAError.*latent")


def test_training_datasets(env):
    refused(env, "dataset path with '..'", train_prompt(env, "../../etc"), r"input directory", rejected=True)
    refused(env, "absolute dataset path", train_prompt(env, "/etc"), r"input directory", rejected=True)
    refused(env, "dataset folder linked to outside the input directory", train_prompt(env, "hostile_link_ds"),
            r"hostile_link_ds.*outside ComfyUI's input directory.*link to .*private_ds", rejected=True)
    refused(env, "missing dataset folder", train_prompt(env, "no_such_ds"), r"does not exist", rejected=True)
    refused(env, "empty dataset", train_prompt(env, "hostile_empty_ds"), r"DatasetError.*No images found")
    refused(env, "dataset of corrupt images only", train_prompt(env, "hostile_corrupt_ds"),
            r"DatasetError: None of the 1 image files.*could be read.*broken.png")
    refused(env, "decompression-bomb PNG (100000 x 100000 declared)", train_prompt(env, "hostile_bomb_ds"),
            r"DatasetError: None of the 1 image files.*could be read.*bomb.png")
    refused(env, "caption not UTF-8", train_prompt(env, "hostile_latin1_ds"),
            r"DatasetError.*img_0.txt.*not UTF-8.*save it as UTF-8")
    assert not (env.afa / "hostile_trained.safetensors").exists()


# ---------------------------------------------------------------- in the library (dataset files)
def pixels(folder: Path, resolution=32):
    from afa_nodes.core.dataset import ImageDataset
    data = ImageDataset(folder, resolution=resolution)
    return data, {data.name(i): data.image(i) for i in range(len(data.entries))}


def test_image_modes_are_converted_to_the_right_colours(tmp_path):
    """CMYK, 16-bit grey, palette, palette+transparency, RGBA and LA images train as their RGB
    colours (transparency on white); a 16-bit grey was read as white before the fix."""
    folder = tmp_path / "modes"
    grey16 = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))
    palette = Image.new("RGB", (32, 32), (0, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    cases = {"cmyk.jpg": (Image.new("CMYK", (32, 32), (0, 255, 255, 0)), (255, 0, 0)),
             "grey16.png": (grey16, (128, 128, 128)),
             "palette.png": (palette, (0, 128, 0)),
             "palette_alpha.png": (transparent, (255, 255, 255)),
             "rgba.png": (Image.new("RGBA", (32, 32), (0, 0, 255, 0)), (255, 255, 255)),
             "la.png": (Image.new("LA", (32, 32), (0, 255)), (0, 0, 0))}
    for name, (image, _) in cases.items():
        make_image(folder, name, image)
    _, got = pixels(folder)
    for name, (_, rgb) in cases.items():
        mean = (got[name].mean(dim=(0, 1)) * 255).tolist()
        assert np.allclose(mean, rgb, atol=3), (name, mean, rgb)
        ROWS.append({"input": f"{Path(name).stem} image", "shown": f"trained as RGB {rgb} (converted, no error)",
                     "where": "library", "server_alive": True, "files_intact": True})


def test_sizes_not_a_multiple_of_8(tmp_path):
    from afa_nodes.core.dataset import ImageDataset
    make_image(tmp_path / "odd", "odd.png", Image.new("RGB", (67, 45), (10, 20, 30)))
    _, got = pixels(tmp_path / "odd", resolution=32)
    assert got["odd.png"].shape == (32, 32, 3)            # images of any size are cropped to the target
    with pytest.raises(DatasetError, match="resolution 60 must be a positive multiple of 8"):
        ImageDataset(tmp_path / "odd", resolution=60)
    ROWS.append({"input": "training resolution not a multiple of 8 (60)",
                 "shown": "DatasetError: resolution 60 must be a positive multiple of 8 (VAE).",
                 "where": "library", "server_alive": True, "files_intact": True})


def test_captions_missing_empty_or_not_utf8(tmp_path, caplog):
    """Policy: a missing or empty caption trains that image unconditionally (counted and warned);
    a caption that is not UTF-8 is an error naming the file (it was silently replaced by U+FFFD)."""
    folder = tmp_path / "caps"
    make_image(folder, "missing.png", Image.new("RGB", (32, 32)), caption=None)
    make_image(folder, "empty.png", Image.new("RGB", (32, 32)), caption="")
    make_image(folder, "bom.png", Image.new("RGB", (32, 32)), caption="\ufeffa fox".encode("utf-8"))
    with caplog.at_level("WARNING", logger="ComfyUI-AFA"):
        data, _ = pixels(folder)
    assert dict(zip([data.name(i) for i in range(3)], data.captions)) == {"bom.png": "a fox", "empty.png": "",
                                                                          "missing.png": ""}
    assert data.report.missing_captions == 1 and "without caption use an empty caption ['missing.png']" in caplog.text
    make_image(folder, "latin.png", Image.new("RGB", (32, 32)), caption="caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"caption 'latin.txt' .* is not UTF-8 .*save it as UTF-8"):
        pixels(folder)
    ROWS.append({"input": "captions missing or empty", "shown": "warning: 'N image(s) without caption use an "
                 "empty caption [names]' (trained unconditionally)", "where": "library", "server_alive": True,
                 "files_intact": True})


def test_decompression_bombs_are_skipped(tmp_path, caplog, monkeypatch):
    """Both kinds of PIL's bomb check are refused: over 2x MAX_IMAGE_PIXELS (an error in PIL) and
    between 1x and 2x (only a warning in PIL: the image would be decoded in full before the fix)."""
    folder = tmp_path / "bombs"
    make_dataset(folder, n=2, size=32)
    png_header_bomb(folder / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60 * 60)
    make_image(folder, "big.png", Image.new("RGB", (70, 70)))          # 4900 px: between 1x and 2x
    with caplog.at_level("WARNING", logger="ComfyUI-AFA"):
        data, _ = pixels(folder)
    assert data.report.skipped_corrupt == 2 and sorted(data.report.corrupt_files) == ["big.png", "huge.png"]
    assert "skipped 2 unreadable file(s)" in caplog.text and len(data.entries) == 2


def test_broken_aggregator_metadata_is_a_typed_error(tmp_path):
    from afa_nodes.core.aggregator_file import load_aggregator
    cases = {"not JSON": "{not json", "a JSON list": "[1, 2]", "no layout": "{}",
             "bad config": json.dumps({"layout": {"points": []}, "config": {"bogus": 1}}),
             "format_version not a number": json.dumps({"format_version": "x", "layout": {"points": []}})}
    for i, (what, text) in enumerate(cases.items()):
        save_file({"w": torch.zeros(2)}, tmp_path / f"m{i}.safetensors", metadata={"afa": text})
        with pytest.raises(AggregatorFileError, match=rf"m{i}.safetensors: its AFA metadata is damaged"):
            load_aggregator(tmp_path / f"m{i}.safetensors")
    ROWS.append({"input": "aggregator metadata damaged (not JSON, wrong types, missing keys)",
                 "shown": "AggregatorFileError: <file>: its AFA metadata is damaged (...); re-train or re-export "
                          "the aggregator.", "where": "library", "server_alive": True, "files_intact": True})


# ---------------------------------------------------------------- last: nothing good was touched
def test_no_good_file_was_touched_and_the_table_is_written(env):
    after = {p: file_sha256(p) for p in env.guarded}
    assert after == env.before
    assert not env.marker.exists()
    kinds = {r["input"] for r in ROWS}
    assert len(kinds) >= 25, sorted(kinds)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "hostile.json").write_text(json.dumps(ROWS, indent=1), encoding="utf-8")
