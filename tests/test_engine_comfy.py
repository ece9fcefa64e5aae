"""The AFA engine inside real ComfyUI, on small checkpoints in ComfyUI's real key layout."""
import pytest
import torch

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def env(comfy, sd15_checkpoints, sdxl_checkpoints):
    import comfy.sd
    import folder_paths
    import nodes
    from afa_nodes import ensemble_model
    from afa_nodes.service import models
    for path in list(sd15_checkpoints) + list(sdxl_checkpoints):
        folder_paths.add_model_folder_path("checkpoints", str(path.parent))
    models.register_afa_folder()
    return dict(nodes=nodes, sd=comfy.sd, folder_paths=folder_paths, ens=ensemble_model, service=models,
                sd15=[p.name for p in sd15_checkpoints], sdxl=[p.name for p in sdxl_checkpoints])


@pytest.fixture(scope="module")
def afa_dir(env, tmp_path_factory):
    folder = tmp_path_factory.mktemp("afa_models")
    env["folder_paths"].add_model_folder_path("afa", str(folder))
    return folder


def load(env, name):
    path = env["folder_paths"].get_full_path_or_raise("checkpoints", name)
    return env["sd"].load_checkpoint_guess_config(path)[:3]


def sample(env, model, positive, negative, latent, seed=3, steps=3, cfg=4.0, sampler="euler", denoise=1.0):
    with torch.inference_mode():
        return env["nodes"].common_ksampler(model, seed, steps, cfg, sampler, "normal", positive, negative,
                                            latent, denoise=denoise)[0]["samples"]


def encode(env, clip, text):
    with torch.inference_mode():
        return env["nodes"].CLIPTextEncode().encode(clip, text)[0]


