"""Qwen-Image ensembles inside real ComfyUI, on tiny models made from ComfyUI's own class
(afa_nodes/comfy_dit_models.py): the block-by-block walk equals the model's own forward, and the
ensemble invariants hold through ComfyUI's sampling path (common_ksampler, what the KSampler
node runs: the model's own ModelSamplingFlux (shift 1.15, CONST) and Wan 2.1 latent format,
latents of one frame). No server test: ComfyUI's only text encoder of Qwen-Image's 3584-wide
context is Qwen2.5-VL 7B, and detection fixes the model's width at 3072."""
import pytest
import torch
from test_dit_cost import counted_attention, flops  # noqa: F401  (a fixture)
from test_dit_engine import aggregator_file, ensemble  # one helper for every DiT family

pytestmark = pytest.mark.comfyui

MODES = ("block-wise average", "noise average", "fixed weights", "single model", "aggregator")
CONTEXT = 48   # comfy_dit_models.TINY_QWEN joint_attention_dim


@pytest.fixture(scope="module")
def qwen(comfy, one_thread):
    import nodes
    from afa_nodes import comfy_dit_models, ensemble_model
    return dict(nodes=nodes, models=comfy_dit_models, dit=comfy_dit_models, ens=ensemble_model,
                experts=[comfy_dit_models.qwen_patcher(s) for s in (1, 2)])


def conditioning(seed=0, width=1):
    g = torch.Generator().manual_seed(seed)
    pos = [[torch.randn(1, 7, CONTEXT * width, generator=g), {}]]
    neg = [[torch.zeros(1, 7, CONTEXT * width), {}]]
    return pos, neg, 2.5


def sample(q, model, steps=3, seed=3, cond=None, latent=(2, 16, 6, 10)):
    pos, neg, cfg = cond or conditioning()
    with torch.inference_mode():
        return q["nodes"].common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg,
                                          {"samples": torch.zeros(latent)})[0]["samples"]


def walk(module, x, t, c, **extra):
    from afa_nodes.comfy_qwen import ComfyQwenExpert
    from afa_nodes.core.ensemble import EnsembleExecutor, uniform_mixer
    from afa_nodes.core.layout import derive_layout
    layout = derive_layout(module)
    expert = ComfyQwenExpert(module, x, t, c, extra.pop("transformer_options", {}), extra)
    return EnsembleExecutor(layout, uniform_mixer(len(layout.points), 1)).forward([expert], {"contexts": [c]})


def test_walk_over_one_model_equals_its_forward(qwen):
    """The walk over ONE model reproduces ComfyUI's forward bit for bit (fp32): odd sizes padded,
    Qwen-Image-Edit reference latents, a block replace patch and a double_block patch."""
    m = qwen["experts"][0].model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 16, 1, 7, 10, generator=g), torch.tensor([0.9, 0.2]), torch.randn(2, 5, CONTEXT, generator=g)
    refs = [torch.randn(2, 16, 1, 4, 6, generator=g)]
    calls = []

    def replace(args, extra):
        calls.append(1)
        out = extra["original_block"](args)    # not a per-token scale or shift: norm_out would undo those
        return {"img": out["img"] + out["img"].roll(1, -1), "txt": out["txt"]}

    def after(args):
        return {"img": args["img"] + 0.5 * args["img"].roll(1, 1), "txt": args["txt"] * 0.9}
    patched = {"patches_replace": {"dit": {("double_block", 1): replace}}, "patches": {"double_block": [after]}}
    with torch.inference_mode():
        for extra in ({}, {"ref_latents": refs}, {"transformer_options": patched}):
            reference = m(x, t, c, **{**extra, "transformer_options": dict(extra.get("transformer_options", {}))})
            ours = walk(m, x, t, c, **dict(extra))
            assert reference.shape == x.shape and torch.equal(ours, reference), sorted(extra)
    assert calls == [1, 1]
    plain = walk(m, x, t, c)
    assert (plain - reference).abs().max() > 1e-3   # the patches did act


