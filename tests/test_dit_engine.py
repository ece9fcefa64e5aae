"""DiT ensembles (FLUX, SD3, Chroma) inside real ComfyUI, on tiny models made from ComfyUI's own classes
(afa_nodes/comfy_dit_models.py): the block-by-block walk equals the model's own forward, and
the ensemble invariants hold through ComfyUI's sampling path (common_ksampler)."""
import pytest
import torch

pytestmark = pytest.mark.comfyui

MODES = ("block-wise average", "noise average", "fixed weights", "single model", "aggregator")


@pytest.fixture(scope="module")
def dit(comfy, one_thread):
    import nodes
    from afa_nodes import comfy_dit_models, ensemble_model
    return dict(nodes=nodes, models=comfy_dit_models, ens=ensemble_model,
                flux=[comfy_dit_models.flux_patcher(s) for s in (1, 2)],
                sd3=[comfy_dit_models.sd3_patcher(s) for s in (1, 2)],
                chroma=[comfy_dit_models.chroma_patcher(s) for s in (1, 2)])


def conditioning(family, seed=0, width=1):
    """(positive, negative, cfg) for a family; `width` models' encodings stacked per model."""
    g = torch.Generator().manual_seed(seed)
    ctx, pooled, extra, cfg = {"flux": (48, 32, {"guidance": 3.5}, 1.0), "sd3": (4096, 2048, {}, 3.0),
                               "chroma": (48, 0, {"guidance": 0.0}, 3.0)}[family]
    pos = [[torch.randn(1, 7, ctx * width, generator=g),
            {"pooled_output": torch.randn(1, pooled * width, generator=g) if pooled else None, **extra}]]
    neg = [[torch.zeros(1, 7, ctx * width), {"pooled_output": torch.zeros(1, pooled * width) if pooled else None, **extra}]]
    return pos, neg, cfg


def sample(dit, model, family, steps=3, seed=3, cond=None):
    pos, neg, cfg = cond or conditioning(family)
    latent = {"samples": torch.zeros(2, 16, 6, 10)}    # not square, two images
    with torch.inference_mode():
        return dit["nodes"].common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]


def aggregator_file(dit, tmp_path, model, n, name, zero=False):
    """A random (far from uniform) or fresh (zero conv_out) aggregator for an ensemble's layout."""
    from afa_nodes.core.aggregator_file import load_aggregator, save_aggregator
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    layout = dit["ens"].require_ensemble(model).layout
    agg = Aggregator(layout.point_channels, SABWConfig(n, hidden=32, heads=4, depth=1, context_dim=layout.context_dim,
                                                       time_embed_dim=layout.time_embed_dim))
    if not zero:
        torch.manual_seed(5)
        for block in agg.blocks:
            torch.nn.init.normal_(block.conv_out.weight, std=2.0)
    save_aggregator(tmp_path / name, agg, layout, [])
    return load_aggregator(tmp_path / name)


def ensemble(dit, patchers, mode="block-wise average", agg=None, weights="", index=1):
    from afa_nodes.core.spec import EnsembleSpec
    spec = EnsembleSpec.from_ui((), mode, agg.path if agg else None, weights, index)
    names = [f"model {i + 1}" for i in range(len(patchers))]
    return dit["ens"].build_ensemble(patchers, names, spec, aggregator_file=agg)


