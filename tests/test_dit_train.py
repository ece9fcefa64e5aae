"""Aggregator training on DiT experts (SD3/MMDiT and FLUX) through service.training.train.

The objective is the experts' own flow matching (ComfyUI's CONST model sampling): x_t =
(1 - sigma) x0 + sigma noise, target the velocity noise - x0, sigma from the model's shifted
sigmas table. Tested: the walk of one bound training expert is ComfyUI's own apply_model
(denoised = x_t - sigma * prediction), the target makes ComfyUI's denoised exactly x0; a short
run on two different tiny experts lowers the held-out loss below the block-wise average's; the
file records family and objective, loads into an ensemble of the same family and is refused
by the other family; a resumed run equals an uninterrupted one.

SD3: the demo files (two tiny SD3 diffusion models, CLIP-L through ComfyUI's SD3 text encoder,
a 16-channel TAESD). FLUX: tiny FLUX.1 [dev]-style models from ComfyUI's classes (FLUX
detection fixes the width at 3072), fed by a stand-in text encoder of their widths.
"""
from __future__ import annotations

import pytest
import torch
from toy_dataset import make_dataset

from afa_nodes.core.aggregator_file import load_aggregator
from afa_nodes.core.errors import AFAError
from afa_nodes.core.files import file_sha256

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]
CONFIG = dict(batch_size=2, resolution=64, val_fraction=0.34, gradient_checkpointing=False, hidden=32, heads=4,
              depth=1, caption_dropout=0.1, save_every=0)


class FakeFluxClip:
    """A text encoder of the tiny FLUX's widths (T5-like cond [1, 77, 48], CLIP-like pooled [1, 32]),
    a fixed function of the caption."""
    layer_idx = None

    def __init__(self, width=48, pooled=32):
        self.width, self.pooled, self.others = width, pooled, []
        self.cond_stage_model = torch.nn.Linear(2, 2)  # fingerprinted for the text cache key
        self.patcher = type("Patcher", (), {"patches": {}})()

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        g = torch.Generator().manual_seed(sum(map(ord, tokens)) + 7)
        return {"cond": torch.randn(1, 77, self.width, generator=g), "pooled_output": torch.randn(1, self.pooled, generator=g)}


@pytest.fixture(scope="module")
def files(comfy, sd15_checkpoints):
    from conftest import checkpoint_cache_dir

    from afa_nodes.comfy_dit_models import ensure_sd3_demo_files
    return ensure_sd3_demo_files(checkpoint_cache_dir() / "dit", sd15_checkpoints[0].resolve())


@pytest.fixture(scope="module")
def sd3(files):
    """The two demo SD3 experts as an ExpertSet, their CLIP (type sd3) and the 16-channel VAE."""
    import comfy.sd as comfy_sd
    import comfy.utils

    from afa_nodes.service.models import ExpertSet
    paths = files["diffusion_models"]
    experts = ExpertSet([comfy_sd.load_diffusion_model(str(p)) for p in paths], [p.name for p in paths],
                        [file_sha256(p) for p in paths], [str(p) for p in paths])
    clip = comfy_sd.load_clip([str(files["text_encoders"][0])], clip_type=comfy_sd.CLIPType.SD3)
    vae = comfy_sd.VAE(sd=comfy.utils.load_torch_file(str(files["vae"][0])))
    return dict(experts=experts, clip=clip, vae=vae)


@pytest.fixture(scope="module")
def flux(sd3):
    from afa_nodes.comfy_dit_models import flux_patcher
    from afa_nodes.service.models import ExpertSet
    experts = ExpertSet([flux_patcher(1), flux_patcher(2)], ["tiny flux 1", "tiny flux 2"], [None, None], [None, None])
    return dict(experts=experts, clip=FakeFluxClip(), vae=sd3["vae"])


@pytest.fixture(scope="module")
def dataset(comfy):
    return make_dataset(comfy.input_dir / "afa_dit_train_ds", n=6, size=64)


def train(env, dataset, out, **kw):
    from afa_nodes.core.train import TrainConfig
    from afa_nodes.service import training
    config = TrainConfig(dataset=dataset, out=out, **{**CONFIG, **kw})
    with torch.inference_mode():  # as ComfyUI runs nodes
        return training.train(env["experts"], env["clip"], env["vae"], config)


def losses(result):
    rows = {r["name"]: r["loss"] for r in result.validation["rows"]}
    return rows["AFA aggregator (trained)"], rows["block-wise average (untrained)"]