def test_walk_equals_the_forward_of_the_edit_2511_and_layered_variants(qwen):
    """ComfyUI >= 0.4: Qwen-Image-Edit 2511 (reference tokens modulated at timestep 0) and
    Qwen-Image-Layered (an extra time condition, negative reference indices)."""
    import inspect
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    if "default_ref_method" not in inspect.signature(QwenImageTransformer2DModel).parameters:
        pytest.skip("this ComfyUI has no Qwen-Image-Edit 2511 / Layered")
    g = torch.Generator().manual_seed(1)
    x, t, c = torch.randn(2, 16, 1, 6, 8, generator=g), torch.tensor([0.8, 0.3]), torch.randn(2, 5, CONTEXT, generator=g)
    refs = [torch.randn(2, 16, 1, 6, 8, generator=g), torch.randn(2, 16, 1, 4, 4, generator=g)]
    edit = qwen["models"].qwen_patcher(4, default_ref_method="index_timestep_zero").model.diffusion_model
    layered = qwen["models"].qwen_patcher(5, use_additional_t_cond=True,
                                          default_ref_method="negative_index").model.diffusion_model
    with torch.inference_mode():
        for m, extra in ((edit, {"ref_latents": refs}),
                         (layered, {"ref_latents": refs, "additional_t_cond": torch.tensor([1, 0])})):
            reference = m(x, t, c, transformer_options={}, **extra)
            assert torch.equal(walk(m, x, t, c, **extra), reference)
    from afa_nodes.core.layout import derive_layout
    assert derive_layout(layered).additional_t_cond and not derive_layout(edit).additional_t_cond


def test_layout_derived_from_the_module_structure(qwen):
    from afa_nodes.core.layout import derive_layout
    layout = derive_layout(qwen["experts"][0].model.diffusion_model)
    deeper = derive_layout(qwen["models"].qwen_patcher(1, num_layers=3).model.diffusion_model)
    assert layout.family == "qwen_image" and layout.point_names == ["joint 0", "joint 1", "final"]
    assert layout.point_channels == [64, 64, 64] and (layout.context_dim, layout.adm_dim) == (CONTEXT, 0)
    assert deeper.num_blocks == 3 and deeper.signature() != layout.signature()
    assert [layout.weight_group(p) for p in layout.points] == ["input", "middle", "output"]
    model = qwen["experts"][0].model
    kinds = [c.__name__ for c in type(model.model_sampling).__bases__]
    assert kinds == ["ModelSamplingFlux", "CONST"] and model.model_sampling.shift == pytest.approx(1.15)


def test_identical_experts_equal_the_single_model_in_every_mode(qwen, tmp_path):
    base = qwen["experts"][0]
    expected = sample(qwen, base)
    assert expected.shape == (2, 16, 1, 6, 10)
    agg = aggregator_file(qwen, tmp_path, ensemble(qwen, [base, base.clone(), base]), 3, "qwen_copies.safetensors")
    for mode in MODES:
        model = ensemble(qwen, [base, base.clone(), base], mode, agg if mode == "aggregator" else None,
                         weights="0.2, 0.5, 0.3", index=2)
        assert (sample(qwen, model) - expected).abs().max() <= 1e-5, mode
    pos, neg, cfg = conditioning()
    stacked = [[[c.repeat(1, 1, 3), extra] for c, extra in cond] for cond in (pos, neg)]
    model = ensemble(qwen, [base, base.clone(), base], "aggregator", agg)
    assert (sample(qwen, model, cond=(*stacked, cfg)) - expected).abs().max() <= 1e-5


def test_two_different_experts_modes_and_fresh_aggregator(qwen, tmp_path):
    a, b = qwen["experts"]
    single = [sample(qwen, a), sample(qwen, b)]
    outs = {mode: sample(qwen, ensemble(qwen, [a, b], mode, weights="0.3, 0.7", index=2)) for mode in MODES[:4]}
    assert torch.equal(outs["single model"], single[1])
    for mode in ("block-wise average", "noise average", "fixed weights"):
        assert torch.isfinite(outs[mode]).all()
        assert min((outs[mode] - s).abs().max() for s in single) > 1e-3, mode
    assert (outs["block-wise average"] - outs["noise average"]).abs().max() > 1e-3
    fresh = aggregator_file(qwen, tmp_path, ensemble(qwen, [a, b]), 2, "qwen_fresh.safetensors", zero=True)
    assert torch.equal(sample(qwen, ensemble(qwen, [a, b], "aggregator", fresh)), outs["block-wise average"])
    for k in (0, 1):   # one-hot fixed weights reproduce that expert (text tokens stay each expert's own)
        got = sample(qwen, ensemble(qwen, [a, b], "fixed weights", weights="1, 0" if k == 0 else "0, 1"))
        assert (got - single[k]).abs().max() <= 1e-6 * max(1.0, float(single[k].abs().max()))


