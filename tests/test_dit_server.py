"""SD3 and FLUX ensembles on a real ComfyUI server, from files the stock loaders read.

Tiny SD3 diffusion models (detected as SD3 by ComfyUI from their weights) go into
models/diffusion_models, a CLIP-L into models/text_encoders, a 16-channel TAESD into models/vae
(afa_nodes.comfy_dit_models.ensure_sd3_demo_files; built once into the test cache). Two copies
of one model through AFA Ensemble (Load Diffusion Model x2 -> AFA Ensemble -> stock KSampler)
equal that model in every mode (latents saved with SaveLatent, compared as tensors); bad input
(SD3 + SD1.5, an aggregator made for FLUX, one made for another SD3 size) is an error naming the
problem, after which the server still runs prompts. FLUX (slow: the smallest files ComfyUI
detects as FLUX are ~1 GB each): copies equal the model. The example workflows in
workflows/dit/ run in tests/test_workflows_server.py with every other workflow.
"""
from __future__ import annotations

import pytest
import torch
from comfy_server import ComfyServer, ComfyServerError
from dit_files import skip_unless_comfyui_reads_flux_text_width
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui

WIDTH, HEIGHT = 96, 64
TIMEOUT = 600


@pytest.fixture(scope="module")
def files(comfy, sd15_checkpoints):
    from conftest import checkpoint_cache_dir

    from afa_nodes.comfy_dit_models import ensure_sd3_demo_files
    return ensure_sd3_demo_files(checkpoint_cache_dir() / "dit", sd15_checkpoints[0].resolve())


@pytest.fixture(scope="module")
def server(comfyui_path, files, sd15_checkpoints, tmp_path_factory):
    models = tmp_path_factory.mktemp("dit_models")
    for kind, paths in {**files, "checkpoints": [sd15_checkpoints[0].resolve()]}.items():
        (models / kind).mkdir(exist_ok=True)
        for p in paths:
            (models / kind / p.name).symlink_to(p)
    (models / "afa").mkdir(exist_ok=True)
    with ComfyServer(comfyui_path, models_dir=models) as srv:
        yield srv, models


@pytest.fixture(scope="module")
def layouts(comfy, files):
    """The SD3 demo models' layout, and layouts to make wrong aggregators from."""
    import comfy.sd as comfy_sd

    from afa_nodes import comfy_dit_models as dm
    from afa_nodes.core.layout import derive_layout
    sd3 = comfy_sd.load_diffusion_model(str(files["diffusion_models"][0]))
    return {"sd3": derive_layout(sd3.model.diffusion_model),
            "flux": derive_layout(dm.flux_patcher(1).model.diffusion_model),
            "sd3_deeper": derive_layout(dm.sd3_patcher(1, depth=3).model.diffusion_model)}


def save_aggregator(layout, path, random=True):
    from afa_nodes.core.aggregator_file import save_aggregator as save
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    agg = Aggregator(layout.point_channels, SABWConfig(2, hidden=32, heads=4, depth=1, context_dim=layout.context_dim,
                                                       time_embed_dim=layout.time_embed_dim))
    if random:
        torch.manual_seed(4)
        for block in agg.blocks:
            torch.nn.init.normal_(block.conv_out.weight, std=2.0)
    save(path, agg, layout, [])
    return path.name


SD3_1, SD3_2, FLUX_1, FLUX_2 = ("afa_demo_sd3_tiny_1.safetensors", "afa_demo_sd3_tiny_2.safetensors",
                                "afa_demo_flux_min_1.safetensors", "afa_demo_flux_min_2.safetensors")


def prompt(models, mode="block-wise average", seed=5, prefix="afa_dit", aggregator=None, weights="", index=1,
           first=SD3_1, second=None):
    """Load Diffusion Model x2 -> AFA Ensemble -> KSampler -> SaveLatent; `models` False: model 1 alone.
    `second` (default: `first` again) may name a checkpoint (CheckpointLoaderSimple)."""
    flux = first.startswith("afa_demo_flux")
    second = second or first
    p = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": first, "weight_dtype": "default"}},
         "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": "afa_demo_clip_l.safetensors",
                                                      "type": "stable_diffusion" if flux else "sd3"}},
         "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "a fox in the snow"}},
         "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": ""}},
         "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
         "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                    "latent_image": ["6", 0], "seed": seed, "steps": 3,
                                                    "cfg": 1.0 if flux else 4.0, "sampler_name": "euler",
                                                    "scheduler": "simple" if flux else "sgm_uniform", "denoise": 1.0}},
         "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": prefix}}}
    if flux:
        p["11"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 3.5}}
        p["8"]["inputs"]["positive"] = ["11", 0]
    if models:
        p["2"] = ({"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": second}} if second.startswith("afa_demo_sd15")
                  else {"class_type": "UNETLoader", "inputs": {"unet_name": second, "weight_dtype": "default"}})
        p["7"] = {"class_type": "AFAEnsemble", "inputs": {"model_1": ["1", 0], "model_2": ["2", 0], "mode": mode,
                                                          "weights": weights, "model_index": index, "map_refresh": 1}}
        if aggregator:
            p["10"] = {"class_type": "AFALoadAggregator", "inputs": {"aggregator": aggregator}}
            p["7"]["inputs"]["aggregator"] = ["10", 0]
        p["8"]["inputs"]["model"] = ["7", 0]
    return p


