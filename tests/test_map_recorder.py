"""Host-free map recording: MapRecorder fed by the real executor on toy experts."""
import base64
import logging

import numpy as np
import pytest
import torch
from test_core import TOY_LAYOUT, ToyExpert

from afa_nodes.core.ensemble import EnsembleExecutor, SABWMixer
from afa_nodes.core.spec import StepContext
from afa_nodes.core.errors import AFAError
from afa_nodes.core.map_recorder import MapRecorder, get_run, map_payload, run_info, schedule_step
from afa_nodes.core.map_selection import StepSelection, parse_points
from afa_nodes.core.sabw import Aggregator, SABWConfig

NAMES = ["a.safetensors", "b.safetensors", "c.safetensors"]
POINTS = TOY_LAYOUT.point_names  # input 0, input 1, middle, output 0, final
SCHEDULE = [14.6, 7.0, 3.0, 1.0, 0.0]


def aggregator(zero=False, n=3):
    torch.manual_seed(0)
    agg = Aggregator(TOY_LAYOUT.point_channels, SABWConfig(n, hidden=32, heads=4, context_dim=12, time_embed_dim=16))
    if not zero:
        for block in agg.blocks:
            torch.nn.init.normal_(block.conv_out.weight, std=0.5)
    return agg


def sample(recorder, agg, batch=1, schedule=SCHEDULE, cou=(0, 1), sample_sigmas=True, extra_sigmas=()):
    """A toy 'sampling run': one executor call per sigma, rows = cond/uncond entries x batch."""
    experts = [ToyExpert(i) for i in range(agg.config.num_models)]
    executor = EnsembleExecutor(TOY_LAYOUT, SABWMixer(agg))
    g = torch.Generator().manual_seed(5)
    rows = batch * len(cou)
    x, c = torch.randn(rows, 4, 6, 5, generator=g), torch.randn(rows, 7, 12, generator=g)
    if recorder is not None:
        recorder.begin_run((batch, 4, 6, 5), schedule if not sample_sigmas else None)
    outs = []
    sigmas = sorted(list(schedule[:-1]) + list(extra_sigmas), reverse=True)
    for sigma in sigmas:
        ctx = StepContext(sigma=sigma, rows=tuple(cou), recorder=recorder,
                          schedule=torch.tensor(schedule) if sample_sigmas else None)
        with torch.no_grad():
            outs.append(executor(experts, x, torch.full((rows,), sigma * 50), [c] * len(experts), ctx=ctx))
    if recorder is not None:
        recorder.end_run(outs[-1][:batch])
    return outs


def test_maps_are_finite_sum_to_one_and_shaped_per_point():
    rec = MapRecorder(NAMES, POINTS, max_side=4)
    sample(rec, aggregator(), batch=2)
    run = rec.runs[-1]
    assert run.status == "finished" and run.maps.steps == [0, 1, 2, 3]
    assert run.maps.point_names == POINTS and run.maps.branches == ["cond", "uncond"]
    assert run.maps.sigmas == pytest.approx(SCHEDULE[:-1])
    for a in run.maps.maps.values():
        assert a.dtype == torch.float16 and a.shape == (2, 3, 4, 3)  # 6x5 pooled to max side 4
        assert torch.isfinite(a).all()
        assert torch.allclose(a.float().sum(1), torch.ones(2, 4, 3), atol=2e-3)
    w = run.maps.weights(0, "middle")
    assert (w - 1 / 3).abs().max() > 0.05  # a trained-like aggregator is not uniform


def test_full_resolution_when_under_max_side():
    rec = MapRecorder(NAMES, POINTS, points="final", max_side=64)
    sample(rec, aggregator())
    assert {a.shape for a in rec.runs[-1].maps.maps.values()} == {(1, 3, 6, 5)}


def test_zero_init_aggregator_gives_uniform_maps():
    rec = MapRecorder(NAMES, POINTS)
    sample(rec, aggregator(zero=True))
    for a in rec.runs[-1].maps.maps.values():
        assert (a.float() - 1 / 3).abs().max() < 1e-3


def test_recording_changes_no_output_bit():
    agg = aggregator()
    off = sample(None, agg, batch=2)
    on = sample(MapRecorder(NAMES, POINTS), agg, batch=2)
    assert all(torch.equal(a, b) for a, b in zip(off, on))