def test_block_patches_run_on_their_own_expert(qwen):
    """A block patch put on expert 2 before ensembling acts on expert 2's blocks only; one put on
    the AFA MODEL afterwards on every expert's."""
    calls = []

    def patch(tag):
        def replace(args, extra):
            calls.append(tag)
            out = extra["original_block"](args)
            return {"img": out["img"] + out["img"].roll(1, -1), "txt": out["txt"]}
        return replace
    a, b = qwen["experts"]
    patched = b.clone()
    patched.set_model_patch_replace(patch("expert 2"), "dit", "double_block", 0)
    plain = sample(qwen, ensemble(qwen, [a, b]), steps=2)
    model = ensemble(qwen, [a, patched])
    got = sample(qwen, model, steps=2)
    assert calls == ["expert 2"] * 2 and (got - plain).abs().max() > 1e-3   # 2 steps, cond + uncond batched
    calls.clear()
    later = model.clone()
    later.set_model_patch_replace(patch("afa model"), "dit", "double_block", 1)
    sample(qwen, later, steps=2)
    assert sorted(calls) == ["afa model"] * 4 + ["expert 2"] * 2


def test_controlnet_residuals_are_added_once(qwen):
    """ControlNet residuals (control["input"][i]) on 2 copies equal the single model with them."""
    from comfy.patcher_extension import WrappersMP
    base = qwen["experts"][0]
    m = base.model.diffusion_model
    g = torch.Generator().manual_seed(2)
    x, t, c = torch.randn(1, 16, 1, 6, 8, generator=g), torch.tensor([0.7]), torch.randn(1, 5, CONTEXT, generator=g)

    def control():
        return {"input": [torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]}
    wrapper = ensemble(qwen, [base, base.clone()]).wrappers[WrappersMP.DIFFUSION_MODEL]["afa"][0]

    class Executor:
        class_obj = m
    with torch.inference_mode():
        expected = m(x, t, c, control=control(), transformer_options={})
        got = wrapper(Executor, x, t, c, None, None, None, {}, control=control())
        plain = m(x, t, c, transformer_options={})
    assert (got - expected).abs().max() <= 1e-6 and (plain - expected).abs().max() > 1e-3


def test_other_families_raise_typed_errors_naming_both(qwen, tmp_path):
    from afa_nodes.core.errors import AggregatorMismatchError, IncompatibleModelsError
    flux = [qwen["dit"].flux_patcher(s) for s in (1, 2)]
    sd3 = qwen["dit"].sd3_patcher(1)
    with pytest.raises(IncompatibleModelsError, match="'model 2' is a FLUX model .* but 'model 1' is a Qwen-Image model"):
        ensemble(qwen, [qwen["experts"][0], flux[0]])
    with pytest.raises(IncompatibleModelsError, match="'model 2' is a Qwen-Image model but 'model 1' is an MMDiT"):
        ensemble(qwen, [sd3, qwen["experts"][0]])
    flux_agg = aggregator_file(qwen, tmp_path, ensemble(qwen, flux), 2, "flux_two.safetensors")
    with pytest.raises(AggregatorMismatchError, match="trained for flux models, this ensemble is of qwen_image"):
        ensemble(qwen, qwen["experts"], "aggregator", flux_agg)
    deeper = qwen["models"].qwen_patcher(3, num_layers=3)
    with pytest.raises(IncompatibleModelsError, match="'model 2' does not match 'model 1' .*points"):
        ensemble(qwen, [qwen["experts"][0], deeper])


