"""Synthetic checkpoints load in real ComfyUI as the intended model types and sample."""
import logging
import os

import pytest
import torch

pytestmark = pytest.mark.comfyui


def _tensor(path, key):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def _load_logged(path, caplog, **kw):
    import comfy.sd

    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        out = comfy.sd.load_checkpoint_guess_config(str(path), **kw)
    problems = [r.getMessage() for r in caplog.records
                if ("missing" in r.getMessage().lower() and r.levelno >= logging.WARNING)
                or "left over keys" in r.getMessage().lower()
                or "leftover vae keys" in r.getMessage().lower()
                or "unet unexpected" in r.getMessage().lower()]
    return out, problems


def test_sd15_loads_as_sd15_with_clip_and_vae(comfy, sd15_checkpoints, caplog):
    from afa_nodes.demo_checkpoints import is_synthetic_checkpoint

    path = sd15_checkpoints[0]
    assert is_synthetic_checkpoint(path)
    (model, clip, vae, _), problems = _load_logged(path, caplog)
    assert problems == []
    assert type(model.model.model_config).__name__ == "SD15"
    unet = model.model.diffusion_model
    assert unet.model_channels == 320
    assert len(unet.input_blocks) >= 2 and len(unet.output_blocks) >= 2
    assert unet.middle_block is not None
    assert clip is not None
    assert vae is not None and vae.first_stage_model is not None


def test_sdxl_family_loads_with_label_emb(comfy, sdxl_checkpoints, caplog):
    import comfy.supported_models as sm

    (model, clip, vae, _), problems = _load_logged(sdxl_checkpoints[0], caplog,
                                                   output_vae=False, output_clip=False)
    assert problems == []
    assert isinstance(model.model.model_config, sm.SDXL)  # SDXL family (Segmind_Vega)
    unet = model.model.diffusion_model
    assert hasattr(unet, "label_emb")
    assert unet.label_emb[0][0].in_features == 2816
    assert len(unet.input_blocks) == 9 and len(unet.output_blocks) == 9
    assert unet.middle_block is not None
    assert model.model.adm_channels == 2816


def test_seeds_give_different_weights_and_builds_are_deterministic(comfy, sd15_checkpoints, tmp_path):
    from afa_nodes.demo_checkpoints import build_sd15_checkpoint

    a, b = sd15_checkpoints[0], sd15_checkpoints[1]
    for key in ("model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
                "model.diffusion_model.out.2.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"):
        assert not torch.equal(_tensor(a, key), _tensor(b, key)), key
    vae_key = "first_stage_model.taesd_decoder.1.weight"  # VAE shared (vae_seed), like fine-tunes
    assert torch.equal(_tensor(a, vae_key), _tensor(b, vae_key))
    # Same seed, same tensors (file bytes may differ: safetensors orders metadata freely).
    from safetensors import safe_open

    again = build_sd15_checkpoint(tmp_path / "again.safetensors", seed=0)
    with safe_open(str(again), framework="pt") as f1, safe_open(str(a), framework="pt") as f2:
        assert f1.metadata() == f2.metadata()
        assert set(f1.keys()) == set(f2.keys())
        for key in f1.keys():
            assert torch.equal(f1.get_tensor(key), f2.get_tensor(key)), key


def test_ensure_is_idempotent_and_atomic(comfy, sd15_checkpoints):
    from afa_nodes.demo_checkpoints import ensure_demo_checkpoints

    real = [os.path.realpath(p) for p in sd15_checkpoints]
    before = [os.stat(p).st_mtime_ns for p in real]
    folder = os.path.dirname(real[0])
    again = ensure_demo_checkpoints(folder, "sd15", len(real))
    assert [os.path.realpath(p) for p in again] == real
    assert [os.stat(p).st_mtime_ns for p in real] == before
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]
    for i, p in enumerate(real):
        assert os.path.basename(p) == f"afa_demo_sd15_synthetic_{i}.safetensors"


def _txt2img(ckpt, prompt="a lighthouse", size=64, steps=2):
    import comfy.sd
    import nodes

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt))[:3]
    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(clip, prompt)[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(size, size, 1)[0]
        samples = nodes.common_ksampler(model, 0, steps, 5.0, "euler", "normal", pos, neg, latent)[0]
        image = nodes.VAEDecode().decode(vae, samples)[0]
    return samples["samples"], image


def test_sd15_txt2img_gives_finite_nonconstant_image(comfy, sd15_checkpoints):
    lat0, img0 = _txt2img(sd15_checkpoints[0])
    assert img0.shape == (1, 64, 64, 3)
    assert torch.isfinite(lat0).all() and torch.isfinite(img0).all()
    assert img0.float().std() > 0.01
    lat1, _ = _txt2img(sd15_checkpoints[1])
    assert not torch.allclose(lat0, lat1)  # different experts, different outputs


def test_sdxl_family_samples_with_direct_conditioning(comfy, sdxl_checkpoints):
    import comfy.sd
    import nodes

    model = comfy.sd.load_checkpoint_guess_config(str(sdxl_checkpoints[0]), output_vae=False,
                                                  output_clip=False)[0]
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    neg = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    with torch.inference_mode():
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        out = nodes.common_ksampler(model, 0, 2, 5.0, "euler", "normal", cond, neg, latent)[0]["samples"]
    assert out.shape == (1, 4, 8, 8)
    assert torch.isfinite(out).all() and out.std() > 0


def test_sdxl_with_taesd_vae_decodes(comfy, tmp_path):
    import comfy.sd

    from afa_nodes.demo_checkpoints import build_sdxl_checkpoint

    p = build_sdxl_checkpoint(tmp_path / "xl_vae.safetensors", seed=5, vae="taesd")
    vae = comfy.sd.load_checkpoint_guess_config(str(p), output_clip=False)[2]
    with torch.inference_mode():
        img = vae.decode(torch.randn(1, 4, 8, 8))
    assert img.shape[-3:] == (64, 64, 3) and torch.isfinite(img).all()


@pytest.mark.slow
def test_sd15_with_full_sd_vae(comfy, tmp_path, caplog):
    from afa_nodes.demo_checkpoints import build_sd15_checkpoint

    p = build_sd15_checkpoint(tmp_path / "full_vae.safetensors", seed=3, vae="full")
    (model, clip, vae, _), problems = _load_logged(p, caplog)
    assert problems == []
    assert type(vae.first_stage_model).__name__ == "AutoencoderKL"
    with torch.inference_mode():
        img = vae.decode(torch.randn(1, 4, 8, 8))
    assert img.shape[-3:] == (64, 64, 3) and torch.isfinite(img).all() and img.std() > 0.01


def test_bad_arguments_raise_afa_errors(comfy, tmp_path):
    from afa_nodes.core.errors import AFAError
    from afa_nodes.demo_checkpoints import build_sd15_checkpoint, ensure_demo_checkpoints

    with pytest.raises(AFAError, match="Unknown demo checkpoint kind"):
        ensure_demo_checkpoints(tmp_path, "sd3")
    with pytest.raises(AFAError, match="vae kind"):
        build_sd15_checkpoint(tmp_path / "x.safetensors", seed=0, vae="huge")
    with pytest.raises(AFAError, match="dtype"):
        build_sd15_checkpoint(tmp_path / "x.safetensors", seed=0, dtype=torch.int8)
    assert not list(tmp_path.iterdir())
