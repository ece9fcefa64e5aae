"""Host-free core: SABW architecture, layout, executor, aggregator files. No ComfyUI needed."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from afa_nodes.core.aggregator_file import (check_fits, import_research_aggregator, load_aggregator,
                                            save_aggregator)
from afa_nodes.core.ensemble import (ConstantMixer, EnsembleExecutor, SABWMixer, fixed_weights_mixer,
                                     noise_average_mixer, uniform_mixer)
from afa_nodes.core.errors import AggregatorFileError, AggregatorMismatchError, AFAError
from afa_nodes.core.layout import AggregationPoint, UNetLayout
from afa_nodes.core.sabw import Aggregator, SABWConfig, count_parameters
from afa_nodes.core.spec import StepContext

# SD1.5's 25 aggregation points (afa-method.md): 12 input, middle, 11 output, final eps.
SD15_CHANNELS = [320] * 4 + [640] * 3 + [1280] * 5 + [1280] + [1280] * 6 + [640] * 3 + [320] * 2 + [4]


@pytest.mark.parametrize("n,expected", [(2, 42_425_344), (3, 45_132_416), (4, 47_839_488)])
def test_sabw_parameter_counts_match_paper(n, expected):
    with torch.device("meta"):
        agg = Aggregator(SD15_CHANNELS, SABWConfig(num_models=n))
    assert count_parameters(agg) == expected


def test_fresh_aggregator_gives_uniform_weights():
    torch.manual_seed(0)
    agg = Aggregator([8, 4], SABWConfig(num_models=3, hidden=32, heads=4, context_dim=16, time_embed_dim=24))
    w = agg(0, torch.randn(2, 3, 8, 5, 7), torch.randn(2, 24), torch.randn(2, 6, 16))
    assert w.shape == (2, 3, 5, 7)
    assert torch.equal(w, torch.full_like(w, 1 / 3))


class ToyExpert:
    """A tiny LDM-like UNet: input blocks downsample, output blocks consume skips."""

    def __init__(self, seed, c=8, t=16, ctx=12):
        g = torch.Generator().manual_seed(seed)
        self.w_in = [torch.randn(c, 4 if i == 0 else c, generator=g) * 0.3 for i in range(2)]
        self.w_mid = torch.randn(c, c, generator=g) * 0.3
        self.w_out = [torch.randn(c, 2 * c, generator=g) * 0.3 for _ in range(2)]
        self.w_head = torch.randn(4, c, generator=g) * 0.3
        self.w_t = torch.randn(c, t, generator=g) * 0.3
        self.w_ctx = torch.randn(c, ctx, generator=g) * 0.3

    def embed(self, timesteps, y, dtype):
        return torch.sin(timesteps[:, None] * torch.arange(1, 17, dtype=dtype) / 100)

    def _apply(self, w, h, emb, context):
        bias = emb @ self.w_t.T + context.mean(1) @ self.w_ctx.T
        return torch.tanh(torch.einsum("oc,bchw->bohw", w, h) + bias[:, :, None, None])

    def run_block(self, stage, index, h, emb, context, output_shape=None):
        if stage == "input":
            return self._apply(self.w_in[index], h, emb, context)
        if stage == "middle":
            return self._apply(self.w_mid, h, emb, context)
        return self._apply(self.w_out[index], h, emb, context)

    def head(self, h):
        return torch.einsum("oc,bchw->bohw", self.w_head, h)


TOY_LAYOUT = UNetLayout(points=(AggregationPoint("input", 0, 8), AggregationPoint("input", 1, 8),
                                AggregationPoint("middle", 0, 8), AggregationPoint("output", 0, 8),
                                AggregationPoint("final", 1, 4)),
                        context_dim=12, time_embed_dim=16, adm_dim=0)


def toy_inputs():
    torch.manual_seed(1)
    return torch.randn(2, 4, 6, 5), torch.tensor([10.0, 700.0]), torch.randn(2, 7, 12)


def reference_forward(expert, x, t, c):
    """The same toy UNet run the plain way."""
    emb, skips, h = expert.embed(t, None, x.dtype), [], x
    for i in range(2):
        h = expert.run_block("input", i, h, emb, c)
        skips.append(h)
    h = expert.run_block("middle", 0, h, emb, c)
    for i in range(2):
        h = expert.run_block("output", i, torch.cat([h, skips.pop()], 1), emb, c)
    return expert.head(h)


def test_single_expert_reproduces_plain_forward():
    x, t, c = toy_inputs()
    expert = ToyExpert(0)
    out = EnsembleExecutor(TOY_LAYOUT, uniform_mixer(5, 1))([expert], x, t, [c])
    assert torch.equal(out, reference_forward(expert, x, t, c))


def test_copies_of_one_model_equal_it_for_any_weights():
    x, t, c = toy_inputs()
    expert = ToyExpert(0)
    g = torch.Generator().manual_seed(3)
    rows = [torch.rand(3, generator=g) for _ in range(5)]
    mixer = ConstantMixer([(r / r.sum()).tolist() for r in rows])
    out = EnsembleExecutor(TOY_LAYOUT, mixer)([expert] * 3, x, t, [c] * 3)
    assert (out - reference_forward(expert, x, t, c)).abs().max() < 1e-5


def test_noise_average_equals_mean_of_separate_models():
    x, t, c = toy_inputs()
    experts = [ToyExpert(0), ToyExpert(1)]
    out = EnsembleExecutor(TOY_LAYOUT, noise_average_mixer(5, 2))(experts, x, t, [c, c])
    expected = (reference_forward(experts[0], x, t, c) + reference_forward(experts[1], x, t, c)) / 2
    assert (out - expected).abs().max() < 1e-6
    blockwise = EnsembleExecutor(TOY_LAYOUT, uniform_mixer(5, 2))(experts, x, t, [c, c])
    assert (blockwise - expected).abs().max() > 1e-3  # mixing every block is a different model


def test_zero_init_sabw_equals_blockwise_average_and_records_maps():
    x, t, c = toy_inputs()
    experts = [ToyExpert(0), ToyExpert(1), ToyExpert(2)]
    agg = Aggregator(TOY_LAYOUT.point_channels, SABWConfig(3, hidden=32, heads=4, context_dim=12, time_embed_dim=16))
    seen = []
    ctx = StepContext(recorder=lambda p, w, ctx: seen.append((p, w.shape)))
    out = EnsembleExecutor(TOY_LAYOUT, SABWMixer(agg))(experts, x, t, [c] * 3, ctx=ctx)
    avg = EnsembleExecutor(TOY_LAYOUT, uniform_mixer(5, 3))(experts, x, t, [c] * 3)
    assert torch.equal(out, avg)
    assert [p for p, _ in seen] == [0, 1, 2, 3, 4] and seen[0][1] == (2, 3, 6, 5)


def test_sabw_trains_through_the_executor_with_checkpointing():
    x, t, c = toy_inputs()
    experts = [ToyExpert(0), ToyExpert(1)]
    agg = Aggregator(TOY_LAYOUT.point_channels, SABWConfig(2, hidden=32, heads=4, context_dim=12, time_embed_dim=16))
    for checkpoint in (False, True):
        agg.zero_grad()
        out = EnsembleExecutor(TOY_LAYOUT, SABWMixer(agg), checkpoint_blocks=checkpoint)(experts, x, t, [c, c])
        out.square().mean().backward()
        grads = [p.grad for p in agg.blocks[0].parameters() if p.grad is not None]
        assert grads and agg.blocks[0].conv_out.weight.grad.abs().sum() > 0


def test_fixed_weights_validation():
    with pytest.raises(AFAError, match=">= 0"):
        fixed_weights_mixer(TOY_LAYOUT, {"input": [1, -1], "middle": [1, 1], "output": [1, 1]})
    mixer = fixed_weights_mixer(TOY_LAYOUT, {"input": [3, 1], "middle": [1, 1], "output": [0, 2]})
    assert mixer.table[0].tolist() == [0.75, 0.25] and mixer.table[4].tolist() == [0.0, 1.0]


def small_aggregator(n=2):
    return Aggregator(TOY_LAYOUT.point_channels, SABWConfig(n, hidden=32, heads=4, context_dim=12, time_embed_dim=16))


def test_aggregator_file_roundtrip_and_validation(tmp_path, caplog):
    agg = small_aggregator()
    torch.nn.init.normal_(agg.blocks[0].conv_out.weight)
    experts = [{"name": "a.safetensors", "sha256": "aa"}, {"name": "b.safetensors", "sha256": "bb"}]
    path = tmp_path / "agg.safetensors"
    save_aggregator(path, agg, TOY_LAYOUT, experts, {"steps": 5})
    assert [p.name for p in tmp_path.iterdir()] == ["agg.safetensors"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    loaded = load_aggregator(path)
    assert loaded.training == {"steps": 5} and loaded.config == agg.config
    rebuilt = loaded.build()
    assert torch.equal(rebuilt.blocks[0].conv_out.weight, agg.blocks[0].conv_out.weight)
    assert check_fits(loaded, TOY_LAYOUT, ["a.safetensors", "b.safetensors"], ["aa", "bb"])
    assert not check_fits(loaded, TOY_LAYOUT, ["a.safetensors", "c.safetensors"], ["aa", "cc"])
    assert "a.safetensors" in caplog.text and "c.safetensors" in caplog.text
    with pytest.raises(AggregatorMismatchError, match="trained for 2 models, this ensemble has 3"):
        check_fits(loaded, TOY_LAYOUT, ["a", "b", "c"])
    other = UNetLayout(points=TOY_LAYOUT.points[:4], context_dim=12, time_embed_dim=16, adm_dim=0)
    with pytest.raises(AggregatorMismatchError, match="another architecture"):
        check_fits(loaded, other, ["a", "b"])


def test_bad_aggregator_files_raise_typed_errors(tmp_path):
    with pytest.raises(AggregatorFileError, match="not found"):
        load_aggregator(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not safetensors")
    with pytest.raises(AggregatorFileError, match="junk.safetensors is not a readable"):
        load_aggregator(junk)
    plain = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(AggregatorFileError, match="no AFA metadata"):
        load_aggregator(plain)
    good = tmp_path / "good.safetensors"
    save_aggregator(good, small_aggregator(), TOY_LAYOUT, [])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(AggregatorFileError, match="truncated.safetensors"):
        load_aggregator(truncated)


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "agg.safetensors"
    save_aggregator(path, small_aggregator(), TOY_LAYOUT, [], {"steps": 1})
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("afa_nodes.core.aggregator_file.save_file", disk_full)
    with pytest.raises(OSError):
        save_aggregator(path, small_aggregator(), TOY_LAYOUT, [], {"steps": 2})
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_import_research_code_aggregators(tmp_path):
    """aggregator_{j}/aggregator.safetensors + config.json, keys as the research code saves them."""
    source = small_aggregator()
    for j, block in enumerate(source.blocks):
        folder = tmp_path / f"aggregator_{j}"
        folder.mkdir()
        nn.init.normal_(block.conv_out.weight)
        save_file({k: v.contiguous() for k, v in block.state_dict().items()}, str(folder / "aggregator.safetensors"))
        (folder / "config.json").write_text(json.dumps({
            "in_channels": TOY_LAYOUT.points[j].channels, "hidden_size": 32, "num_experts": 2, "num_layers": 1,
            "num_attn_heads": 4, "cross_attn_dim": 12, "temb_channels": 16}))
    imported = import_research_aggregator(tmp_path, TOY_LAYOUT).build()
    assert imported.config.depth == 2  # the research code's num_layers clash makes 2 blocks
    for a, b in zip(imported.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)


def test_map_refresh_reuses_weights_within_a_run():
    x, t, c = toy_inputs()
    experts = [ToyExpert(0), ToyExpert(1)]
    agg = small_aggregator()
    calls = []
    forward = agg.forward
    agg.forward = lambda *a: calls.append(a[0]) or forward(*a)
    mixer = SABWMixer(agg, refresh_every=2)
    executor = EnsembleExecutor(TOY_LAYOUT, mixer)
    outs = [executor(experts, x, t, [c, c], ctx=StepContext(sigma=sigma, rows=(0, 1)))
            for sigma in (14.0, 7.0, 3.0, 14.0)]
    # steps 0 and 2 compute all 5 points, step 1 re-uses; 14.0 again is a new run: recomputed
    assert len(calls) == 3 * 5
    exact = EnsembleExecutor(TOY_LAYOUT, SABWMixer(agg))(experts, x, t, [c, c])
    assert torch.equal(outs[0], exact) and torch.equal(outs[3], exact)
