"""Aggregator training on Qwen-Image experts through service.training.train (as test_dit_train
does for SD3 and FLUX).

Qwen-Image is a flow model in ComfyUI (model_base.QwenImage: ModelType.FLUX -> CONST +
ModelSamplingFlux, shift 1.15 from supported_models.QwenImage): x_t = (1 - sigma) x0 + sigma
noise, target noise - x0, sigma from the model's shifted sigmas table. Its latents have a frame
axis (Wan 2.1 format); training keeps images as (B, 16, h, w) latents and runs them as one frame
(training_host.latent_io, comfy_qwen). Tiny experts from ComfyUI's class, a stand-in text
encoder of their 48-wide context (no pooled vector), the 16-channel TAESD of the SD3 demo files.
"""
from __future__ import annotations

import pytest
import torch
from test_dit_train import CONFIG, FakeFluxClip, dataset, files, losses, train  # noqa: F401  (shared fixtures)

from afa_nodes.core.aggregator_file import load_aggregator
from afa_nodes.core.errors import AFAError

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def qwen(files):
    import comfy.sd as comfy_sd
    import comfy.utils

    from afa_nodes.comfy_dit_models import qwen_patcher
    from afa_nodes.service.models import ExpertSet
    experts = ExpertSet([qwen_patcher(1), qwen_patcher(2)], ["tiny qwen 1", "tiny qwen 2"], [None, None], [None, None])
    vae = comfy_sd.VAE(sd=comfy.utils.load_torch_file(str(files["vae"][0])))
    return dict(experts=experts, clip=FakeFluxClip(pooled=0), vae=vae)


@pytest.fixture(scope="module")
def qwen_run(qwen, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen_train") / "qwen.safetensors"
    return train(qwen, dataset, out, steps=30, lr=3e-3, seed=1), out


def test_one_bound_expert_walks_as_comfyuis_apply_model_and_the_target_gives_x0(qwen):
    """The training walk of one expert on a (B, 16, h, w) latent is ComfyUI's apply_model on the
    one-frame latent: denoised x_t - sigma * v equals apply_model's; the target noise - x0 makes
    ComfyUI's denoised x0."""
    from afa_nodes.comfy_dit_models import qwen_patcher
    from afa_nodes.core.ensemble import EnsembleExecutor, uniform_mixer
    from afa_nodes.core.train import predict
    from afa_nodes.service.models import ExpertSet
    from afa_nodes.training_host import experts_layout, load_experts, noise_schedule
    patcher = qwen_patcher(3)
    one = ExpertSet([patcher], ["m"], [None], [None])
    layout, schedule = experts_layout(one), noise_schedule(one)
    assert schedule.prediction == "flow" and len(schedule) == 10000
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    context = torch.randn(2, 77, layout.context_dim, generator=g)
    t = torch.tensor([100, len(schedule) - 200])
    sigma = schedule.sigmas[t]
    x_t = schedule.noised(x0, noise, sigma)
    with torch.inference_mode(False), torch.no_grad():
        [expert] = load_experts(one, layout)
        v = predict(EnsembleExecutor(layout, uniform_mixer(len(layout.points), 1)), [expert],
                    schedule.model_input(sigma, x_t), schedule.model_timestep(t, sigma), [context], [None])
        denoised = patcher.model.apply_model(x_t.unsqueeze(2), sigma, c_crossattn=context)
    assert v.shape == x0.shape
    assert torch.allclose(x_t - sigma.view(-1, 1, 1, 1) * v, denoised.squeeze(2), atol=1e-5)
    sampling = patcher.model.model_sampling
    assert torch.allclose(sampling.calculate_denoised(sigma, schedule.target(x0, noise), x_t), x0, atol=1e-5)


def test_short_run_lowers_held_out_loss_below_the_block_wise_average(qwen_run):
    result, out = qwen_run
    trained, average = losses(result)
    assert result.step == 30 and trained < average, result.report
    meta = load_aggregator(out).training
    assert meta["objective"] == "flow-matching velocity MSE" and meta["target"] == "noise - x0"
    assert meta["model_sampling"] == "ModelSamplingFlux + CONST" and meta["shift"] == pytest.approx(1.15)
    assert "guidance" not in meta and "label_input" not in meta["data"]


def test_the_file_loads_into_qwen_experts_and_is_refused_by_flux(qwen, qwen_run):
    from afa_nodes.comfy_dit_models import flux_patcher
    from afa_nodes.core.spec import EnsembleSpec, Mode
    from afa_nodes.ensemble_model import build_ensemble, get_ensemble
    agg = load_aggregator(qwen_run[1])
    assert agg.layout["family"] == "qwen_image"
    e, spec = qwen["experts"], EnsembleSpec(mode=Mode.AGGREGATOR)
    assert get_ensemble(build_ensemble(e.patchers, e.names, spec, agg, e.hashes)).aggregator is not None
    with pytest.raises(AFAError, match="trained for qwen_image models, this ensemble is of flux"):
        build_ensemble([flux_patcher(1), flux_patcher(2)], ["flux 1", "flux 2"], spec, agg)
