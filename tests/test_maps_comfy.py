"""Attention-map recording inside real ComfyUI: KSampler runs on two tiny SD1.5-shaped checkpoints."""
import os

import pytest
import torch

pytestmark = pytest.mark.comfyui

STEPS = 3


@pytest.fixture(scope="module")
def env(comfy, sd15_checkpoints, tmp_path_factory):
    import comfy.sd
    import nodes

    from afa_nodes import nodes_maps
    from afa_nodes.core.aggregator_file import load_aggregator, save_aggregator
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    from afa_nodes.core.spec import EnsembleSpec, Mode
    from afa_nodes.ensemble_model import build_ensemble, require_ensemble

    loaded = [comfy.sd.load_checkpoint_guess_config(str(p))[:3] for p in sd15_checkpoints[:2]]
    names = [p.name for p in sd15_checkpoints[:2]]
    patchers = [m for m, _, _ in loaded]
    layout = require_ensemble(build_ensemble(patchers, names)).layout
    agg = Aggregator(layout.point_channels, SABWConfig(2, hidden=32, heads=4, depth=1,
                                                       context_dim=layout.context_dim,
                                                       time_embed_dim=layout.time_embed_dim))
    torch.manual_seed(0)
    for block in agg.blocks:
        torch.nn.init.normal_(block.conv_out.weight, std=2.0)  # far from uniform
    path = tmp_path_factory.mktemp("afa") / "maps_agg.safetensors"
    save_aggregator(path, agg, layout, [])
    model = build_ensemble(patchers, names, EnsembleSpec(mode=Mode.AGGREGATOR), load_aggregator(path))
    g = torch.Generator().manual_seed(0)
    cond = lambda: [[torch.randn(1, 77, 768, generator=g), {}]]
    return {"nodes": nodes, "maps": nodes_maps, "model": model, "plain": patchers[0], "vae": loaded[0][2],
            "layout": layout, "positive": cond(), "negative": cond(), "names": names, "comfy": comfy}


def ksample(env, model, seed=1, batch=1, cfg=2.0, size=8):
    latent = {"samples": torch.zeros(batch, 4, size, size)}
    with torch.inference_mode():
        return env["nodes"].common_ksampler(model, seed, STEPS, cfg, "euler", "normal", env["positive"],
                                            env["negative"], latent)[0]


def preview(env, maps, latent, points="middle", step=-1, branch="cond", batch_index=0, cell=64, image=None):
    with torch.inference_mode():
        out = env["maps"].AFAAttentionPreview.execute(maps, latent, points, step, branch, batch_index, cell, image)
    return {"result": out.args, "ui": out.ui}


def record(env, model=None, **kw):
    args = {"enabled": True, "points": "all", "steps": "all", "max_side": 64, "cap_mb": 64}
    args.update(kw)
    with torch.inference_mode():
        return env["maps"].AFARecordAttention.execute(model or env["model"], **args).args


def test_record_during_ksampler_and_preview_images(env):
    from afa_nodes.core import map_render as mr
    model, maps = record(env)
    out = ksample(env, model)
    run = maps.runs[-1]
    assert run.status == "finished" and sorted(run.maps.steps) == list(range(STEPS))
    assert run.maps.point_names == env["layout"].point_names and run.maps.branches == ["cond", "uncond"]
    for a in run.maps.maps.values():
        assert a.shape == (1, 2, 8, 8) and torch.isfinite(a).all()
        assert torch.allclose(a.float().sum(1), torch.ones(1, 8, 8), atol=2e-3)
    with torch.inference_mode():
        image = env["nodes"].VAEDecode().decode(env["vae"], out)[0]
    res = preview(env, maps, out, points="middle, final", image=image)
    grid, dominant, overlay, chart = res["result"]
    gh, gw = mr.grid_layout(2, STEPS, 64)["size"]
    assert grid.shape == (2, gh, gw, 3)
    assert dominant.shape == (1, mr.TITLE_H + 384 + mr.legend_height(2), 384, 3)
    h, w = image.shape[1:3]
    assert overlay.shape == (1, h + mr.TITLE_H + mr.legend_height(2), max(w, mr.LEGEND_MIN_W), 3)
    assert chart.shape[1:3] == mr.chart_layout(len(env["layout"].points))["size"]
    ui = res["ui"]
    assert len(ui["images"]) == 5 and all(i["type"] == "temp" for i in ui["images"])
    import folder_paths
    for i in ui["images"]:
        assert os.path.isfile(os.path.join(folder_paths.get_temp_directory(), i["subfolder"], i["filename"]))
    info = ui["afa_maps"][0]
    assert info["run_id"] == run.run_id and info["view"] == {"point": "middle", "step": STEPS - 1,
                                                             "branch": "cond", "batch_index": 0}
    status, body = env["maps"].maps_response(run.run_id)
    assert status == 200 and body["steps"] == list(range(STEPS)) and body["models"] == env["names"]
    status, body = env["maps"].maps_response(run.run_id, {"step": "1", "point": "input 1", "branch": "uncond"})
    assert status == 200 and body["shape"] == [2, 8, 8]


