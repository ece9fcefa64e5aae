"""Win maps inside real ComfyUI: the AFA Win Map and AFA Evaluate nodes on the synthetic SD1.5
checkpoints (as ComfyUI's executor runs them, under inference_mode), the service's cost (N
forward passes per sample, 2N with the ensemble) and cancel, and the `winmap` CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_dataset import make_dataset

import afa_nodes.core.winmap as core_winmap
from afa_nodes.core.errors import AFAError
from afa_nodes.core.spec import EnsembleSpec, Mode

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[1]
ARGS = dict(dataset_folder="afa_winmap_ds", steps=2, seeds=2, seed=0, grid=4, resolution=64, max_images=0)


@pytest.fixture(scope="module")
def env(comfy, comfy_nodes, sd15_checkpoints):
    make_dataset(comfy.input_dir / "afa_winmap_ds", n=4)
    with torch.inference_mode():
        loaded = comfy_nodes["AFAEnsembleLoader"].execute(
            ckpt_1=sd15_checkpoints[0].name, ckpt_2=sd15_checkpoints[1].name, aggregator="none",
            mode=Mode.BLOCK_AVERAGE.value, weights="", model_index=1).result
    return dict(nodes=comfy_nodes, ckpts=sd15_checkpoints, loaded=loaded, comfy=comfy)


@pytest.fixture
def counted(monkeypatch):
    """Counts model forward passes (experts x batch rows) of core.winmap's predict calls."""
    seen = []
    real = core_winmap.predict

    def counting(executor, experts, x, *rest):
        seen.append(len(experts) * x.shape[0])
        return real(executor, experts, x, *rest)
    monkeypatch.setattr(core_winmap, "predict", counting)
    return seen


def test_win_map_node_gives_pictures_and_a_verdict_at_n_passes_per_sample(env, counted):
    model, clip, vae = env["loaded"]
    with torch.inference_mode():
        out = env["nodes"]["AFAWinMap"].execute(model=model, clip=clip, vae=vae, **ARGS)
    winners, plot, verdict = out.result
    assert winners.shape[0] == 2 and winners.shape[-1] == 3 and winners.std() > 0   # one picture per step
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and 0 <= plot.min() and plot.max() <= 1
    assert any(v in verdict for v in ("complementary", "dominates everywhere", "nearly the same"))
    assert out.ui["text"] == (verdict,) and out.ui["images"]
    samples = 4 * 2                                            # images x seeds
    assert sum(counted) == 2 * samples * 2                     # N=2 passes per sample and step


def test_evaluate_node_puts_the_ensemble_beside_each_model(env, counted):
    model, clip, vae = env["loaded"]
    with torch.inference_mode():
        out = env["nodes"]["AFAEvaluate"].execute(model=model, clip=clip, vae=vae, **dict(ARGS, max_images=2))
    plot, report = out.result
    lines = report.splitlines()
    assert "held-out" in lines[0] and "2 image(s) x 2 seed(s)" in lines[0]
    assert lines[2].strip().startswith(f"ensemble: {Mode.BLOCK_AVERAGE.value}")
    assert [line.split()[0] for line in lines[3:]] == [p.name for p in env["ckpts"][:2]]
    assert report.count("<- best") == 1 and plot.shape[0] == 1 and plot.std() > 0
    assert sum(counted) == 2 * (2 * 2) * 2 * 2                 # 2N passes per sample and step


