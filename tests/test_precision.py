"""Half precision inside real ComfyUI: experts stored in fp16, bf16 or fp8 and computed in
fp16/bf16 (as on a GPU) or cast to fp32 (as ComfyUI does on the CPU); the aggregator in the
experts' compute dtype, its softmax in fp32; aggregator files cross dtypes both ways.

ComfyUI on the CPU stores weights in the dtype asked for but computes in fp32 (its
`unet_manual_cast` has no fast fp16/bf16 on a CPU). `load(..., compute=...)` clears or sets
that manual-cast dtype, which is what ComfyUI itself decides on a GPU: fp16/bf16 weights
computed as stored, fp8 weights cast to fp16/bf16 per layer.
"""
import pytest
import torch

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]

# The identity invariant (N copies of one checkpoint = that checkpoint) holds bit for bit by
# construction: the executor mixes as y_1 + sum_{i>1} w_i (y_i - y_1) and the differences are
# exactly 0 in any dtype. The tolerance allowed is a few units of the dtype's rounding of the
# final latent (|latent| <~ 4 here): measured error 0 in every mode and dtype.
TOLERANCE = {torch.bfloat16: 4 * 2 ** -8 * 4, torch.float16: 4 * 2 ** -11 * 4, torch.float32: 1e-5}
MODES = ("block-wise average", "noise average", "fixed weights", "single model", "aggregator")


@pytest.fixture(scope="module")
def env(comfy, sd15_checkpoints, tmp_path_factory):
    import comfy.sd as comfy_sd
    import nodes
    from afa_nodes import ensemble_model
    return dict(sd=comfy_sd, nodes=nodes, ens=ensemble_model, paths=list(sd15_checkpoints),
                tmp=tmp_path_factory.mktemp("precision"))


def load(env, index, storage=None, compute=None):
    """(MODEL, CLIP, VAE) of test checkpoint `index`, weights stored in `storage` and
    computed in `compute` (None: as ComfyUI decides on this device)."""
    options = {} if storage is None else {"dtype": storage}
    model, clip, vae = env["sd"].load_checkpoint_guess_config(str(env["paths"][index]), model_options=options)[:3]
    if compute is not None:
        model.model.manual_cast_dtype = None if compute == storage else compute
    return model, clip, vae


def encode(env, clip, text):
    with torch.inference_mode():
        return env["nodes"].CLIPTextEncode().encode(clip, text)[0]


