"""The aggregator's cost (issue #15 parts 3, 4): the leaner SABW forward and mix equal the
previous implementation (copied below as the reference), trained weights keep their keys and
shapes, and the full-resolution options (pooled attention, half resolution) do what they say,
only at the full-resolution points, selected by EnsembleSpec.full_res. No ComfyUI needed."""
import hashlib

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from test_core import TOY_LAYOUT, ToyExpert, toy_inputs

from afa_nodes.core.ensemble import (ConstantMixer, EnsembleExecutor, SABWMixer, _Engine, mixer_for,
                                     uniform_mixer)
from afa_nodes.core.errors import AFAError
from afa_nodes.core.sabw import Aggregator, SABWConfig, TransformerBlock, TORCH_OPERATIONS, pooled_tokens
from afa_nodes.core.spec import EnsembleSpec, FullRes, Mode, StepContext, parse_full_res


# ---------------------------------------------------------------- the previous implementation
def reference_block(block, features, temb, context):
    """SABWBlock.forward before issue #15 part 4 (stacked features, einops layouts)."""
    x = block.conv_in(rearrange(features, "b n c h w -> b (n c) h w"))
    x = block.res_block(x, temb)
    x = reference_transformer(block.transformer, x, context)
    return torch.softmax(block.conv_out(x).float(), dim=1).to(features.dtype)


def reference_transformer(t, x, context):
    _, _, height, width = x.shape
    h = rearrange(t.proj_in(t.norm(x)), "b c h w -> b (h w) c")
    for blk in t.transformer_blocks:
        n = blk.norm1(h)
        h = h + blk.attn1(n, n)
        h = h + blk.attn2(blk.norm2(h), context)
        h = h + reference_feed_forward(blk.ff, blk.norm3(h))
    h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
    return x + t.proj_out(h)


def reference_feed_forward(ff, x):
    for layer in ff.net:   # all rows at once
        x = layer(x)
    return x


def reference_mix(outs, w):
    """_Engine.mix's arithmetic before part 4: a stacked copy of the N maps."""
    features = torch.stack(outs, dim=1)
    w = w.unsqueeze(2)
    return outs[0] + ((features[:, 1:] - features[:, :1]) * w[:, 1:]).sum(dim=1)


def random_aggregator(n, channels=(8, 6), hidden=32, depth=2, seed=0):
    torch.manual_seed(seed)
    agg = Aggregator(list(channels), SABWConfig(n, hidden=hidden, heads=4, depth=depth, context_dim=12,
                                                time_embed_dim=16))
    agg.reset_parameters(seed)
    with torch.no_grad():
        for b in agg.blocks:
            b.conv_out.weight.normal_(0, 1.0)   # far from uniform: the maps carry information
    return agg.eval()


def point_inputs(n, c=8, h=5, w=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, n, c, h, w, generator=g), torch.randn(2, 16, generator=g),
            torch.randn(2, 7, 12, generator=g))


# ---------------------------------------------------------------- part 4: same numbers, less copying
@pytest.mark.parametrize("n,size", [(2, (5, 7)), (3, (8, 8)), (2, (17, 23))])   # 17x23: feed-forward in pieces
def test_forward_equals_the_previous_implementation(n, size):
    agg = random_aggregator(n)
    features, temb, context = point_inputs(n, h=size[0], w=size[1])
    with torch.no_grad():
        expected = reference_block(agg.blocks[0], features, temb, context)
        stacked = agg(0, features, temb, context)
        listed = agg(0, list(features.unbind(1)), temb, context)
    assert expected.std() > 0.05                  # non-trivial maps
    torch.testing.assert_close(stacked, expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(listed, expected, rtol=0, atol=2e-6)


def test_state_dict_keys_and_shapes_are_unchanged():
    """Aggregator files saved before keep loading: the same 39 keys and shapes per point
    (recorded from the implementation before part 4)."""
    agg = Aggregator([8], SABWConfig(2, hidden=32, heads=4, depth=1, context_dim=16, time_embed_dim=8))
    listing = "\n".join(f"{k} {tuple(v.shape)}" for k, v in agg.state_dict().items())
    assert len(agg.state_dict()) == 39, listing
    assert hashlib.sha256(listing.encode()).hexdigest()[:16] == "dcc796e2c19c7d1f", listing


@pytest.mark.parametrize("n", [2, 3])
def test_mix_equals_the_previous_arithmetic_and_keeps_identity(n):
    g = torch.Generator().manual_seed(3)
    outs = [torch.randn(2, 8, 5, 7, generator=g) for _ in range(n)]
    engine = _Engine(EnsembleExecutor(TOY_LAYOUT, uniform_mixer(5, n)), StepContext())
    agg = random_aggregator(n)
    engine.mixer = SABWMixer(agg)
    temb, context = torch.randn(2, 16, generator=g), torch.randn(2, 7, 12, generator=g)
    with torch.no_grad():
        w = agg(0, torch.stack(outs, 1), temb, context)
        mixed = engine.mix(0, outs, temb, context)
        same = engine.mix(0, [outs[0]] * n, temb, context)
    assert len(mixed) == n and all(m is mixed[0] for m in mixed)
    torch.testing.assert_close(mixed[0], reference_mix(outs, w), rtol=0, atol=1e-6)
    assert torch.equal(same[0], outs[0])           # N copies of one model are that model, bit for bit
    engine.mixer = ConstantMixer([[0.25] + [0.75 / (n - 1)] * (n - 1)] * 5)
    torch.testing.assert_close(engine.mix(1, outs, temb, context)[0],
                               reference_mix(outs, engine.mixer.weights(1, outs, temb, context)), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- part 3: the options
def test_pooled_tokens_average_2x2_and_odd_edges():
    grid = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)   # (batch, d, h, w)
    tokens = grid.flatten(2).transpose(1, 2)                                   # (batch, h*w, d)
    pooled = pooled_tokens(tokens, (5, 7)).transpose(1, 2).unflatten(2, (3, 4))
    assert pooled.shape == (2, 3, 3, 4)
    assert torch.equal(pooled[..., 0, 0], grid[..., 0:2, 0:2].mean((-2, -1)))
    assert torch.equal(pooled[..., 2, 3], grid[..., 4, 6])                     # corner: one position
    assert torch.equal(pooled[..., 1, 3], grid[..., 2:4, 6].mean(-1))          # edge: two positions


def test_pooled_attention_is_exact_when_2x2_neighbours_agree():
    """Keys/values repeated 4 times give the same softmax as the 4x fewer pooled ones."""
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, 12, TORCH_OPERATIONS).eval()
    small = torch.randn(2, 32, 3, 4)
    tokens = F.interpolate(small, scale_factor=2, mode="nearest").flatten(2).transpose(1, 2)   # (2, 48, 32)
    context = torch.randn(2, 7, 12)
    with torch.no_grad():
        exact, pooled = block(tokens, context), block(tokens, context, (6, 8))
        other = block(tokens + 0.5 * torch.randn_like(tokens), context, (6, 8))
    torch.testing.assert_close(pooled, exact, rtol=0, atol=2e-5)
    assert (other - block(tokens + 0, context)).abs().max() > 1e-2   # the check can fail