def test_evaluation_with_an_aggregator_file_any_mode_same_draws(env, comfy, models_dir):
    """A fresh (zero-initialised) aggregator IS the block-wise average: on the same draws its row
    equals the block-wise average's; fixed weights 1, 0 equal model 1 alone."""
    from afa_nodes.core.aggregator_file import save_aggregator
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    from afa_nodes.service import models, winmap
    from afa_nodes.training_host import experts_layout
    model, clip, vae = env["loaded"]
    experts = models.experts_of(model)
    layout = experts_layout(experts)
    agg = Aggregator(layout.point_channels, SABWConfig(num_models=2, hidden=32, heads=4, depth=1,
                                                       context_dim=layout.context_dim,
                                                       time_embed_dim=layout.time_embed_dim))
    save_aggregator(models_dir / "afa" / "winmap_fresh.safetensors", agg, layout,
                    [{"name": n, "sha256": h} for n, h in zip(experts.names, experts.hashes)])
    settings = winmap.settings_from_ui(dict(ARGS, max_images=2, seeds=1))
    rows = {}
    for spec in (EnsembleSpec(mode=Mode.AGGREGATOR, aggregator="winmap_fresh.safetensors"),
                 EnsembleSpec(mode=Mode.BLOCK_AVERAGE), EnsembleSpec(mode=Mode.FIXED_WEIGHTS, weights="1, 0")):
        with torch.inference_mode():
            table = winmap.win_map(experts, clip, vae, settings, spec).table
        rows[spec.mode] = table.rows()
    agg_row, avg_row, fixed_row = rows[Mode.AGGREGATOR][0], rows[Mode.BLOCK_AVERAGE][0], rows[Mode.FIXED_WEIGHTS][0]
    assert agg_row["name"] == "ensemble: winmap_fresh"
    assert agg_row["loss"] == pytest.approx(avg_row["loss"], rel=1e-4)
    model_1 = next(r for r in rows[Mode.FIXED_WEIGHTS] if r["name"] == experts.names[0])
    assert fixed_row["loss"] == pytest.approx(model_1["loss"], rel=1e-4)
    assert abs(avg_row["loss"] - model_1["loss"]) > 1e-3 * model_1["loss"]  # the averaging is another model
    with pytest.raises(AFAError, match="not found"):
        winmap.win_map(experts, clip, vae, settings, EnsembleSpec(mode=Mode.AGGREGATOR, aggregator="nope.safetensors"))


def test_service_cancel_returns_the_partial_table_and_the_node_raises(env):
    import comfy.model_management
    from afa_nodes.service import models, winmap
    model, clip, vae = env["loaded"]
    settings = winmap.settings_from_ui(ARGS)
    polls = []
    with torch.inference_mode():
        result = winmap.win_map(models.experts_of(model), clip, vae, settings,
                                should_stop=lambda: polls.append(1) or len(polls) > 3)
    assert result.table.stopped and result.table.images == 1 and len(polls) == 4
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException), torch.inference_mode():
            env["nodes"]["AFAWinMap"].execute(model=model, clip=clip, vae=vae, **ARGS)
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_bad_settings_name_the_fix(env):
    from afa_nodes.service import winmap
    with pytest.raises(AFAError, match="does not exist"):
        winmap.settings_from_ui(dict(ARGS, dataset_folder="no_such_folder"))
    with pytest.raises(AFAError, match="seeds must be 1..64"):
        winmap.settings_from_ui(dict(ARGS, seeds=0))
    assert env["nodes"]["AFAWinMap"].validate_inputs("../outside") != True  # noqa: E712
    with pytest.raises(AFAError, match="needs an aggregator file"):
        EnsembleSpec(mode=Mode.AGGREGATOR).checked(2)


def test_cli_writes_pictures_wins_and_verdict(env, tmp_path):
    data = make_dataset(tmp_path / "ds", n=2)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "afa_nodes", "winmap", "--comfyui", str(env["comfy"].path),
           "--checkpoint", str(env["ckpts"][0]), "--checkpoint", str(env["ckpts"][1]), "--data", str(data),
           "--out", str(out), "--steps", "2", "--seeds", "1", "--grid", "4", "--resolution", "64",
           "--evaluate"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wins = json.loads((out / "winmap.json").read_text())
    assert wins["models"] == [p.name for p in env["ckpts"][:2]] and wins["samples"] == 2
    assert len(wins["win_share_per_step"]) == 2 and abs(sum(wins["win_share"]) - 1) < 1e-9
    csv = (out / "winmap.csv").read_text().splitlines()
    assert csv[0].startswith("step,timestep,sigma,") and len(csv) == 1 + 2
    for name in ("winmap.png", "winmap_wins.png", "winmap_step_1.png", "winmap_step_2.png", "evaluation.png"):
        assert (out / name).stat().st_size > 0, name
    assert wins["verdict"] in proc.stderr and "ensemble: block-wise average" in (out / "evaluation.txt").read_text()