def test_maps_of_a_qwen_ensemble_are_token_grids(qwen, tmp_path):
    """The map recorder sees every transformer block's image-token weights as a (latent / 2) picture."""
    from afa_nodes.service import maps
    a, b = qwen["experts"]
    agg = aggregator_file(qwen, tmp_path, ensemble(qwen, [a, b]), 2, "qwen_maps.safetensors")
    model, recorder = maps.record_maps(ensemble(qwen, [a, b], "aggregator", agg), points="all", steps="all")
    pos, neg, cfg = conditioning()
    with torch.inference_mode():
        out = qwen["nodes"].common_ksampler(model, 3, 3, cfg, "euler", "simple", pos, neg,
                                            {"samples": torch.zeros(1, 16, 12, 16)})[0]
    preview = maps.preview_maps(recorder, out, points="joint 0, joint 1, final", step=-1)
    info = preview.info
    assert info["points"] == ["joint 0", "joint 1", "final"] and info["steps"] == [0, 1, 2]
    assert set(map(tuple, info["sizes"].values())) == {(6, 8)}
    grids = preview.images[0]
    assert grids.shape[0] == 3 and float(grids.std()) > 0


def test_expert_macs_match_the_flop_counter_and_the_real_size_row(qwen, counted_attention):
    """core/dit_cost's Qwen-Image row: the MAC formula equals torch's FLOP counter on ComfyUI's
    own module up to the per-sample modulation it leaves out; real Qwen-Image (60 blocks of
    width 3072, 3584-wide text): 61 points, the aggregator's size and share of one expert at 1024 px."""
    from afa_nodes.core.dit_cost import REAL_MODELS, DiTSize, cost_row, expert_macs
    m = qwen["models"].qwen_patcher(1, attention_head_dim=64, axes_dims_rope=(16, 24, 24)).model.diffusion_model
    x, c = torch.randn(1, 16, 1, 16, 24), torch.randn(1, 20, CONTEXT)
    counted = flops(lambda: m(x, torch.tensor([0.5]), c, transformer_options={}))
    size = DiTSize("qwen_image", 128, 2, text_tokens=20, context_dim=CONTEXT)
    assert 0.97 < 2 * expert_macs(size, size.grid_tokens(24 * 8, 16 * 8)) / counted <= 1.0
    row = cost_row("Qwen-Image", REAL_MODELS["Qwen-Image"], num_models=2)
    assert (row["points"], row["aggregator_parameters"]) == (61, 239_466_496)
    assert 60 < row["expert_tflops"] < 80 and row["share_of_one_expert"] < 0.03


@pytest.mark.slow
def test_a_qwen_image_detected_from_its_weights(qwen):
    """The smallest state dict ComfyUI detects as Qwen-Image (width 3072, 3584-wide text, one
    block, ~0.4 B parameters): loaded as "Load Diffusion Model" loads it, its layout comes from the
    loaded module, the walk reproduces its forward and two copies reproduce it."""
    import comfy.sd as comfy_sd
    from afa_nodes.core.layout import derive_layout
    patcher = comfy_sd.load_diffusion_model_state_dict(qwen["models"].qwen_state_dict(7))
    assert type(patcher.model).__name__ == "QwenImage"
    m = patcher.model.diffusion_model
    layout = derive_layout(m)
    assert layout.point_names == ["joint 0", "final"] and (layout.time_embed_dim, layout.context_dim) == (3072, 3584)
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(1, 16, 1, 4, 6, generator=g), torch.tensor([0.5]), torch.randn(1, 5, 3584, generator=g)
    with torch.inference_mode():
        assert torch.equal(walk(m, x, t, c), m(x, t, c, transformer_options={}))
    cond = ([[c, {}]], [[c * 0, {}]], 2.0)
    single = sample(qwen, patcher, steps=2, cond=cond, latent=(1, 16, 4, 6))
    copies = sample(qwen, ensemble(qwen, [patcher, patcher.clone()]), steps=2, cond=cond, latent=(1, 16, 4, 6))
    assert (copies - single).abs().max() <= 1e-5