def sample(env, model, pos, neg, height=40, width=56, steps=2, seed=3):
    latent = {"samples": torch.zeros(1, 4, height // 8, width // 8)}
    with torch.inference_mode():
        return env["nodes"].common_ksampler(model, seed, steps, 4.0, "euler", "normal", pos, neg, latent)[0]["samples"]


def random_aggregator(env, model, n, name, dtype=torch.float32, seed=0, std=2.0):
    """A far-from-uniform aggregator saved with `dtype` tensors; returns the loaded file."""
    from afa_nodes.core.aggregator_file import load_aggregator, save_aggregator
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    layout = env["ens"].require_ensemble(model).layout
    agg = Aggregator(layout.point_channels, SABWConfig(n, hidden=32, heads=4, depth=1, context_dim=layout.context_dim,
                                                       time_embed_dim=layout.time_embed_dim))
    torch.manual_seed(seed)
    with torch.no_grad():
        for block in agg.blocks:
            torch.nn.init.normal_(block.conv_out.weight, std=std)
    save_aggregator(env["tmp"] / name, agg.to(dtype), layout, [])
    return load_aggregator(env["tmp"] / name)


def ensemble(env, patchers, mode, aggregator_file=None, precision="auto"):
    from afa_nodes.core.spec import EnsembleSpec
    spec = EnsembleSpec.from_ui((), mode, getattr(aggregator_file, "path", None), "input: 1,2; middle: 2,1; output: 1,1",
                                2, precision=precision)
    return env["ens"].build_ensemble(patchers, [f"m{i}" for i in range(len(patchers))], spec, aggregator_file)


def recorded(env, model):
    """A clone that keeps every weight map it computes."""
    maps = []
    return env["ens"].with_recorder(model, lambda point, w, ctx: maps.append(w.detach().clone())), maps


@pytest.mark.parametrize("storage, dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                            (torch.float8_e4m3fn, torch.bfloat16)], ids=["bf16", "fp16", "fp8-as-bf16"])
def test_copies_equal_the_checkpoint_in_half_precision_in_every_mode(env, storage, dtype):
    base, clip, _ = load(env, 0, storage, dtype)
    pos, neg = encode(env, clip, "a red house"), encode(env, clip, "blurry")
    expected = sample(env, base, pos, neg)
    assert torch.isfinite(expected).all() and expected.abs().max() > 0.1
    agg = random_aggregator(env, env["ens"].build_ensemble([base, base], ["a", "b"]), 2, f"copies-{storage}.safetensors")
    errors = {}
    for mode in MODES:
        model = ensemble(env, [base, base], mode, agg if mode == "aggregator" else None)
        got = sample(env, model, pos, neg)
        errors[mode] = float((got - expected).abs().max())
    assert all(e <= TOLERANCE[dtype] for e in errors.values()), errors
    # the ensemble really ran in `dtype`: the same run in fp32 differs by more than rounding noise
    fp32, fp32_clip, _ = load(env, 0, torch.float32, torch.float32)
    assert (sample(env, fp32, pos, neg) - expected).abs().max() > 0


def test_aggregator_runs_in_the_experts_compute_dtype_and_softmax_in_fp32(env):
    from afa_nodes.ensemble_model import require_ensemble
    bf16 = [load(env, i, torch.bfloat16, torch.bfloat16)[0] for i in (0, 1)]
    fp8 = [load(env, i, torch.float8_e4m3fn, torch.bfloat16)[0] for i in (0, 1)]
    cpu8 = [load(env, i, torch.float8_e4m3fn)[0] for i in (0, 1)]   # ComfyUI's own CPU choice: cast to fp32
    agg = random_aggregator(env, env["ens"].build_ensemble(bf16, ["a", "b"]), 2, "dtype.safetensors")
    clip = load(env, 0)[1]
    pos, neg = encode(env, clip, "a boat"), encode(env, clip, "")
    for patchers, want in ((bf16, torch.bfloat16), (fp8, torch.bfloat16), (cpu8, torch.float32)):
        model = ensemble(env, patchers, "aggregator", agg)
        assert next(require_ensemble(model).aggregator.parameters()).dtype == want
        model, maps = recorded(env, model)
        out = sample(env, model, pos, neg)
        assert torch.isfinite(out).all() and maps
        assert all(w.dtype == want and torch.isfinite(w).all() for w in maps)
        sums = torch.stack([w.float().sum(1).sub(1).abs().max() for w in maps])
        assert float(sums.max()) <= 2 * torch.finfo(want).eps  # one rounding of each weight, N = 2
    # precision 'fp32' overrides the experts' dtype
    assert next(require_ensemble(ensemble(env, bf16, "aggregator", agg, "fp32")).aggregator.parameters()).dtype \
        == torch.float32


def test_sabw_softmax_is_computed_in_fp32(monkeypatch):
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    softmax, seen = torch.softmax, []
    monkeypatch.setattr(torch, "softmax", lambda x, *a, **k: seen.append(x.dtype) or softmax(x, *a, **k))
    torch.manual_seed(0)
    agg = Aggregator([8], SABWConfig(3, hidden=32, heads=4, depth=1, context_dim=16, time_embed_dim=8))
    with torch.no_grad():
        torch.nn.init.normal_(agg.blocks[0].conv_out.weight, std=8.0)   # large logits: rounding shows
    for dtype in (torch.bfloat16, torch.float16):
        block = agg.to(dtype).blocks[0]
        logits = []
        handle = block.conv_out.register_forward_hook(lambda m, i, o: logits.append(o))
        features = torch.randn(2, 3, 8, 6, 5, dtype=dtype)
        with torch.no_grad():
            w = agg(0, features, torch.randn(2, 8, dtype=dtype), torch.randn(2, 4, 16, dtype=dtype))
        handle.remove()
        assert logits[0].dtype == dtype and w.dtype == dtype and seen[-1] == torch.float32
        assert torch.equal(w, torch.softmax(logits[0].float(), dim=1).to(dtype))
        assert float(w.float().sum(1).sub(1).abs().max()) <= 3 * torch.finfo(dtype).eps / 2


def test_no_nan_or_inf_in_a_full_bf16_sampling_run_at_512px(env):
    patchers = [load(env, i, torch.bfloat16, torch.bfloat16) for i in (0, 1)]
    models = [p[0] for p in patchers]
    agg = random_aggregator(env, env["ens"].build_ensemble(models, ["a", "b"]), 2, "run512.safetensors")
    model, maps = recorded(env, ensemble(env, models, "aggregator", agg))
    clip, vae = patchers[0][1], patchers[0][2]
    pos, neg = encode(env, clip, "a mountain lake at dawn"), encode(env, clip, "blurry")
    latent = sample(env, model, pos, neg, height=512, width=512, steps=3)
    with torch.inference_mode():
        image = env["nodes"].VAEDecode().decode(vae, {"samples": latent})[0]
    assert latent.shape == (1, 4, 64, 64) and torch.isfinite(latent).all() and latent.std() > 0
    assert image.shape == (1, 512, 512, 3) and torch.isfinite(image).all()
    assert all(w.dtype == torch.bfloat16 and torch.isfinite(w).all() for w in maps)
    assert any(w.shape[-2:] == (64, 64) for w in maps)   # full-resolution points ran


def test_aggregator_files_cross_dtypes_both_ways(env):
    """fp32-trained into a bf16 ensemble, bf16-saved into an fp32 ensemble: loaded values are the
    file's (rounded to the compute dtype at most), and the maps agree with the same experts'
    maps under an fp32 aggregator within bf16 rounding."""
    from afa_nodes.ensemble_model import require_ensemble
    fp32 = [load(env, i, torch.float32, torch.float32)[0] for i in (0, 1)]
    bf16 = [load(env, i, torch.bfloat16, torch.bfloat16)[0] for i in (0, 1)]
    probe = env["ens"].build_ensemble(fp32, ["a", "b"])
    saved32 = random_aggregator(env, probe, 2, "agg-fp32.safetensors", torch.float32, seed=1, std=0.5)
    saved16 = random_aggregator(env, probe, 2, "agg-bf16.safetensors", torch.bfloat16, seed=1, std=0.5)
    assert {t.dtype for t in saved16.state_dict.values()} == {torch.bfloat16}
    clip = load(env, 0)[1]
    pos, neg = encode(env, clip, "a castle"), encode(env, clip, "")
    runs = {}
    for key, patchers, file, precision, want in (("32 in 32", fp32, saved32, "auto", torch.float32),
                                                 ("32 in bf16", bf16, saved32, "auto", torch.bfloat16),
                                                 ("32 in bf16, fp32 aggregator", bf16, saved32, "fp32", torch.float32),
                                                 ("bf16 in 32", fp32, saved16, "auto", torch.float32)):
        model = ensemble(env, patchers, "aggregator", file, precision)
        params = dict(require_ensemble(model).aggregator.named_parameters())
        assert {p.dtype for p in params.values()} == {want}, key
        for k, p in params.items():   # loaded values: the file's, rounded to `want` at most
            assert torch.equal(p, file.state_dict[k].to(want)), (key, k)
        model, maps = recorded(env, model)
        out = sample(env, model, pos, neg, steps=1)
        assert torch.isfinite(out).all() and all(torch.isfinite(w).all() for w in maps), key
        runs[key] = maps
    errors = {}
    for key, reference in (("32 in bf16", "32 in bf16, fp32 aggregator"), ("bf16 in 32", "32 in 32")):
        assert len(runs[key]) == len(runs[reference]) > 0
        diffs = [(a.float() - b.float()).abs() for a, b in zip(runs[key], runs[reference])]
        errors[key] = (max(float(d.max()) for d in diffs), float(torch.cat([d.flatten() for d in diffs]).mean()))
    spread = max(float(w.float().max() - w.float().min()) for w in runs["32 in 32"])
    # measured (max, mean) |weight difference|: 32 in bf16 (0.055, 0.0039), bf16 in 32 (0.011, 0.0011),
    # with maps spanning 0..1; allowed: max 0.1, mean 2**-7 (two bf16 steps at 1)
    assert spread > 0.5   # the maps are far from uniform: a difference would show
    assert all(0 < big <= 0.1 and mean <= 2 ** -7 for big, mean in errors.values()), errors