def test_sampling_twice_gives_two_runs_each_tied_to_its_latent(env):
    model, maps = record(env, points="middle")
    first, second = ksample(env, model, seed=1), ksample(env, model, seed=2)
    assert len(maps.runs) == 2 and maps.runs[0].run_id != maps.runs[1].run_id
    assert maps.find_run(first["samples"]) is maps.runs[0]
    assert maps.find_run(second["samples"]) is maps.runs[1]
    a = maps.runs[0].maps.weights(STEPS - 1, "middle")
    b = maps.runs[1].maps.weights(STEPS - 1, "middle")
    assert not torch.equal(a, b)
    info = [preview(env, maps, lat)["ui"]["afa_maps"][0]["run_id"] for lat in (first, second)]
    assert info == [r.run_id for r in maps.runs]
    batch = ksample(env, model, seed=3, batch=2)
    assert maps.runs[-1].maps.maps[(0, "middle", "cond")].shape[0] == 2
    assert preview(env, maps, batch, batch_index=1)["result"][0].shape[0] == 1


def test_recording_off_and_on_give_bit_identical_latents(env):
    plain = ksample(env, env["model"])["samples"]
    off_model, off_maps = record(env, enabled=False)
    assert off_model is env["model"]
    on_model, on_maps = record(env)
    assert torch.equal(ksample(env, off_model)["samples"], plain)
    assert torch.equal(ksample(env, on_model)["samples"], plain)
    assert on_maps.runs and not off_maps.runs


def test_bad_inputs_give_clear_messages(env):
    from afa_nodes.core.errors import AFAError
    with pytest.raises(AFAError, match="needs an AFA MODEL"):
        record(env, env["plain"])
    with pytest.raises(AFAError, match="point 30 does not exist.*5 aggregation points"):
        record(env, points="30")
    assert "cannot read steps" in env["maps"].AFARecordAttention.validate_inputs("first 2")
    _, off = record(env, enabled=False)
    out = ksample(env, env["model"])
    with pytest.raises(AFAError, match="recording was off"):
        preview(env, off, out)
    model, maps = record(env, points="middle", steps="last 1")
    with pytest.raises(AFAError, match="no sampling run has used the recording MODEL"):
        preview(env, maps, out)
    mine = ksample(env, model)
    with pytest.raises(AFAError, match="not the output of a sampling run"):
        preview(env, maps, ksample(env, env["model"], seed=9))
    with pytest.raises(AFAError, match=r"step 0 was not recorded.*recorded steps: 2"):
        preview(env, maps, mine, step=0)
    with pytest.raises(AFAError, match="point.*final were not recorded.*recorded points: middle"):
        preview(env, maps, mine, points="final")
    with pytest.raises(AFAError, match="batch_index 1 is out of range"):
        preview(env, maps, mine, batch_index=1)
    with pytest.raises(AFAError, match="no 'uncond' maps.*cfg 1.0"):
        model1, maps1 = record(env, points="middle")
        preview(env, maps1, ksample(env, model1, cfg=1.0), branch="uncond")
    with pytest.raises(AFAError, match="must come from AFA Record Attention"):
        preview(env, "nope", mine)
    assert env["maps"].maps_response("unknown")[0] == 404
    assert env["maps"].maps_response(maps.runs[-1].run_id, {"step": "0", "point": "middle"})[0] == 400


def maps_api_prompt(ckpt_1, ckpt_2, steps=2, size=64, point="middle"):
    """API workflow: AFA loader -> Record Attention -> KSampler -> VAE Decode -> Attention Preview
    (node "8"). Also what a browser test loads with app.loadApiJson(prompt) before queueing."""
    return {
        "1": {"class_type": "AFAEnsembleLoader", "inputs": {
            "ckpt_1": ckpt_1, "ckpt_2": ckpt_2, "aggregator": "none", "mode": "fixed weights",
            "weights": "input: 0.8, 0.2; middle: 0.3, 0.7; output: 0.5, 0.5", "model_index": 1}},
        "2": {"class_type": "AFARecordAttention", "inputs": {
            "model": ["1", 0], "enabled": True, "points": "all", "steps": "all", "max_side": 64, "cap_mb": 64}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": 0, "steps": steps, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "AFAAttentionPreview", "inputs": {
            "maps": ["2", 1], "latent": ["6", 0], "image": ["7", 0], "points": point, "step": -1,
            "branch": "cond", "batch_index": 0, "cell": 64}},
    }


def test_server_runs_the_workflow_and_serves_the_viewer(comfy_server, sd15_checkpoints):
    import urllib.error
    srv = comfy_server
    srv.check_nodes(["AFARecordAttention", "AFAAttentionPreview"])
    entry = srv.run(maps_api_prompt(sd15_checkpoints[0].name, sd15_checkpoints[1].name), timeout=300)
    out = entry["outputs"]["8"]
    info = out["afa_maps"][0]
    assert len(out["images"]) == 4 and all(p.is_file() for p in srv.output_images({"outputs": {"8": out}}))
    assert info["steps"] == [0, 1] and info["branches"] == ["cond", "uncond"] and len(info["points"]) == 5
    body = srv.get_json(f"/afa/maps/{info['run_id']}")
    assert body["run_id"] == info["run_id"] and body["models"] == [p.name for p in sd15_checkpoints[:2]]
    m = srv.get_json(f"/afa/maps/{info['run_id']}?step=1&point=middle&branch=cond&batch=0")
    assert m["shape"] == [2, 1, 1] and [round(v, 2) for v in m["mean"]] == [0.3, 0.7]
    with pytest.raises(urllib.error.HTTPError) as e:
        srv.get_json("/afa/maps/no_such_run")
    assert e.value.code == 404
    import urllib.request
    with urllib.request.urlopen(srv.base_url + "/extensions/ComfyUI-AFA/afa_maps.js", timeout=30) as r:
        assert b"ComfyUI-AFA.maps" in r.read()