def test_cond_and_uncond_rows_are_kept_apart():
    rec = MapRecorder(["m0", "m1"], POINTS, points="middle")
    rec.begin_run((2, 4, 4, 4), SCHEDULE)
    # rows grouped per entry: cond_or_uncond [1, 0] -> rows 0-1 uncond, rows 2-3 cond (batch 2)
    w = torch.zeros(4, 2, 4, 4)
    w[:2, 1] = 1.0   # uncond: model 1 everywhere
    w[2:, 0] = 1.0   # cond: model 0 everywhere
    w[1, :, 0, 0] = torch.tensor([0.5, 0.5])  # second uncond image differs at one pixel
    rec(2, w, StepContext(sigma=14.6, rows=(1, 0)))
    rec.end_run(torch.zeros(2, 4, 4, 4))
    m = rec.runs[-1].maps
    assert m.weights(0, "middle", "cond", 0)[0].min() == 1 and m.weights(0, "middle", "cond", 1)[0].min() == 1
    assert m.weights(0, "middle", "uncond", 0)[1].min() == 1
    assert m.weights(0, "middle", "uncond", 1)[1, 0, 0] == 0.5


def test_cfg1_records_only_cond_and_several_conds_are_averaged():
    rec = MapRecorder(["m0", "m1"], POINTS, points="middle")
    rec.begin_run((1, 4, 2, 2), SCHEDULE)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[:, :, None, None].expand(2, 2, 2, 2)
    rec(2, w, StepContext(sigma=14.6, rows=(0, 0)))
    rec.end_run()
    m = rec.runs[-1].maps
    assert m.branches == ["cond"] and torch.allclose(m.weights(0, "middle"), torch.full((2, 2, 2), 0.5))


@pytest.mark.parametrize("spec,expected", [("all", [0, 1, 2, 3]), ("every 2", [0, 2, 3]),
                                           ("last 2", [2, 3]), ("0, 2-3", [0, 2, 3]), ("1", [1])])
@pytest.mark.parametrize("sample_sigmas", [True, False])
def test_step_selection(spec, expected, sample_sigmas):
    rec = MapRecorder(NAMES, POINTS, points="middle", steps=spec)
    sample(rec, aggregator(zero=True), sample_sigmas=sample_sigmas)
    assert sorted(rec.runs[-1].maps.steps) == expected
    assert len(rec.runs[-1].maps.sigmas) == len(expected)


def test_step_without_any_schedule_counts_distinct_sigmas():
    rec = MapRecorder(NAMES, POINTS, points="middle", steps="last 2")
    rec.begin_run((1, 4, 6, 5))  # no sigmas from the host, no schedule in the context
    w = torch.full((1, 3, 2, 2), 1 / 3)
    for sigma in (9.0, 9.0, 4.0, 2.0, 1.0):  # 9.0 twice = one step in two calls
        rec(2, w, StepContext(sigma=sigma))  # a new StepContext per model call
    rec.end_run()
    assert rec.runs[-1].maps.steps == [2, 3] and rec.runs[-1].maps.sigmas == [2.0, 1.0]


def test_intermediate_sigmas_belong_to_their_step_and_first_map_wins():
    assert schedule_step(5.0, SCHEDULE) == 1 and schedule_step(7.0, SCHEDULE) == 1
    assert schedule_step(20.0, SCHEDULE) == 0 and schedule_step(0.5, SCHEDULE) == 3
    rec = MapRecorder(NAMES, POINTS, points="middle")
    sample(rec, aggregator(), extra_sigmas=(5.0,))  # a Heun-like extra evaluation inside step 1
    m = rec.runs[-1].maps
    assert m.steps == [0, 1, 2, 3] and m.sigma(1) == pytest.approx(7.0)


def test_memory_cap_stops_recording_with_a_clear_message(caplog):
    per_map = 1 * 3 * 6 * 5 * 2  # bytes of one fp16 map [1, 3, 6, 5]
    rec = MapRecorder(NAMES, POINTS, cap_mb=(per_map * 7 + 1) / 2**20)
    with caplog.at_level(logging.WARNING, logger="ComfyUI-AFA"):
        sample(rec, aggregator())
    run = rec.runs[-1]
    assert len(run.maps.maps) == 7 and run.nbytes <= rec.cap_bytes and run.stopped
    assert "memory cap" in caplog.text and "Raise cap_mb" in caplog.text
    assert any("memory cap" in n for n in run.notes)
    # a new run evicts the older finished run before stopping itself
    sample(rec, aggregator())
    assert len(rec.runs) == 1 and len(rec.runs[0].maps.maps) == 7


def test_runs_are_separate_and_found_by_their_latent():
    rec = MapRecorder(NAMES, POINTS, points="middle")
    agg = aggregator()
    first = sample(rec, agg)[-1][:1]
    rec.begin_run((1, 4, 6, 5), SCHEDULE)
    rec(2, torch.full((2, 3, 6, 5), 1 / 3), StepContext(sigma=14.6, rows=(0, 1)))
    second_out = torch.ones(1, 4, 6, 5)
    rec.end_run(second_out)
    r1, r2 = rec.runs
    assert r1.run_id != r2.run_id
    assert rec.find_run(first) is r1 and rec.find_run(second_out.clone()) is r2
    assert rec.find_run(second_out.half()) is r2  # a dtype round trip still matches
    assert get_run(r1.run_id) is r1
    with pytest.raises(AFAError, match="not the output of a sampling run"):
        rec.find_run(torch.zeros(1, 4, 6, 5))
    with pytest.raises(AFAError, match="not the output"):
        rec.find_run(torch.ones(2, 4, 6, 5))  # other batch size