def test_walk_over_one_model_equals_its_forward(dit):
    """The hand-written walk over ONE model reproduces ComfyUI's forward bit for bit (odd sizes
    are padded; FLUX Kontext reference latents; FLUX schnell without guidance; FLUX.2's global
    modulation; Chroma; SD3)."""
    from afa_nodes.comfy_flux import ComfyChromaExpert, ComfyFluxExpert
    from afa_nodes.comfy_mmdit import ComfyMMDiTExpert
    from afa_nodes.core.ensemble import EnsembleExecutor, uniform_mixer
    from afa_nodes.core.layout import derive_layout
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 7, 10, generator=g), torch.tensor([0.9, 0.2])
    schnell = dit["models"].flux_patcher(3, schnell=True).model.diffusion_model
    cases = []
    for m, guidance, refs in ((dit["flux"][0].model.diffusion_model, torch.tensor([3.5, 2.0]), None),
                              (dit["flux"][0].model.diffusion_model, torch.tensor([3.5, 2.0]), [torch.randn(2, 16, 4, 6, generator=g)]),
                              (schnell, None, None)):
        c, y = torch.randn(2, 5, 48, generator=g), torch.randn(2, 32, generator=g)
        cases.append((m, lambda m=m, c=c, y=y, gd=guidance, r=refs: m(x, t, c, y=y, guidance=gd, ref_latents=r, transformer_options={}),
                      lambda m=m, c=c, y=y, gd=guidance, r=refs: ComfyFluxExpert(m, x, t, c, y, gd, r), c))
    import dataclasses
    from comfy.ldm.flux.model import FluxParams
    if "global_modulation" in {f.name for f in dataclasses.fields(FluxParams)}:   # FLUX.2 (ComfyUI >= 0.4)
        flux2 = dit["models"].flux_patcher(4, global_modulation=True, mlp_silu_act=True, ops_bias=False, qkv_bias=False,
                                           axes_dim=[8, 8, 8, 8], txt_ids_dims=[3], patch_size=1, in_channels=8,
                                           out_channels=8, vec_in_dim=None, mlp_ratio=3.0).model.diffusion_model
        x2, c2 = torch.randn(2, 8, 6, 8, generator=g), torch.randn(2, 5, 48, generator=g)
        cases.append((flux2, lambda: flux2(x2, t, c2, guidance=torch.tensor([3.5, 2.0]), transformer_options={}),
                      lambda: ComfyFluxExpert(flux2, x2, t, c2, None, torch.tensor([3.5, 2.0])), c2))
    chroma, c = dit["chroma"][0].model.diffusion_model, torch.randn(2, 5, 48, generator=g)
    cases.append((chroma, lambda: chroma(x, t, c, torch.tensor([0.0, 2.0]), transformer_options={}),
                  lambda: ComfyChromaExpert(chroma, x, t, c, None, torch.tensor([0.0, 2.0])), c))
    m = dit["sd3"][0].model.diffusion_model
    c, y = torch.randn(2, 5, 4096, generator=g), torch.randn(2, 2048, generator=g)
    cases.append((m, lambda: m(x, t * 1000, context=c, y=y, transformer_options={}),
                  lambda: ComfyMMDiTExpert(m, x, t * 1000, c, y), c))
    for m, forward, expert, c in cases:
        layout = derive_layout(m)
        with torch.inference_mode():
            reference = forward()
            ours = EnsembleExecutor(layout, uniform_mixer(len(layout.points), 1)).forward([expert()], {"contexts": [c]})
        assert reference.ndim == 4 and torch.equal(ours, reference), layout.describe()


def test_layouts_derived_from_the_module_structure(dit):
    from afa_nodes.core.layout import derive_layout
    flux = derive_layout(dit["flux"][0].model.diffusion_model)
    deeper = derive_layout(dit["models"].flux_patcher(1, depth=3).model.diffusion_model)
    sd3 = derive_layout(dit["sd3"][0].model.diffusion_model)
    assert flux.point_names == ["double 0", "double 1", "single 0", "single 1", "final"]
    assert flux.point_channels == [64, 64, 64, 64, 64] and flux.context_dim == 48 and flux.vec_dim == 32
    assert flux.signature()["family"] == "flux" and flux.guidance and deeper.num_double == 3
    assert sd3.point_names == ["joint 0", "joint 1", "final"] and sd3.point_channels == [128, 128, 64]
    assert (sd3.signature()["family"], sd3.context_dim, sd3.adm_dim) == ("mmdit", 4096, 2048)
    assert [flux.weight_group(p) for p in flux.points] == ["input", "input", "middle", "output", "output"]
    chroma = derive_layout(dit["chroma"][0].model.diffusion_model)
    assert chroma.signature()["family"] == "chroma" and chroma.point_names == flux.point_names and chroma.vec_dim == 0


