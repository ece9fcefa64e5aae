"""`python -m afa_nodes train` on DiTs shared as split files: --diffusion-model files with their
text encoders (--clip, --clip-type as ComfyUI's CLIP loaders name it) and VAE (--vae).

End to end in a subprocess (ComfyUI booted by the CLI) on the tiny SD3 demo files, and (slow)
on the smallest files ComfyUI detects as FLUX; the aggregator file records the family, the
flow-matching objective and the diffusion model files' sha256. Bad combinations of flags are
typed errors before ComfyUI boots (exit code 2, the message names the flags); files of the
wrong kind or that do not fit the experts are typed errors naming the file and the fix.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dit_files import check_trained, sd3_demo_files, skip_unless_comfyui_reads_flux_text_width
from toy_dataset import make_dataset

from afa_nodes import cli_train
from afa_nodes.core.aggregator_file import load_aggregator
from afa_nodes.core.errors import AFAError, IncompatibleModelsError
from afa_nodes.core.spec import CLIP_TYPES

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--steps", "2", "--batch-size", "1", "--resolution", "64", "--lr", "1e-3", "--warmup", "0",
         "--save-every", "0", "--val-fraction", "0.34", "--seed", "1", "--no-grad-checkpointing"]


def run_cli(args, cwd, timeout=900) -> subprocess.CompletedProcess:
    from afa_nodes.comfy_find import find_comfyui
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "afa_nodes", "train", "--comfyui", str(find_comfyui())]
                          + [str(a) for a in args], cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def sd3_files(comfy, sd15_checkpoints):
    return sd3_demo_files(sd15_checkpoints[0])


def split_args(files, *extra):
    return ["--diffusion-model", *files["diffusion_models"], "--clip", *files["text_encoders"],
            "--vae", files["vae"][0], *extra]


@pytest.mark.comfyui
def test_cli_trains_sd3_from_split_files(sd3_files, tmp_path):
    """Text encoder type 'auto' is the family's (sd3: ComfyUI pads CLIP-L to SD3's 4096-wide context)."""
    data = make_dataset(tmp_path / "data", n=3)
    out = tmp_path / "sd3.safetensors"
    done = run_cli(split_args(sd3_files, "--data", data, "--out", out, *TRAIN), tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    check_trained(out, sd3_files, "mmdit")
    assert "Validation at step 2" in done.stderr and "block-wise average (untrained)" in done.stderr


@pytest.mark.comfyui
@pytest.mark.slow
def test_cli_trains_flux_from_split_files(comfy, sd15_checkpoints, tmp_path):
    """The smallest files ComfyUI detects as FLUX.1 [dev] (~1 GB each), CLIP-L as the text encoder
    (the files' text widths), --clip-type flux as DualCLIPLoader names it."""
    from conftest import checkpoint_cache_dir

    from afa_nodes.comfy_dit_models import ensure_flux_demo_files
    files = ensure_flux_demo_files(checkpoint_cache_dir() / "dit", sd15_checkpoints[0].resolve())
    skip_unless_comfyui_reads_flux_text_width(files)
    data = make_dataset(tmp_path / "data", n=3)
    out = tmp_path / "flux.safetensors"
    done = run_cli(split_args(files, "--clip-type", "flux", "--data", data, "--out", out, *TRAIN), tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    check_trained(out, files, "flux")
    assert load_aggregator(out).training["guidance"] == 3.5


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint", "a", "--checkpoint", "b", "--diffusion-model", "c", "d"], "either --checkpoint .* or --diffusion-model"),
    (["--checkpoint", "a", "--checkpoint", "b", "--vae", "v"], "--clip, --clip-type and --vae go with --diffusion-model"),
    (["--checkpoint", "a", "--checkpoint", "b", "--clip-type", "flux"], "go with --diffusion-model"),
    (["--diffusion-model", "c", "d", "--vae", "v"], "need --clip:"),
    (["--diffusion-model", "c", "d"], "need --clip and --vae"),
    (["--clip", "t", "--vae", "v"], "give the models: 2-6 --checkpoint files, or --diffusion-model"),
])
def test_bad_flag_combinations_fail_before_comfyui_boots(flags, message, tmp_path, caplog, monkeypatch):
    from afa_nodes import comfy_env
    monkeypatch.setattr(comfy_env, "boot_comfyui", lambda *a, **k: pytest.fail("ComfyUI booted"))
    with caplog.at_level(logging.ERROR, logger="afa"):
        assert cli_train.main(flags + ["--data", str(tmp_path), "--out", str(tmp_path / "o.safetensors")]) == \
            cli_train.EXIT_ERROR
    assert any(re.search(message, r.getMessage()) for r in caplog.records), caplog.text