def test_half_resolution_is_the_block_on_pooled_features_upsampled():
    """On 2x2-constant features, HALF = the exact block on the small features, its logits
    upsampled bilinearly (log-weights differ from logits by a per-position constant)."""
    agg = random_aggregator(2)
    small, temb, context = point_inputs(2, h=3, w=4)
    big = F.interpolate(small.flatten(1, 2), scale_factor=2, mode="nearest").unflatten(1, (2, 8))
    with torch.no_grad():
        half = agg(0, big, temb, context, FullRes.HALF)
        log_w = agg(0, small, temb, context).log()
        exact_big = agg(0, big, temb, context)
    expected = torch.softmax(F.interpolate(log_w, size=(6, 8), mode="bilinear", align_corners=False), dim=1)
    assert half.shape == (2, 2, 6, 8)
    torch.testing.assert_close(half, expected, rtol=0, atol=2e-6)
    assert (half - exact_big).abs().max() > 1e-3                   # an approximation, not the exact block
    odd = agg(0, point_inputs(2, h=5, w=7)[0], temb, context, FullRes.HALF)
    assert odd.shape == (2, 2, 5, 7) and torch.allclose(odd.sum(1), torch.ones(2, 5, 7))


@pytest.mark.parametrize("option", [FullRes.POOLED, FullRes.HALF])
def test_mixer_applies_the_option_only_at_the_full_resolution_points(option):
    agg = random_aggregator(2, channels=(8, 8, 8))
    seen = []
    for block in agg.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append((args[0][0].shape[-2:], args[3])))
    mixer = SABWMixer(agg, full_res=option)
    temb, context = torch.randn(2, 16), torch.randn(2, 7, 12)
    feats = {side: [torch.randn(2, 8, side, side)] * 2 for side in (8, 4)}
    with torch.no_grad():
        # a call at 8x8, then one at 4x4 (its full resolution); then the same without begin(), as
        # training calls it with batches of two bucket sizes
        for call, side_by_point in enumerate(([8, 4, 8], [4, 4], [8, 4, 8], [4, 4])):
            if call < 2:
                mixer.begin(None)
            for point, side in enumerate(side_by_point):
                mixer.weights(point, feats[side], temb, context)
    expected = [((8, 8), option), ((4, 4), FullRes.EXACT), ((8, 8), option), ((4, 4), option), ((4, 4), option)]
    assert [(tuple(s), o) for s, o in seen] == expected * 2


@pytest.mark.parametrize("option", list(FullRes))
def test_options_run_the_ensemble_keep_identity_and_train(option):
    x, t, c = toy_inputs()
    agg = random_aggregator(2, channels=TOY_LAYOUT.point_channels)
    expert = ToyExpert(0)
    mixer = mixer_for(EnsembleSpec(mode=Mode.AGGREGATOR, aggregator="a", full_res=option).checked(2),
                      TOY_LAYOUT, 2, agg)
    assert mixer.full_res is option
    executor = EnsembleExecutor(TOY_LAYOUT, mixer)
    with torch.no_grad():
        alone = EnsembleExecutor(TOY_LAYOUT, uniform_mixer(5, 1))([expert], x, t, [c])
        assert torch.equal(executor([expert, expert], x, t, [c, c]), alone)
    agg.train()
    out = executor([ToyExpert(0), ToyExpert(1)], x, t, [c, c])
    out.square().mean().backward()
    assert agg.blocks[0].conv_out.weight.grad.abs().sum() > 0


def test_spec_field_parses_validates_and_round_trips():
    spec = EnsembleSpec.from_ui(["a", "b"], "aggregator", "agg.safetensors", full_res="pooled_attention").checked()
    assert spec.full_res is FullRes.POOLED
    assert EnsembleSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["full_res"] == "pooled attention"
    assert EnsembleSpec.from_ui(["a", "b"]).checked().full_res is FullRes.EXACT      # default: the paper's
    assert EnsembleSpec.from_dict({"checkpoints": ["a", "b"]}).full_res is FullRes.EXACT  # older metadata
    assert parse_full_res("Half Resolution") is FullRes.HALF
    with pytest.raises(AFAError, match="exact, pooled attention, half resolution"):
        parse_full_res("quarter")
    with pytest.raises(AFAError, match="full-resolution option"):
        EnsembleSpec(("a", "b"), full_res="fast").checked()