@pytest.mark.parametrize("family", ["flux", "sd3", "chroma"])
def test_identical_experts_equal_the_single_model_in_every_mode(dit, family, tmp_path):
    base = dit[family][0]
    expected = sample(dit, base, family)
    probe = ensemble(dit, [base, base.clone(), base])
    agg = aggregator_file(dit, tmp_path, probe, 3, f"{family}_copies.safetensors")
    for mode in MODES:
        model = ensemble(dit, [base, base.clone(), base], mode, agg if mode == "aggregator" else None,
                         weights="0.2, 0.5, 0.3", index=2)
        got = sample(dit, model, family)
        assert (got - expected).abs().max() <= 1e-5, mode
    # each model's own encoding stacked along the features (as the AFA CLIP gives it; here all
    # equal): the copies still equal the model fed one of them
    pos, neg, cfg = conditioning(family)
    stacked = [[[c.repeat(1, 1, 3), {k: v.repeat(1, 3) if k == "pooled_output" and v is not None else v
                                     for k, v in extra.items()}]
                for c, extra in cond] for cond in (pos, neg)]
    model = ensemble(dit, [base, base.clone(), base], "aggregator", agg)
    assert (sample(dit, model, family, cond=(*stacked, cfg)) - expected).abs().max() <= 1e-5


def test_each_model_gets_its_own_stacked_encoding(dit):
    """Stacked per-model encodings [B, T, N*width] / pooled [B, N*width] are split per expert."""
    a, b = dit["sd3"]
    pos, neg, cfg = conditioning("sd3", seed=1, width=2)

    def part(k):
        return [[[c.chunk(2, -1)[k], {n: v.chunk(2, -1)[k] if n == "pooled_output" else v for n, v in extra.items()}]
                 for c, extra in cond] for cond in (pos, neg)]
    got = sample(dit, ensemble(dit, [a, b], "single model", index=2), "sd3", cond=(pos, neg, cfg))
    assert (got - sample(dit, b, "sd3", cond=(*part(1), cfg))).abs().max() <= 1e-5
    assert (got - sample(dit, b, "sd3", cond=(*part(0), cfg))).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["flux", "sd3", "chroma"])
def test_two_different_experts_modes_and_fresh_aggregator(dit, family, tmp_path):
    a, b = dit[family]
    single = [sample(dit, a, family), sample(dit, b, family)]
    outs = {mode: sample(dit, ensemble(dit, [a, b], mode, weights="0.3, 0.7", index=2), family)
            for mode in MODES[:4]}
    assert torch.equal(outs["single model"], single[1])
    for mode in ("block-wise average", "noise average", "fixed weights"):
        assert torch.isfinite(outs[mode]).all()
        assert min((outs[mode] - s).abs().max() for s in single) > 1e-3, mode
    assert (outs["block-wise average"] - outs["noise average"]).abs().max() > 1e-3
    assert (outs["block-wise average"] - outs["fixed weights"]).abs().max() > 1e-3
    fresh = aggregator_file(dit, tmp_path, ensemble(dit, [a, b]), 2, f"{family}_fresh.safetensors", zero=True)
    assert torch.equal(sample(dit, ensemble(dit, [a, b], "aggregator", fresh), family), outs["block-wise average"])
    # one-hot fixed weights reproduce that expert (text tokens stay each expert's own); y1 + (y2 - y1)
    # is y2 up to fp32 rounding, relative to the output's size
    for k in (0, 1):
        weights = ", ".join("1" if i == k else "0" for i in range(2))
        got = sample(dit, ensemble(dit, [a, b], "fixed weights", weights=weights), family)
        assert (got - single[k]).abs().max() <= 1e-6 * max(1.0, float(single[k].abs().max()))