def test_find_run_explains_off_empty_and_unused():
    with pytest.raises(AFAError, match="recording was off"):
        MapRecorder.disabled(NAMES, POINTS).find_run(torch.zeros(1))
    rec = MapRecorder(NAMES, POINTS)
    with pytest.raises(AFAError, match="no sampling run has used"):
        rec.find_run(torch.zeros(1))
    rec = MapRecorder(NAMES, POINTS, steps="7")
    rec.begin_run((1, 4, 6, 5), SCHEDULE)
    rec.end_run(torch.zeros(1, 4, 6, 5))
    with pytest.raises(AFAError, match=r"recorded no maps.*steps \[7\] do not exist"):
        rec.find_run(torch.zeros(1, 4, 6, 5))
    rec = MapRecorder(NAMES, POINTS, mode="single model")
    rec.begin_run((1, 4, 6, 5), SCHEDULE)
    rec.end_run(torch.zeros(1, 4, 6, 5))
    with pytest.raises(AFAError, match="single model"):
        rec.find_run(torch.zeros(1, 4, 6, 5))


def test_interrupted_run_is_not_shown():
    rec = MapRecorder(NAMES, POINTS)
    rec.begin_run((1, 4, 6, 5), SCHEDULE)
    rec.abort_run("InterruptProcessingException")
    assert rec.runs[-1].status == "interrupted" and rec.current is None
    with pytest.raises(AFAError, match="not the output"):
        rec.find_run(torch.zeros(1, 4, 6, 5))


def test_parse_points_and_messages():
    sd15 = [f"input {i}" for i in range(12)] + ["middle"] + [f"output {i}" for i in range(11)] + ["final"]
    assert parse_points("all", sd15) == list(range(25))
    assert parse_points("1, 24", sd15) == [1, 24]
    assert parse_points("0-11", sd15) == list(range(12))
    assert parse_points("middle; Output 3, input_2, INPUT5", sd15) == [2, 5, 12, 16]
    assert parse_points("output", sd15) == list(range(13, 25))
    with pytest.raises(AFAError, match=r"point 25 does not exist.*25 aggregation points, 0-24.*middle = 12"):
        parse_points("25", sd15)
    with pytest.raises(AFAError, match="unknown aggregation point 'bottleneck'"):
        parse_points("bottleneck", sd15)
    with pytest.raises(AFAError, match="backwards"):
        parse_points("11-0", sd15)
    with pytest.raises(AFAError, match="no aggregation point"):
        parse_points(" , ", sd15)
    with pytest.raises(AFAError, match="cannot read steps"):
        StepSelection.parse("first 3")
    with pytest.raises(AFAError, match="at least 1"):
        StepSelection.parse("every 0")


def test_viewer_payloads():
    rec = MapRecorder(["left", "right"], POINTS, points="middle, final")
    rec.begin_run((1, 4, 2, 2), SCHEDULE)
    w = torch.tensor([[0.75, 0.25], [0.0, 1.0]]).T.reshape(1, 2, 1, 2).expand(1, 2, 2, 2)
    rec(2, w, StepContext(sigma=14.6, rows=(0,)))
    rec.end_run(torch.zeros(1, 4, 2, 2))
    run = rec.runs[-1]
    info = run_info(run)
    assert info["models"] == ["left", "right"] and info["points"] == ["middle"] and info["steps"] == [0]
    assert info["sizes"] == {"middle": [2, 2]} and len(info["palette"]) >= 2 and len(info["colormap"]) == 17
    p = map_payload(run, 0, "middle")
    data = np.frombuffer(base64.b64decode(p["data"]), dtype=np.uint8).reshape(p["shape"])
    assert p["shape"] == [2, 2, 2] and data[0, 0].tolist() == [191, 0] and data[1, 0].tolist() == [64, 255]
    with pytest.raises(AFAError, match="not recorded"):
        map_payload(run, 0, "final")


def test_points_of_a_dit_family_by_stage_name_and_middle():
    """FLUX points are 'double i', 'single i', 'final': stages select by their first word, and
    'middle' (the preview's default) is the middle point of a family without a middle block."""
    flux = [f"double {i}" for i in range(2)] + [f"single {i}" for i in range(3)] + ["final"]
    assert parse_points("single", flux) == [2, 3, 4]
    assert parse_points("double1, final", flux) == [1, 5]
    assert parse_points("middle", flux) == [3]
    with pytest.raises(AFAError, match="joint"):
        parse_points("joint", flux)
