"""Win maps and held-out evaluation, host-free (afa_nodes.core.winmap): two tiny experts trained
on different halves of a toy dataset each win on their own half; an aggregator trained on both
beats each of them on held-out data. No ComfyUI needed."""
import numpy as np
import pytest
import torch
from torch import nn

from afa_nodes.core.ensemble import EnsembleExecutor, SABWMixer, uniform_mixer
from afa_nodes.core.errors import AFAError
from afa_nodes.core.image_file import to_pil
from afa_nodes.core.layout import AggregationPoint, UNetLayout
from afa_nodes.core.train import NoiseSchedule, TrainConfig, TrainData, predict, train_aggregator
from afa_nodes.core.winmap import DOMINANT_SHARE, Ensembled, measure, region_errors, step_indices
from afa_nodes.core.winmap_render import render_eval_plot, render_overview, render_share_plot, render_steps

pytestmark = pytest.mark.usefixtures("one_thread")
C, CTX, TEMB, HID = 4, 8, 8, 24
SCHEDULE = NoiseSchedule.scaled_linear(100)
LAYOUT = UNetLayout(points=(AggregationPoint("input", 0, HID), AggregationPoint("middle", 0, HID),
                            AggregationPoint("final", 0, C)), context_dim=CTX, time_embed_dim=TEMB, adm_dim=0)
NAMES = ["red.safetensors", "blue.safetensors"]