def test_block_patches_run_on_their_own_expert(dit):
    """A block patch put on expert 2 before ensembling acts on expert 2's blocks only; one put on
    the AFA MODEL afterwards on every expert's."""
    calls = []

    def patch(tag):
        def replace(args, extra):
            calls.append(tag)
            out = extra["original_block"](args)
            return {"img": out["img"] * 1.5, "txt": out["txt"]}
        return replace
    a, b = dit["flux"]
    patched = b.clone()
    patched.set_model_patch_replace(patch("expert 2"), "dit", "double_block", 0)
    plain = sample(dit, ensemble(dit, [a, b]), "flux", steps=2)
    model = ensemble(dit, [a, patched])
    got = sample(dit, model, "flux", steps=2)
    assert calls == ["expert 2"] * 2 and (got - plain).abs().max() > 1e-3   # two steps, cfg 1: one call each
    calls.clear()
    later = model.clone()
    later.set_model_patch_replace(patch("afa model"), "dit", "double_block", 1)
    sample(dit, later, "flux", steps=2)
    assert sorted(calls) == ["afa model"] * 4 + ["expert 2"] * 2


def test_controlnet_residuals_are_added_once(dit):
    """FLUX ControlNet residuals on 2 copies equal the single model with the same residuals."""
    from comfy.patcher_extension import WrappersMP
    base = dit["flux"][0]
    m = base.model.diffusion_model
    g = torch.Generator().manual_seed(2)
    x, t, c, y = torch.randn(1, 16, 6, 8, generator=g), torch.tensor([0.7]), torch.randn(1, 5, 48, generator=g), torch.randn(1, 32, generator=g)

    def control():
        return {"input": [torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)],
                "output": [torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(9)), None]}
    wrapper = ensemble(dit, [base, base.clone()]).wrappers[WrappersMP.DIFFUSION_MODEL]["afa"][0]

    class Executor:
        class_obj = m
    with torch.inference_mode():
        expected = m(x, t, c, y=y, guidance=torch.tensor([3.5]), control=control(), transformer_options={})
        got = wrapper(Executor, x, t, c, y, torch.tensor([3.5]), None, control(), {})
        plain = m(x, t, c, y=y, guidance=torch.tensor([3.5]), transformer_options={})
    assert (got - expected).abs().max() <= 1e-6 and (plain - expected).abs().max() > 1e-3


def test_bad_inputs_raise_typed_errors(dit, tmp_path, sdxl_checkpoints):
    import comfy.sd as comfy_sd
    from afa_nodes.core.errors import AggregatorMismatchError, IncompatibleModelsError
    flux_agg = aggregator_file(dit, tmp_path, ensemble(dit, dit["flux"]), 2, "flux_two.safetensors")
    with pytest.raises(AggregatorMismatchError, match="trained for flux models, this ensemble is of mmdit"):
        ensemble(dit, dit["sd3"], "aggregator", flux_agg)
    deeper = [dit["models"].flux_patcher(s, depth=3) for s in (1, 2)]
    with pytest.raises(AggregatorMismatchError, match="another architecture .*points"):
        ensemble(dit, deeper, "aggregator", flux_agg)
    sdxl = comfy_sd.load_checkpoint_guess_config(str(sdxl_checkpoints[0]))[0]
    with pytest.raises(IncompatibleModelsError, match="'model 2' is an LDM UNet .* but 'model 1' is a FLUX model"):
        ensemble(dit, [dit["flux"][0], sdxl])
    with pytest.raises(IncompatibleModelsError, match="'model 2' is an MMDiT .* but 'model 1' is a FLUX model"):
        ensemble(dit, [dit["flux"][0], dit["sd3"][0]])
    with pytest.raises(IncompatibleModelsError, match="double blocks|points"):
        ensemble(dit, [dit["flux"][0], deeper[0]])
    schnell = dit["models"].flux_patcher(1, schnell=True)
    with pytest.raises(IncompatibleModelsError, match="guidance|prediction"):
        ensemble(dit, [dit["flux"][0], schnell])
    with pytest.raises(IncompatibleModelsError, match="'model 2' is a Chroma model but 'model 1' is a FLUX model"):
        ensemble(dit, [dit["flux"][0], dit["chroma"][0]])
    with pytest.raises(AggregatorMismatchError, match="trained for flux models, this ensemble is of chroma"):
        ensemble(dit, dit["chroma"], "aggregator", flux_agg)