@pytest.fixture(scope="module")
def sd3_run(sd3, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3_train") / "sd3.safetensors"
    return train(sd3, dataset, out, steps=30, lr=3e-3, seed=1), out


@pytest.fixture(scope="module")
def flux_run(flux, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("flux_train") / "flux.safetensors"
    return train(flux, dataset, out, steps=30, lr=3e-3, seed=1), out


@pytest.mark.parametrize("family", ["sd3", "flux", "chroma"])
def test_one_bound_expert_walks_as_comfyuis_apply_model_and_the_target_gives_x0(family, sd3, flux):
    """The training walk of one expert (velocity prediction) is ComfyUI's model: its denoised
    x_t - sigma * v equals apply_model's; the target noise - x0 makes ComfyUI's denoised x0."""
    from afa_nodes import comfy_dit_models as dm
    from afa_nodes.core.ensemble import EnsembleExecutor, uniform_mixer
    from afa_nodes.core.train import predict
    from afa_nodes.service.models import ExpertSet
    from afa_nodes.training_dit import GUIDANCE
    from afa_nodes.training_host import experts_layout, load_experts, noise_schedule
    patcher = {"sd3": dm.sd3_patcher, "flux": dm.flux_patcher, "chroma": dm.chroma_patcher}[family](3)
    one = ExpertSet([patcher], ["m"], [None], [None])
    layout = experts_layout(one)
    schedule = noise_schedule(one)
    assert schedule.prediction == "flow" and schedule.objective == "flow-matching velocity MSE"
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    context = torch.randn(2, 77, layout.context_dim, generator=g)
    y = torch.randn(2, layout.adm_dim, generator=g) if family == "sd3" else \
        torch.randn(2, layout.vec_dim, generator=g) if family == "flux" else None
    t = torch.tensor([100, len(schedule) - 200])
    sigma = schedule.sigmas[t]
    x_t = schedule.noised(x0, noise, sigma)
    sampling = patcher.model.model_sampling
    assert torch.allclose(x_t, sampling.noise_scaling(sigma, noise, x0), atol=1e-6)
    with torch.inference_mode(False), torch.no_grad():
        [expert] = load_experts(one, layout)
        v = predict(EnsembleExecutor(layout, uniform_mixer(len(layout.points), 1)), [expert],
                    schedule.model_input(sigma, x_t), schedule.model_timestep(t, sigma), [context], [y])
        extra = {"guidance": torch.full((2,), GUIDANCE if family == "flux" else 0.0)} if family != "sd3" else {}
        denoised = patcher.model.apply_model(x_t, sigma, c_crossattn=context, y=y, **extra)
    assert torch.allclose(x_t - sigma.view(-1, 1, 1, 1) * v, denoised, atol=1e-5)
    target = schedule.target(x0, noise)
    assert torch.allclose(sampling.calculate_denoised(sigma, target, x_t), x0, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_short_run_lowers_held_out_loss_below_the_block_wise_average(family, sd3_run, flux_run):
    result, out = sd3_run if family == "sd3" else flux_run
    trained, average = losses(result)
    assert result.step == 30 and trained < average, result.report
    meta = load_aggregator(out).training
    assert meta["objective"] == "flow-matching velocity MSE" and meta["target"] == "noise - x0"
    assert meta["validation"]["metric"].startswith("flow-matching velocity MSE")
    assert meta["data"]["label_input"] == "pooled text vector"
    if family == "sd3":
        assert meta["model_sampling"] == "ModelSamplingDiscreteFlow + CONST" and meta["shift"] == 3.0
        assert "guidance" not in meta and meta["schedule_steps"] == 1000
    else:
        assert meta["model_sampling"] == "ModelSamplingFlux + CONST" and meta["guidance"] == 3.5
        assert meta["shift"] == pytest.approx(1.15) and meta["schedule_steps"] == 10000


def test_files_load_into_their_family_and_are_refused_by_the_other(sd3, flux, sd3_run, flux_run):
    from afa_nodes.core.spec import EnsembleSpec, Mode
    from afa_nodes.ensemble_model import build_ensemble, get_ensemble
    spec = EnsembleSpec(mode=Mode.AGGREGATOR)
    sd3_file, flux_file = load_aggregator(sd3_run[1]), load_aggregator(flux_run[1])
    assert sd3_file.layout["family"] == "mmdit" and flux_file.layout["family"] == "flux"
    for env, agg in ((sd3, sd3_file), (flux, flux_file)):
        e = env["experts"]
        model = build_ensemble(e.patchers, e.names, spec, agg, e.hashes)
        assert get_ensemble(model).aggregator is not None
    for env, agg, theirs in ((sd3, flux_file, "flux"), (flux, sd3_file, "mmdit")):
        e = env["experts"]
        with pytest.raises(AFAError, match=f"trained for {theirs} models"):
            build_ensemble(e.patchers, e.names, spec, agg, e.hashes)


def test_resumed_sd3_run_equals_an_uninterrupted_one(sd3, dataset, tmp_path):
    from afa_nodes.core.train import state_path
    straight = train(sd3, dataset, tmp_path / "straight.safetensors", steps=4, lr=3e-3, seed=2)
    first = train(sd3, dataset, tmp_path / "resumed.safetensors", steps=2, lr=3e-3, seed=2)
    assert first.step == 2 and state_path(tmp_path / "resumed.safetensors").is_file()
    resumed = train(sd3, dataset, tmp_path / "resumed.safetensors", steps=4, lr=3e-3, seed=2, resume=True)
    assert resumed.step == 4 and [h[0] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(straight.aggregator.state_dict().values(), resumed.aggregator.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert [h[1] for h in resumed.history] == pytest.approx([h[1] for h in straight.history], rel=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_gradient_checkpointing_gives_the_same_gradients_on_dit_blocks(family, sd3, flux, dataset, tmp_path):
    """DiT blocks are checkpointed by the training experts (FLUX's blocks add to their inputs in
    place: torch's non-reentrant checkpoint would recompute them wrongly): same losses and aggregator."""
    env = sd3 if family == "sd3" else flux
    plain = train(env, dataset, tmp_path / "plain.safetensors", steps=2, lr=3e-3, seed=3)
    ckpt = train(env, dataset, tmp_path / "ckpt.safetensors", steps=2, lr=3e-3, seed=3, gradient_checkpointing=True)
    assert ckpt.metadata["config"]["gradient_checkpointing"] is True
    for a, b in zip(plain.aggregator.state_dict().values(), ckpt.aggregator.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert [h[1] for h in ckpt.history] == pytest.approx([h[1] for h in plain.history], rel=1e-5)
    moved = [v for k, v in plain.aggregator.state_dict().items() if k.endswith("conv_out.weight")]
    assert moved and all(v.abs().sum() > 0 for v in moved)  # zero-initialised, trained by the gradients


def test_train_node_trains_an_sd3_ensemble_model(sd3, dataset, comfy_nodes):
    """AFA Train Aggregator (the V3 node, under inference_mode as ComfyUI runs it) on an AFA MODEL
    of two SD3 experts: the same service path; the file is an mmdit flow-matching aggregator."""
    from afa_nodes.ensemble_model import build_ensemble
    from afa_nodes.service.training import aggregator_save_path
    e = sd3["experts"]
    model = build_ensemble(e.patchers, e.names, hashes=e.hashes, sources=e.sources)
    args = dict(steps=2, batch_size=2, learning_rate=1e-3, resolution=64, seed=0, save_every=0, resume=False,
                gradient_checkpointing=True, caption_dropout=0.0, validation_fraction=0.34)
    with torch.inference_mode():
        out = comfy_nodes["AFATrainAggregator"].execute(model=model, clip=sd3["clip"], vae=sd3["vae"],
                                                        dataset_folder=dataset.name, save_name="afa_dit_node", **args)
    agg = load_aggregator(aggregator_save_path("afa_dit_node"))
    assert agg.layout["family"] == "mmdit" and agg.training["step"] == 2
    assert agg.training["objective"] == "flow-matching velocity MSE" and agg.training["config"]["gradient_checkpointing"]
    assert [x["sha256"] for x in agg.experts] == e.hashes
    assert "flow-matching velocity MSE" in out.result[2]


def test_chroma_experts_train_with_guidance_0(sd3, dataset, tmp_path):
    """Chroma (FLUX blocks, modulation from its approximator, no pooled vector): the same path,
    guidance 0 as ComfyUI feeds it; held-out loss below the block-wise average's."""
    from afa_nodes.comfy_dit_models import chroma_patcher
    from afa_nodes.service.models import ExpertSet
    env = dict(experts=ExpertSet([chroma_patcher(1), chroma_patcher(2)], ["chroma 1", "chroma 2"], [None, None],
                                 [None, None]), clip=FakeFluxClip(), vae=sd3["vae"])
    result = train(env, dataset, tmp_path / "chroma.safetensors", steps=30, lr=3e-3, seed=1)
    trained, average = losses(result)
    assert trained < average, result.report
    agg = load_aggregator(tmp_path / "chroma.safetensors")
    assert agg.layout["family"] == "chroma" and agg.training["guidance"] == 0.0
    assert agg.training["objective"] == "flow-matching velocity MSE" and "label_input" not in agg.training["data"]