def test_clip_type_choices_are_comfyuis_loader_types_for_the_cli_and_the_studio(comfy):
    import comfy.sd as comfy_sd
    known = {t.name.lower() for t in comfy_sd.CLIPType} | {"sdxl", "auto"}  # DualCLIPLoader's sdxl: its default
    assert set(CLIP_TYPES) <= known and CLIP_TYPES[0] == "auto"
    from afa_nodes.studio import catalog
    assert cli_train.CLIP_TYPES is CLIP_TYPES and catalog.CLIP_TYPES == list(CLIP_TYPES)  # one list, both front ends


@pytest.mark.comfyui
def test_files_of_the_wrong_kind_or_size_are_typed_errors(sd3_files, sd15_checkpoints, tmp_path):
    from afa_nodes.service.split_files import experts_from_split_files
    models, clips, vae = sd3_files["diffusion_models"], sd3_files["text_encoders"], sd3_files["vae"][0]
    sd15 = sd15_checkpoints[0].resolve()
    with pytest.raises(AFAError, match=r"afa_demo_taesd16.safetensors' is not a diffusion model ComfyUI can detect"):
        experts_from_split_files([models[0], vae], clips, vae)
    with pytest.raises(IncompatibleModelsError, match=r"is an LDM UNet .* but 'afa_demo_sd3_tiny_1.safetensors' is an MMDiT"):
        experts_from_split_files([models[0], sd15], clips, vae)
    with pytest.raises(AFAError, match=r"afa_demo_clip_l.safetensors \(type flux\) give 768-wide encodings but "
                                       r"'afa_demo_sd3_tiny_1.safetensors' takes 4096"):
        experts_from_split_files(models, clips, vae, clip_type="flux")
    with pytest.raises(AFAError, match="text encoder type 'no_such' is not one ComfyUI knows"):
        experts_from_split_files(models, clips, vae, clip_type="no_such")
    with pytest.raises(AFAError, match=r"makes 4-channel latents but 'afa_demo_sd3_tiny_1.safetensors' takes 16"):
        experts_from_split_files(models, clips, _sd15_vae(sd15, tmp_path))
    with pytest.raises(AFAError, match="diffusion_models file 'no_such.safetensors' not found"):
        experts_from_split_files([models[0], "no_such.safetensors"], clips, vae)
    with pytest.raises(AFAError, match="training an aggregator"):
        experts_from_split_files(models[:1], clips, vae)
    experts, clip, loaded_vae = experts_from_split_files(models, clips, vae)  # and the good files load
    assert experts.names == [p.name for p in models] and loaded_vae.latent_channels == 16


def _sd15_vae(checkpoint: Path, folder: Path) -> Path:
    """The SD1.5 demo checkpoint's VAE (4-channel TAESD) as a VAE file."""
    from safetensors.torch import load_file, save_file
    path, prefix = folder / "afa_test_sd15_vae.safetensors", "first_stage_model."
    save_file({k[len(prefix):]: v for k, v in load_file(str(checkpoint)).items() if k.startswith(prefix)}, str(path))
    return path