def test_maps_of_a_dit_ensemble_are_token_grids(dit, tmp_path):
    """The map recorder sees every double/single block's weights as a (latent / 2) picture."""
    from afa_nodes.service import maps
    a, b = dit["flux"]
    agg = aggregator_file(dit, tmp_path, ensemble(dit, [a, b]), 2, "flux_maps.safetensors")
    model, recorder = maps.record_maps(ensemble(dit, [a, b], "aggregator", agg), points="all", steps="all")
    pos, neg, cfg = conditioning("flux")
    with torch.inference_mode():
        out = dit["nodes"].common_ksampler(model, 3, 3, cfg, "euler", "simple", pos, neg,
                                           {"samples": torch.zeros(1, 16, 12, 16)})[0]
    preview = maps.preview_maps(recorder, out, points="double 0, single 1, final", step=-1)
    info = preview.info
    assert info["points"] == ["double 0", "double 1", "single 0", "single 1", "final"] and info["steps"] == [0, 1, 2]
    assert set(map(tuple, info["sizes"].values())) == {(6, 8)}
    grids = preview.images[0]
    assert grids.shape[0] == 3 and float(grids.std()) > 0

@pytest.mark.slow
def test_a_flux_detected_from_its_weights(dit):
    """The smallest state dict ComfyUI detects as FLUX.1 [dev] (width 3072, 1 double + 1 single
    block, ~0.5 B parameters): loaded as "Load Diffusion Model" loads it, its layout comes from
    the loaded module, the walk reproduces its forward and two copies reproduce it."""
    import comfy.sd as comfy_sd
    from afa_nodes.comfy_flux import ComfyFluxExpert
    from afa_nodes.core.ensemble import EnsembleExecutor, uniform_mixer
    from afa_nodes.core.layout import derive_layout
    patcher = comfy_sd.load_diffusion_model_state_dict(dit["models"].flux_state_dict(7))
    assert type(patcher.model).__name__ == "Flux" and str(patcher.model.model_type) == "ModelType.FLUX"
    m = patcher.model.diffusion_model
    layout = derive_layout(m)
    assert layout.point_names == ["double 0", "single 0", "final"] and layout.time_embed_dim == 3072
    assert (layout.context_dim, layout.vec_dim, layout.guidance) == (768, 768, True)
    g = torch.Generator().manual_seed(0)
    x, t, c, y = torch.randn(1, 16, 4, 6, generator=g), torch.tensor([0.5]), torch.randn(1, 5, 768, generator=g), \
        torch.randn(1, 768, generator=g)
    with torch.inference_mode():
        reference = m(x, t, c, y=y, guidance=torch.tensor([3.5]), transformer_options={})
        ours = EnsembleExecutor(layout, uniform_mixer(3, 1)).forward(
            [ComfyFluxExpert(m, x, t, c, y, torch.tensor([3.5]))], {"contexts": [c]})
    assert torch.equal(ours, reference)
    cond = ([[c[:, :5], {"pooled_output": y, "guidance": 3.5}]], [[c[:, :5] * 0, {"pooled_output": y * 0, "guidance": 3.5}]], 1.0)
    latent = {"samples": torch.zeros(1, 16, 4, 6)}
    with torch.inference_mode():
        single = dit["nodes"].common_ksampler(patcher, 1, 2, 1.0, "euler", "simple", cond[0], cond[1], latent)[0]["samples"]
        copies = dit["nodes"].common_ksampler(ensemble(dit, [patcher, patcher.clone()]), 1, 2, 1.0, "euler", "simple",
                                              cond[0], cond[1], latent)[0]["samples"]
    assert (copies - single).abs().max() <= 1e-5