def latent(batch=1, height=40, width=56):
    return {"samples": torch.zeros(batch, 4, height // 8, width // 8)}


def loader(env, names, mode="block-wise average", aggregator="none", weights="", index=1):
    """(MODEL, CLIP, VAE) through the service layer, as AFA Ensemble Loader gets them."""
    from afa_nodes.core.spec import EnsembleSpec
    spec = EnsembleSpec.from_ui(names, mode, aggregator, weights, index)
    with torch.inference_mode():
        loaded = env["service"].load_ensemble(spec)
    return loaded.model, loaded.clip, loaded.vae


def save_random_aggregator(env, afa_dir, model, n, name, zero=False, seed=0):
    from afa_nodes.core.aggregator_file import save_aggregator
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    from afa_nodes.ensemble_model import require_ensemble
    layout = require_ensemble(model).layout
    agg = Aggregator(layout.point_channels, SABWConfig(n, hidden=32, heads=4, depth=1,
                                                       context_dim=layout.context_dim,
                                                       time_embed_dim=layout.time_embed_dim))
    if not zero:
        torch.manual_seed(seed)
        for block in agg.blocks:
            torch.nn.init.normal_(block.conv_out.weight, std=2.0)  # far from uniform
    save_aggregator(afa_dir / name, agg, layout, [])
    return name


def test_block_by_block_equals_comfy_unet_forward(env):
    from afa_nodes.core.ensemble import EnsembleExecutor, uniform_mixer
    from afa_nodes.core.layout import derive_layout
    from afa_nodes.comfy_unet import ComfyExpert
    torch.manual_seed(0)
    for name, ctx, y in ((env["sd15"][0], 768, None), (env["sdxl"][0], 2048, torch.randn(2, 2816))):
        unet = load(env, name)[0].model.diffusion_model
        layout = derive_layout(unet)
        x, t, c = torch.randn(2, 4, 5, 7), torch.tensor([999.0, 3.0]), torch.randn(2, 77, ctx)
        with torch.inference_mode():
            reference = unet(x, t, context=c, y=y, transformer_options={})
            ours = EnsembleExecutor(layout, uniform_mixer(len(layout.points), 1))(
                [ComfyExpert(unet, {}, x, {})], x, t, [c], [y])
        assert torch.equal(ours, reference), name


def test_layouts_derived_from_the_unet(env):
    from afa_nodes.ensemble_model import require_ensemble
    sd15 = require_ensemble(loader(env, env["sd15"][:2])[0]).layout
    sdxl_model = env["ens"].build_ensemble([load(env, n)[0] for n in env["sdxl"][:2]], env["sdxl"][:2])
    sdxl = require_ensemble(sdxl_model).layout
    assert sd15.point_names[-1] == "final" and sd15.context_dim == 768 and sd15.adm_dim == 0
    assert len(sdxl.points) == 19 and sdxl.context_dim == 2048 and sdxl.adm_dim == 2816


def test_copies_of_one_checkpoint_reproduce_it_for_any_aggregator(env, afa_dir):
    name = env["sd15"][0]
    base, clip, _ = load(env, name)
    positive, negative = encode(env, clip, "a red house"), encode(env, clip, "blurry")
    expected = sample(env, base, positive, negative, latent(batch=2), cfg=1.5)
    probe = loader(env, [name] * 3)[0]
    agg = save_random_aggregator(env, afa_dir, probe, 3, "copies3.safetensors")
    model, afa_clip, _ = loader(env, [name] * 3, "aggregator", agg)
    got = sample(env, model, encode(env, afa_clip, "a red house"), encode(env, afa_clip, "blurry"), latent(batch=2), cfg=1.5)
    assert (got - expected).abs().max() <= 1e-5
    # a plain single-model CLIP still works: its context is shared by every model
    shared = sample(env, model, positive, negative, latent(batch=2), cfg=1.5)
    assert (shared - expected).abs().max() <= 1e-5


def test_zero_init_aggregator_equals_blockwise_average(env, afa_dir):
    names = env["sd15"][:2]
    avg_model, clip, _ = loader(env, names)
    agg = save_random_aggregator(env, afa_dir, avg_model, 2, "zero2.safetensors", zero=True)
    agg_model = loader(env, names, "aggregator", agg)[0]
    pos, neg = encode(env, clip, "a tree"), encode(env, clip, "")
    a = sample(env, avg_model, pos, neg, latent())
    b = sample(env, agg_model, pos, neg, latent())
    assert torch.equal(a, b)


def test_modes_differ_and_single_model_equals_that_model(env):
    names = env["sd15"][:3]
    outs = {}
    for mode in ("block-wise average", "noise average", "fixed weights", "single model"):
        model, clip, _ = loader(env, names, mode, weights="input: 1,0,0; middle: 0,1,0; output: 0,0,1", index=2)
        outs[mode] = sample(env, model, encode(env, clip, "a dog"), encode(env, clip, ""), latent())
        assert torch.isfinite(outs[mode]).all()
    base, base_clip, _ = load(env, names[1])
    single = sample(env, base, encode(env, base_clip, "a dog"), encode(env, base_clip, ""), latent())
    assert (outs["single model"] - single).abs().max() <= 1e-5
    modes = list(outs)
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            assert (outs[a] - outs[b]).abs().max() > 1e-4, (a, b)


def test_per_model_text_reaches_each_model(env):
    """Each model gets its own encoding: the per-model CLIP differs from model 1's CLIP alone."""
    names = env["sd15"][:2]
    model, afa_clip, _ = loader(env, names)
    cond = encode(env, afa_clip, "a boat")
    assert cond[0][0].shape[-1] == 2 * 768 and cond[0][1]["cross_attn_controlnet"].shape[-1] == 768
    first_clip = load(env, names[0])[1]
    a = sample(env, model, cond, encode(env, afa_clip, ""), latent())
    b = sample(env, model, encode(env, first_clip, "a boat"), encode(env, first_clip, ""), latent())
    assert (a - b).abs().max() > 1e-4


def test_samplers_sizes_batches_img2img(env):
    model, clip, vae = loader(env, env["sd15"][:2])
    pos, neg = encode(env, clip, "a cat"), encode(env, clip, "")
    for sampler, lat, denoise in (("dpmpp_2m", latent(batch=3, height=72, width=40), 1.0),
                                  ("euler_ancestral", {"samples": torch.randn(1, 4, 6, 9)}, 0.5)):
        out = sample(env, model, pos, neg, lat, sampler=sampler, denoise=denoise)
        assert out.shape == lat["samples"].shape and torch.isfinite(out).all()
    with torch.inference_mode():
        image = env["nodes"].VAEDecode().decode(vae, {"samples": out})[0]
    assert image.shape == (1, 48, 72, 3) and image.std() > 0


def test_sdxl_shaped_ensemble_samples_with_per_model_pooled(env):
    names = env["sdxl"][:2]
    models = [load(env, n)[0] for n in names]
    model = env["ens"].build_ensemble(models, names)
    torch.manual_seed(0)
    c = [torch.randn(1, 77, 2048) for _ in names]
    p = [torch.randn(1, 1280) for _ in names]
    per_model = [[torch.cat(c, -1), {"pooled_output": torch.cat(p, -1), "width": 64, "height": 64}]]
    shared = [[c[0], {"pooled_output": p[0], "width": 64, "height": 64}]]
    a = sample(env, model, per_model, shared, latent(height=64, width=48))
    b = sample(env, model, shared, shared, latent(height=64, width=48))
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4
    # two copies of one SDXL model with its own pooled embedding equal that model
    copies = env["ens"].build_ensemble([models[0], models[0]], [names[0]] * 2)
    single = sample(env, models[0], shared, shared, latent(height=64, width=48))
    dup = [[torch.cat([c[0], c[0]], -1), {"pooled_output": torch.cat([p[0], p[0]], -1), "width": 64, "height": 64}]]
    assert (sample(env, copies, dup, dup, latent(height=64, width=48)) - single).abs().max() <= 1e-5


def test_control_is_applied_once_per_block(env):
    """ControlNet-style residuals on N copies equal the single model with the same residuals."""
    name = env["sd15"][0]
    base = load(env, name)[0]
    model = loader(env, [name] * 3)[0]
    unet = base.model.diffusion_model
    torch.manual_seed(0)
    x, t, c = torch.randn(1, 4, 5, 6), torch.tensor([500.0]), torch.randn(1, 77, 768)

    from afa_nodes.ensemble_model import require_ensemble
    shapes = []  # output shape of every input block
    with torch.inference_mode():
        unet(x, t, context=c, transformer_options={"patches": {"input_block_patch": [
            lambda h, opts: shapes.append(h.shape) or h]}})
    middle = require_ensemble(model).layout.points[len(shapes)].channels
    shapes = {"input": shapes, "middle": [(1, middle) + tuple(shapes[-1][2:])]}

    def control():  # ComfyUI pops from the end: input residuals are listed last block first
        g = torch.Generator().manual_seed(1)
        rand = [torch.randn(s, generator=g) * 0.1 for s in shapes["input"]]
        return {"input": rand[::-1], "middle": [torch.randn(shapes["middle"][0], generator=g) * 0.1],
                "output": [torch.randn(s, generator=g) * 0.1 for s in shapes["input"]]}
    with torch.inference_mode():
        expected = unet(x, t, context=c, control=control(), transformer_options={})
        from comfy.patcher_extension import WrappersMP
        wrapper = model.wrappers[WrappersMP.DIFFUSION_MODEL]["afa"][0]

        class Executor:
            class_obj = unet
        got = wrapper(Executor, x, t, context=c, control=control(), transformer_options={})
    assert (got - expected).abs().max() <= 1e-5
    with torch.inference_mode():
        plain = unet(x, t, context=c, transformer_options={})
    assert (plain - expected).abs().max() > 1e-4  # the residuals did something


def test_model_patches_after_ensembling(env):
    """Block patches set on the AFA MODEL (as FreeU etc. do) act once, on the mixed feature."""
    name = env["sd15"][0]
    base, clip, _ = load(env, name)
    pos, neg = encode(env, clip, "a cat"), encode(env, clip, "")

    def patch(model):
        model = model.clone()
        model.set_model_input_block_patch(lambda h, opts: h * 1.05)
        model.set_model_output_block_patch(lambda h, hsp, opts: (h, hsp * 0.9))
        return model
    expected = sample(env, patch(base), pos, neg, latent())
    assert (sample(env, patch(loader(env, [name] * 2)[0]), pos, neg, latent()) - expected).abs().max() <= 1e-5
    assert (expected - sample(env, base, pos, neg, latent())).abs().max() > 1e-4


def test_ensemble_of_loaded_models_with_merged_clip(env):
    """AFA Ensemble + AFA CLIP Merge's path (MODELs loaded elsewhere) equals the loader's."""
    from afa_nodes.core.spec import EnsembleSpec
    from afa_nodes.per_model_clip import PerModelCLIP
    names = env["sd15"][:2]
    loaded = [load(env, n) for n in names]
    with torch.inference_mode():
        model = env["service"].ensemble_of_models([m for m, _, _ in loaded], ["model 1", "model 2"], EnsembleSpec())
        clip = PerModelCLIP.from_clips([c for _, c, _ in loaded])
    ref_model, ref_clip, _ = loader(env, names)
    pos = encode(env, clip, "a hill")
    a = sample(env, model, pos, encode(env, clip, ""), latent())
    b = sample(env, ref_model, encode(env, ref_clip, "a hill"), encode(env, ref_clip, ""), latent())
    assert torch.equal(a, b)


def test_bad_input_raises_clear_errors(env, afa_dir, tmp_path):
    from afa_nodes.core.errors import (AFAError, AggregatorFileError, AggregatorMismatchError,
                                       IncompatibleModelsError)
    sd15, sdxl = env["sd15"], env["sdxl"]
    with pytest.raises(IncompatibleModelsError, match=sdxl[0]):
        loader(env, [sd15[0], sdxl[0]])
    with pytest.raises(AFAError, match="needs 2 to 6 models, got 1"):
        loader(env, [sd15[0]])
    with pytest.raises(AFAError, match="2 to 6 models"):
        env["ens"].build_ensemble([load(env, sd15[0])[0]], [sd15[0]])
    two = save_random_aggregator(env, afa_dir, loader(env, sd15[:2])[0], 2, "for_two.safetensors")
    with pytest.raises(AggregatorMismatchError, match="trained for 2 models, this ensemble has 3"):
        loader(env, sd15[:3], "aggregator", two)
    xl = env["ens"].build_ensemble([load(env, n)[0] for n in sdxl[:2]], sdxl[:2])
    xl_agg = save_random_aggregator(env, afa_dir, xl, 2, "sdxl_two.safetensors")
    with pytest.raises(AggregatorMismatchError, match="another architecture"):
        loader(env, sd15[:2], "aggregator", xl_agg)
    (afa_dir / "broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AggregatorFileError, match="broken.safetensors"):
        loader(env, sd15[:2], "aggregator", "broken.safetensors")
    with pytest.raises(AFAError, match="needs an aggregator file"):
        loader(env, sd15[:2], "aggregator", "none")
    with pytest.raises(AFAError, match="3 numbers for 2 models"):
        loader(env, sd15[:2], "fixed weights", weights="1,2,3")
    with pytest.raises(Exception, match="missing.safetensors"):
        loader(env, [sd15[0], "missing.safetensors"])


def test_trained_on_other_experts_warns_with_names(env, afa_dir, caplog):
    from afa_nodes.core.aggregator_file import load_aggregator, save_aggregator
    from afa_nodes.ensemble_model import require_ensemble
    names = env["sd15"][:2]
    layout = require_ensemble(loader(env, names)[0]).layout
    agg = load_aggregator(afa_dir / save_random_aggregator(env, afa_dir, loader(env, names)[0], 2, "tmp.safetensors")).build()
    save_aggregator(afa_dir / "other_experts.safetensors", agg, layout,
                    [{"name": "alpha.safetensors", "sha256": "0" * 64}, {"name": "beta.safetensors", "sha256": "1" * 64}])
    loader(env, names, "aggregator", "other_experts.safetensors")
    assert "alpha.safetensors" in caplog.text and names[1] in caplog.text


def test_ksampler_advanced_and_sampler_custom_on_copies_equal_the_model(env):
    """The AFA MODEL through the other stock samplers: copies of one checkpoint reproduce it."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as custom
    name = env["sd15"][0]
    base, clip, _ = load(env, name)
    copies = loader(env, [name] * 2)[0]
    pos, neg = encode(env, clip, "a fox"), encode(env, clip, "")

    def run(model):
        with torch.inference_mode():
            adv = env["nodes"].KSamplerAdvanced().sample(model, "enable", 5, 3, 4.0, "dpmpp_2m", "karras", pos, neg,
                                                         latent(), 0, 3, "disable")[0]["samples"]
            sampler = comfy.samplers.sampler_object("euler")
            sigmas = torch.cat([model.get_model_object("model_sampling").sigmas[[999, 500, 0]], torch.zeros(1)])
            out = custom.SamplerCustom.execute(model, True, 5, 4.0, pos, neg, sampler, sigmas, latent())
            result = out.result if hasattr(out, "result") else out.args
        return adv, result[0]["samples"]
    (a1, c1), (a2, c2) = run(base), run(copies)
    assert torch.isfinite(a1).all() and torch.isfinite(c1).all()
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