def fit(p, object_info):
    """The growing-input style this server declares (model_1 or models.model_1)."""
    grown = "models" in object_info["AFAEnsemble"]["input"].get("required", {})
    for node in p.values():
        if node["class_type"] == "AFAEnsemble" and grown:
            node["inputs"] = {(f"models.{k}" if k[len("model_"):].isdigit() else k): v for k, v in node["inputs"].items()}
    return p


def latent_of(srv, entry) -> torch.Tensor:
    (out,) = [o for o in entry["outputs"].values() if "latents" in o]
    (item,) = out["latents"]
    return load_file(str(srv.output_dir / item.get("subfolder", "") / item["filename"]))["latent_tensor"]


def test_copies_equal_the_model_in_every_mode(server, layouts):
    srv, models = server
    object_info = srv.object_info()
    agg = save_aggregator(layouts["sd3"], models / "afa" / "afa_test_sd3_random.safetensors")
    expected = latent_of(srv, srv.run(fit(prompt(False, prefix="afa_dit_single"), object_info), timeout=TIMEOUT))
    assert expected.shape == (1, 16, HEIGHT // 8, WIDTH // 8)
    for i, mode in enumerate(("block-wise average", "noise average", "fixed weights", "single model", "aggregator")):
        p = prompt(True, mode, prefix=f"afa_dit_copies_{i}", aggregator=agg if mode == "aggregator" else None,
                   weights="0.3, 0.7", index=2)
        got = latent_of(srv, srv.run(fit(p, object_info), timeout=TIMEOUT))
        assert (got - expected).abs().max() <= 1e-5, mode
    different = prompt(True, second=SD3_2, prefix="afa_dit_two")
    assert (latent_of(srv, srv.run(fit(different, object_info), timeout=TIMEOUT)) - expected).abs().max() > 1e-3


def test_bad_inputs_are_errors_and_the_server_keeps_serving(server, layouts, sd15_checkpoints):
    srv, models = server
    object_info = srv.object_info()
    flux_agg = save_aggregator(layouts["flux"], models / "afa" / "afa_test_flux.safetensors")
    deeper_agg = save_aggregator(layouts["sd3_deeper"], models / "afa" / "afa_test_sd3_deeper.safetensors")
    cases = [(prompt(True, second=sd15_checkpoints[0].name), r"AFAEnsemble.*'model 2' is an LDM UNet .* but 'model 1' is an MMDiT"),
             (prompt(True, "aggregator", aggregator=flux_agg), r"afa_test_flux.safetensors was trained for flux models, this ensemble is of mmdit"),
             (prompt(True, "aggregator", aggregator=deeper_agg), r"afa_test_sd3_deeper.safetensors was trained on another architecture")]
    for seed, (bad, message) in enumerate(cases, start=100):
        with pytest.raises(ComfyServerError, match=message):
            srv.run(fit(bad, object_info), timeout=TIMEOUT)
        assert srv.running
        good = latent_of(srv, srv.run(fit(prompt(True, seed=seed, prefix=f"afa_dit_after_{seed}"), object_info),
                                      timeout=TIMEOUT))
        assert torch.isfinite(good).all()


@pytest.fixture(scope="module")
def flux_server(server, comfy, sd15_checkpoints):
    """The server with the FLUX demo files too (built once into the test cache: ~2 GB)."""
    from conftest import checkpoint_cache_dir

    from afa_nodes.comfy_dit_models import ensure_flux_demo_files
    srv, models = server
    files = ensure_flux_demo_files(checkpoint_cache_dir() / "dit", sd15_checkpoints[0].resolve())
    skip_unless_comfyui_reads_flux_text_width(files)
    for p in files["diffusion_models"]:
        link = models / "diffusion_models" / p.name
        if not link.exists():
            link.symlink_to(p)
    return srv, models, files


@pytest.mark.slow
def test_flux_copies_equal_the_model(flux_server):
    import comfy.sd as comfy_sd

    from afa_nodes.core.layout import derive_layout
    srv, models, files = flux_server
    object_info = srv.object_info()
    layout = derive_layout(comfy_sd.load_diffusion_model(str(files["diffusion_models"][0])).model.diffusion_model)
    agg = save_aggregator(layout, models / "afa" / "afa_test_flux_min.safetensors")
    expected = latent_of(srv, srv.run(fit(prompt(False, first=FLUX_1, prefix="afa_flux_single"), object_info), timeout=TIMEOUT))
    for i, mode in enumerate(("block-wise average", "aggregator")):
        p = prompt(True, mode, first=FLUX_1, prefix=f"afa_flux_copies_{i}", aggregator=agg if mode == "aggregator" else None)
        assert (latent_of(srv, srv.run(fit(p, object_info), timeout=TIMEOUT)) - expected).abs().max() <= 1e-5, mode
    two = latent_of(srv, srv.run(fit(prompt(True, first=FLUX_1, second=FLUX_2, prefix="afa_flux_two"), object_info),
                                 timeout=TIMEOUT))
    assert (two - expected).abs().max() > 1e-3