class TinyUNet(nn.Module):
    """A per-pixel denoiser in the executor's expert interface (embed, run_block, head)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.mid = nn.Conv2d(C + TEMB, HID, 1), nn.Conv2d(HID, HID, 1)
        self.out, self.final = nn.Conv2d(2 * HID, HID, 1), nn.Conv2d(HID, C, 1)

    def embed(self, timesteps, y, dtype):
        sigma = SCHEDULE.sigmas[timesteps.long()].to(dtype)
        return torch.log(sigma)[:, None] * torch.linspace(0.2, 1.6, TEMB, dtype=dtype)

    def run_block(self, stage, index, h, emb, context, output_shape=None):
        if stage == "input":
            e = emb[:, :, None, None].expand(-1, -1, *h.shape[-2:])
            return torch.relu(self.inp(torch.cat([h, e], 1)))
        return torch.relu(self.mid(h) if stage == "middle" else self.out(h))

    def head(self, h):
        return self.final(h)


def toy_samples(n, seed, kinds=(+1, -1)):
    """Latents of two kinds: "red" (+1 on channel 0, -1 on channel 1) and "blue" (the opposite),
    plus texture; the caption encoding names the kind."""
    g = torch.Generator().manual_seed(seed)
    caption = {k: torch.full((3, CTX), float(k)) for k in (+1, -1)}
    out = []
    for j in range(n):
        kind = kinds[j % len(kinds)]
        base = torch.tensor([kind, -kind, 0.5 * kind, 0.0]).view(C, 1, 1)
        latent = base + 0.2 * torch.randn(C, 8, 8, generator=g)
        out.append({"latent": latent, "contexts": [caption[kind]] * 2, "kind": kind})
    return out


def train_expert(seed, samples, steps=150):
    """Plain eps-MSE training of one TinyUNet alone (an 'expert fine-tuned on its half')."""
    model = TinyUNet(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    single = EnsembleExecutor(LAYOUT, uniform_mixer(3, 1))
    g = torch.Generator().manual_seed(seed)
    x0 = torch.stack([s["latent"] for s in samples])
    ctx = torch.stack([s["contexts"][0] for s in samples])
    for _ in range(steps):
        t = torch.randint(len(SCHEDULE), (len(samples),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        sigma = SCHEDULE.sigmas[t]
        x_in = SCHEDULE.model_input(sigma, SCHEDULE.noised(x0, noise, sigma))
        loss = (predict(single, [model], x_in, t.float(), [ctx], [None]) - noise).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def experts():
    red, blue = toy_samples(16, 1, kinds=(+1,)), toy_samples(16, 2, kinds=(-1,))
    return [train_expert(0, red), train_expert(1, blue)]


def test_step_indices_spread_like_a_sampler_and_regions_pool_the_error():
    assert step_indices(1000, 4) == [999, 749, 500, 250]
    assert step_indices(100, 1) == [99]
    with pytest.raises(AFAError, match="steps must be 1..50"):
        step_indices(1000, 0)
    pred, target = torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)
    pred[0, :, :2, :2] = 2.0  # top-left quarter wrong by 2 on every channel
    errs = region_errors(pred, target, (2, 2))
    assert errs.shape == (1, 2, 2) and errs[0].tolist() == [[4.0, 0.0], [0.0, 0.0]]


def test_each_expert_wins_on_its_own_half(experts):
    half = {kind: toy_samples(6, 7, kinds=(kind,)) for kind in (+1, -1)}
    calls = []
    progress = lambda done, total: calls.append((done, total))  # noqa: E731
    on_red = measure(experts, LAYOUT, SCHEDULE, half[+1], NAMES, steps=4, seeds=(0, 1), grid=4, progress=progress)
    on_blue = measure(experts, LAYOUT, SCHEDULE, half[-1], NAMES, steps=4, seeds=(0, 1), grid=4)
    red_share, blue_share = on_red.win_share(), on_blue.win_share()
    assert red_share[0] >= DOMINANT_SHARE and blue_share[1] >= DOMINANT_SHARE, (red_share, blue_share)
    assert on_red.mean_errors()[0] < on_red.mean_errors()[1] and on_blue.mean_errors()[1] < on_blue.mean_errors()[0]
    assert on_red.verdict().startswith("red dominates everywhere") and "will not help much" in on_red.verdict()
    assert on_blue.verdict().startswith("blue dominates everywhere")
    # both halves together: each model wins its half, so they are complementary
    both = measure(experts, LAYOUT, SCHEDULE, half[+1] + half[-1], NAMES, steps=4, seeds=(0, 1), grid=4)
    assert 0.3 < both.win_share()[0] < 0.7 and both.oracle_gain() > 0.1
    assert both.verdict().startswith("models are complementary here")
    assert calls[-1] == (24, 24) and len(calls) == 24  # one call per (image, step)
    assert on_red.samples == 12 and on_red.images == 6 and on_red.grid == (4, 4)
    assert on_red.winners().shape == (4, 4, 4) and (on_red.winners() == 0).float().mean() > 0.8
    d = both.to_dict()
    assert d["models"] == NAMES and len(d["win_share_per_step"]) == 4 and d["verdict"] == both.verdict()


def test_identical_models_are_nearly_the_same_not_dominant(experts):
    table = measure([experts[0], experts[0]], LAYOUT, SCHEDULE, toy_samples(4, 3), NAMES, steps=2, grid=2)
    assert table.oracle_gain() == 0.0 and table.verdict().startswith("the models make nearly the same errors")


class Counting:
    """Counts forward passes (first input block calls, per batch row) of a wrapped expert."""

    def __init__(self, expert):
        self.expert, self.rows = expert, 0

    def embed(self, *a):
        return self.expert.embed(*a)

    def run_block(self, stage, index, h, *a):
        if stage == "input" and index == 0:
            self.rows += h.shape[0]
        return self.expert.run_block(stage, index, h, *a)

    def head(self, h):
        return self.expert.head(h)


def test_cost_is_n_passes_per_sample_and_cancel_stops_early(experts):
    counted = [Counting(e) for e in experts]
    samples = toy_samples(3, 4)
    table = measure(counted, LAYOUT, SCHEDULE, samples, NAMES, steps=5, seeds=(0, 1, 2))
    per_sample = [c.rows / (3 * 3 * 5) for c in counted]   # images x seeds x steps
    assert per_sample == [1.0, 1.0] and table.samples == 9
    polls = []
    stop = lambda: polls.append(1) or len(polls) > 2  # noqa: E731 - stop at the 3rd (image, step)
    partial = measure(counted, LAYOUT, SCHEDULE, samples, NAMES, steps=5, should_stop=stop)
    assert partial.stopped and partial.samples == 0 and float(partial.wins.sum()) == 2 * 64


def test_trained_aggregator_beats_both_experts_on_held_out_data(experts, tmp_path):
    train = toy_samples(24, 5)
    held_out = toy_samples(8, 6)
    config = TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=2, save_every=0, seed=0, hidden=32, heads=4,
                         depth=1, caption_dropout=0.0)
    result = train_aggregator(experts, LAYOUT, TrainData(train=train, val=held_out[:2]), SCHEDULE, config,
                              tmp_path / "agg.safetensors", [{"name": n, "sha256": None} for n in NAMES])
    agg = result.aggregator.eval()
    ens = Ensembled("AFA aggregator", EnsembleExecutor(LAYOUT, SABWMixer(agg)), [0, 1])
    table = measure(experts, LAYOUT, SCHEDULE, held_out, NAMES, steps=4, seeds=(0, 1), grid=4, ensemble=ens)
    rows = {r["name"]: r["loss"] for r in table.rows()}
    assert table.rows()[0]["name"] == "AFA aggregator"
    assert rows["AFA aggregator"] < 0.8 * min(rows[n] for n in NAMES), rows
    average = Ensembled("block-wise average", EnsembleExecutor(LAYOUT, uniform_mixer(3, 2)), [0, 1])
    untrained = measure(experts, LAYOUT, SCHEDULE, held_out, NAMES, steps=4, seeds=(0, 1), grid=4, ensemble=average)
    assert rows["AFA aggregator"] < untrained.rows()[0]["loss"]
    # the pictures: one per step, the share plot, the evaluation bars, the overview
    steps = render_steps(table)
    assert steps.shape[0] == 4 and steps.shape[-1] == 3 and steps.std() > 0
    for image in (render_share_plot(table), render_eval_plot(table), render_overview(table)):
        assert image.shape[0] == 1 and image.shape[-1] == 3 and 0 <= image.min() and image.max() <= 1
    colours = np.unique(np.asarray(to_pil(steps[:1])).reshape(-1, 3), axis=0)
    assert len(colours) > 4  # both models' colours, pale and strong, and the text
