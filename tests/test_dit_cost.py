"""The aggregator's size and cost next to a DiT expert (core/dit_cost.py): the parameter formula
equals built aggregators, the MAC formulas equal torch's FLOP counter on real modules, and the
aggregator stays within 5% of one expert per step at 1024 px for FLUX.1 [dev] and SD3.5 large."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from afa_nodes.core.dit_cost import (REAL_MODELS, DiTSize, cost_row, expert_macs, sabw_parameters,
                                     sabw_point_macs)
from afa_nodes.core.sabw import Aggregator, SABWConfig, count_parameters


@pytest.fixture
def counted_attention(monkeypatch):
    """torch's FLOP counter skips fused CPU attention: count it as the two matrix products it is."""
    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        scores = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
        if attn_mask is not None:
            scores = scores + attn_mask
        return torch.softmax(scores, -1) @ v
    monkeypatch.setattr(F, "scaled_dot_product_attention", attention)


def flops(fn):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_parameter_formula_equals_built_aggregators():
    sd15 = [320] * 4 + [640] * 3 + [1280] * 5 + [1280] + [1280] * 6 + [640] * 3 + [320] * 2 + [4]
    assert sabw_parameters(sd15, SABWConfig(2)) == 42_425_344       # the paper's count (App. B)
    for config, channels in ((SABWConfig(3, hidden=32, heads=4, depth=1, context_dim=48, time_embed_dim=64), [64, 64, 16]),
                             (SABWConfig(2, context_dim=4096, time_embed_dim=96), [96, 64])):
        assert sabw_parameters(channels, config) == count_parameters(Aggregator(channels, config))


def test_aggregator_macs_equal_the_flop_counter(counted_attention):
    config = SABWConfig(2, hidden=64, heads=4, depth=2, context_dim=48, time_embed_dim=96)
    agg = Aggregator([96], config)
    features, temb, context = torch.randn(1, 2, 96, 8, 12), torch.randn(1, 96), torch.randn(1, 7, 48)
    assert flops(lambda: agg(0, features, temb, context)) == 2 * sabw_point_macs(96, config, 96, 7)


@pytest.mark.comfyui
def test_expert_macs_match_the_flop_counter_on_tiny_models(comfy, counted_attention):
    """ComfyUI's own FLUX and SD3 modules: the formula leaves out only the per-sample modulation
    and embedding MLPs (about 1% at this size, far less at real sizes)."""
    from afa_nodes import comfy_dit_models as dm
    x = torch.randn(1, 16, 16, 24)
    flux = dm.flux_patcher(1, hidden_size=128, num_heads=4, axes_dim=[16, 8, 8]).model.diffusion_model
    counted = flops(lambda: flux(x, torch.tensor([0.5]), torch.randn(1, 20, 48), y=torch.randn(1, 32),
                                 guidance=torch.tensor([3.5]), transformer_options={}))
    size = DiTSize("flux", 128, 2, 2, text_tokens=20, context_dim=48)
    assert 0.97 < 2 * expert_macs(size, size.grid_tokens(24 * 8, 16 * 8)) / counted <= 1.0
    sd3 = dm.sd3_patcher(1).model.diffusion_model
    counted = flops(lambda: sd3(x, torch.tensor([500.0]), context=torch.randn(1, 20, 4096), y=torch.randn(1, 2048),
                                transformer_options={}))
    size = DiTSize("mmdit", 128, 2, text_tokens=20, context_dim=4096)
    assert 0.97 < 2 * expert_macs(size, size.grid_tokens(24 * 8, 16 * 8)) / counted <= 1.0


def test_real_sizes_stay_within_five_percent_at_1024px():
    flux = cost_row("FLUX.1 [dev]", REAL_MODELS["FLUX.1 [dev]"], num_models=2)
    large = cost_row("SD3.5 large", REAL_MODELS["SD3.5 large"], num_models=2)
    medium = cost_row("SD3.5 medium", REAL_MODELS["SD3.5 medium"], num_models=2)
    medium_shallow = cost_row("SD3.5 medium", REAL_MODELS["SD3.5 medium"], num_models=2, depth=1)
    assert (flux["points"], flux["aggregator_parameters"]) == (58, 242_855_936)
    assert (large["points"], large["aggregator_parameters"]) == (39, 153_626_624)
    assert 60 < flux["expert_tflops"] < 80 and 25 < large["expert_tflops"] < 35   # ~12B / ~8B parameters
    assert flux["share_of_one_expert"] < 0.05 and large["share_of_one_expert"] < 0.05
    # SD3.5 medium is small next to its 4096-token grid: the paper's depth 2 exceeds 5%, depth 1 fits
    assert medium["share_of_one_expert"] > 0.05 > medium_shallow["share_of_one_expert"]


@pytest.mark.comfyui
def test_the_dit_benchmark_runs(comfy, one_thread):
    """benchmarks/dit_cost.py end to end at its smallest (the numbers in BENCHMARKS.md come from it)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import dit_cost
    computed, measured, _ = dit_cost.main(["--only", "computed", "measured", "--repeats", "1", "--size", "64"])
    assert {r["model"] for r in computed} == set(REAL_MODELS)
    variants = {(r["family"], r["variant"]) for r in measured}
    assert variants == {(f, v) for f in ("flux", "sd3") for v in ("N single steps", "block-wise average", "SABW")}
    sabw = [r for r in measured if r["variant"] == "SABW"]
    assert all(0 < r["share"] < 1 and 0 < r["flop_share"] < 1 for r in sabw)
