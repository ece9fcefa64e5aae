"""AFA Studio's WebUI features (issue #17 A) driven in headless chromium against one running studio
(tests/browser.py): the first-run hint and the demo checkpoints, compare mode on a bounded
checkpoint cache (checkpoint loads counted), every mode with its parameters, cancel and the queue,
LoRA / img2img / inpainting / ControlNet (tiny files in ComfyUI's real key layouts, built here),
the live training plot and map hover. Tiny models, 64 px, 2 steps."""
import json
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_studio import DATASET, serve_studio
import test_studio_browser
from test_studio_browser import choose, open_tab, pick, shot, toast
from toy_dataset import make_dataset

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]
SIZE = {"afa-gen-width": 64, "afa-gen-height": 64, "afa-gen-steps": 2, "afa-gen-cfg": 2}


# ---------------------------------------------------------------- tiny LoRA / ControlNet files
def build_lora(path, unet, rank=4, scale=0.5, seed=0):
    """A LoRA for `unet` (ComfyUI BaseModel) with kohya key names (comfy.lora.model_lora_keys_unet):
    rank-`rank` up/down on the attention projections, fp16 safetensors (~0.3 MB)."""
    import comfy.lora
    from safetensors.torch import save_file
    weights, g, sd = unet.state_dict(), torch.Generator().manual_seed(seed), {}
    for lora_key, weight_key in comfy.lora.model_lora_keys_unet(unet, {}).items():
        if (isinstance(weight_key, str) and lora_key.startswith("lora_unet_")
                and any(p in weight_key for p in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_v"))
                and weights[weight_key].dim() == 2):
            out_f, in_f = weights[weight_key].shape
            sd[f"{lora_key}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).half()
            sd[f"{lora_key}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * scale).half()
            sd[f"{lora_key}.alpha"] = torch.tensor(float(rank)).half()
    assert len(sd) >= 12
    save_file(sd, str(path))


def build_controlnet(path, seed=0):
    """An SD1.5-layout ControlNet (`control_model.*`, ComfyUI's cldm.ControlNet) for the demo UNet's
    config, seeded random weights (zero convs too, so the control image matters), fp16."""
    import comfy.cldm.cldm
    import comfy.model_detection
    import comfy.ops
    from safetensors.torch import save_file

    from afa_nodes.demo_checkpoints import SD15_UNET_CONFIG
    config = dict(comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET_CONFIG)).unet_config)
    for key in ("out_channels", "disable_unet_model_creation"):
        config.pop(key, None)
    with torch.device("meta"):
        net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, device="meta",
                                         operations=comfy.ops.disable_weight_init)
    g, sd = torch.Generator().manual_seed(seed), {}
    for k, v in net.state_dict().items():
        value = (torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5 if v.dim() >= 2
                 else torch.ones(v.shape) if "norm" in k and k.endswith("weight") else torch.zeros(v.shape))
        sd[f"control_model.{k}"] = value.half()
    save_file(sd, str(path))


def build_aggregator(path, checkpoint):
    """A random (non-uniform) aggregator for two demo checkpoints (as tests/test_browser_maps.py)."""
    import comfy.sd as comfy_sd

    from afa_nodes.core.aggregator_file import save_aggregator
    from afa_nodes.core.layout import derive_layout
    from afa_nodes.core.sabw import Aggregator, SABWConfig
    unet = comfy_sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False,
                                                 output_clip=False)[0].model.diffusion_model
    layout = derive_layout(unet)
    torch.manual_seed(0)
    agg = Aggregator(layout.point_channels, SABWConfig(2, hidden=32, heads=4, depth=1, context_dim=768,
                                                       time_embed_dim=layout.time_embed_dim))
    for block in agg.blocks:
        torch.nn.init.normal_(block.conv_out.weight, std=2.0)
    save_aggregator(path, agg, layout, [])


# ---------------------------------------------------------------- one studio, one browser
@pytest.fixture(scope="module")
def page(comfy, sd15_checkpoints, browser, tmp_path_factory):
    import comfy.sd as comfy_sd
    import folder_paths
    root = tmp_path_factory.mktemp("studio_features")
    for sub in ("loras", "controlnet", "demo"):
        (root / sub).mkdir()
        if sub != "demo":
            folder_paths.add_model_folder_path(sub, str(root / sub))
    for p in sd15_checkpoints:  # the demo folder: the test cache's demo files (nothing is built)
        (root / "demo" / p.name).symlink_to(p.resolve())
    unet = comfy_sd.load_checkpoint_guess_config(str(sd15_checkpoints[0]), output_vae=False,
                                                 output_clip=False)[0].model
    build_lora(root / "loras" / "tiny_lora.safetensors", unet)
    build_controlnet(root / "controlnet" / "tiny_controlnet.safetensors")
    build_aggregator(comfy.models_dir / "afa" / "features_agg.safetensors", sd15_checkpoints[0])
    make_dataset(comfy.input_dir / DATASET)
    loads = []
    real = comfy_sd.load_checkpoint_guess_config

    def counting(path, *args, **kwargs):
        loads.append(str(path))
        return real(path, *args, **kwargs)
    with pytest.MonkeyPatch.context() as mp, serve_studio(comfy) as app:
        mp.setattr(comfy_sd, "load_checkpoint_guess_config", counting)
        app.studio.demo_folder = str(root / "demo")
        b = browser
        b.send("Page.enable")
        b.send("Page.navigate", {"url": app.url})
        b.wait_for("!!document.querySelector('#afa-generate') && "
                   "document.querySelector('#afa-status')?.innerText.startsWith('Idle')", timeout=90,
                   what="the studio page and its first status poll")
        yield SimpleNamespace(b=b, app=app, names=[p.name for p in sd15_checkpoints[:2]], root=root, loads=loads)


def text(b, elem_id):
    return b.eval(f"document.querySelector('#{elem_id}')?.innerText ?? ''")


def captions(b):
    return b.eval("[...document.querySelectorAll('#afa-gallery .caption-label')].map(c => c.innerText)")


def gallery_files(page):
    """The gallery's images as the page shows them (their URLs point at the saved files)."""
    srcs = page.b.eval("[...document.querySelectorAll('#afa-gallery img')].map(i => i.src)")
    out = []
    for src in srcs:
        path = re.search(r"/file=(.*?)(\?|$)", src).group(1)
        from urllib.parse import unquote
        out.append(np.asarray(Image.open(unquote(path)).convert("RGB"), dtype=np.float32) / 255)
    return out


def select(b, elem_id, value):
    """Choose `value` in a single-select gradio dropdown by clicking its option."""
    if b.eval(f"document.querySelector('#{elem_id} input').value") == value:
        return
    options = (f"[...(document.getElementById(document.querySelector('#{elem_id} input')"
               ".getAttribute('aria-controls'))?.querySelectorAll('li') ?? [])]")
    b.eval(f"(() => {{ const i = document.querySelector('#{elem_id} input'); i.blur(); i.focus(); i.click(); "
           "i.value = ''; i.dispatchEvent(new Event('input', {bubbles: true})); })()")  # all options, unfiltered
    b.wait_for(f"{options}.some(li => li.innerText.trim() === {json.dumps(value)})", timeout=10,
               what=f"option {value} in #{elem_id}")
    b.eval(f"(() => {{ const li = {options}.find(li => li.innerText.trim() === {json.dumps(value)}); "
           "for (const t of ['mousedown', 'mouseup', 'click']) li.dispatchEvent(new MouseEvent(t, {bubbles: true}));"
           " })()")
    b.eval(f"document.querySelector('#{elem_id} input').blur()")
    b.wait_for(f"document.querySelector('#{elem_id} input').value === {json.dumps(value)}", timeout=10,
               what=f"{value} chosen in #{elem_id}")


def set_mode(b, mode):
    select(b, "afa-gen-mode", mode)


def set_number(b, elem_id, value):
    b.wait_for(f"!!document.querySelector('#{elem_id} input[type=number]')", timeout=10, what=f"#{elem_id}")
    test_studio_browser.set_number(b, elem_id, value)


def set_text(b, elem_id, value):
    field = f"document.querySelector('#{elem_id} textarea, #{elem_id} input')"
    b.wait_for(f"!!{field}", timeout=10, what=f"#{elem_id}")
    b.eval(f"(() => {{ const t = {field}; t.value = {json.dumps(value)}; "
           "t.dispatchEvent(new Event('input', {bubbles: true})); t.blur(); })()")


def run_generation(page, count, timeout=120):
    """Press Generate and wait for a NEW gallery of `count` images; returns the captions."""
    b = page.b
    srcs = "JSON.stringify([...document.querySelectorAll('#afa-gallery img')].map(i => i.src))"
    before = b.eval(srcs)
    b.eval("document.querySelector('#afa-generate').click()")
    b.wait_for(f"{srcs} !== {json.dumps(before)} && document.querySelectorAll('#afa-gallery img').length === {count}",
               timeout=timeout, what=f"{count} new images")
    b.wait_for("document.querySelector('#afa-status').innerText.startsWith('Idle')", timeout=30)
    return captions(b)


def upload(b, elem_id, path):
    """Put a file into a gradio Image's file input (as choosing it in the file dialog does)."""
    doc = b.send("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
    node = b.send("DOM.querySelector", {"nodeId": doc, "selector": f"#{elem_id} input[type=file]"})["nodeId"]
    assert node, f"no file input in #{elem_id}"
    b.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(path)]})
    b.wait_for(f"!!document.querySelector('#{elem_id} img')", timeout=30, what=f"the image in #{elem_id}")


def open_accordion(b, title, inside):
    """Open the accordion headed `title` (it holds #`inside`) unless it is open."""
    shown = f"(document.querySelector('#{inside}')?.offsetParent ?? null) !== null"
    if not b.eval(shown):
        b.eval(f"[...document.querySelectorAll('button, .label-wrap')].filter(e => e.innerText.trim()"
               f".startsWith({json.dumps(title)})).pop()?.click()")
    b.wait_for(shown, timeout=10, what=f"the accordion {title!r} open")


def mse(a, b):
    return float(((a - b) ** 2).mean())


# ---------------------------------------------------------------- 2. compare + cache
def test_compare_mode_loads_each_checkpoint_once_across_requests_and_modes(page):
    b = page.b
    open_tab(b, "Generate")
    b.eval("document.querySelector('#afa-cache-clear').click()")
    b.wait_for("document.querySelector('#afa-cache').innerText.includes('0/6 checkpoints')", timeout=15)
    choose(b, "afa-gen-checkpoints", page.names)
    for elem_id, value in SIZE.items():
        set_number(b, elem_id, value)
    set_mode(b, "fixed weights")
    set_text(b, "afa-gen-weights", "0.8, 0.2")
    before = len(page.loads)
    caps = run_generation(page, 4)
    assert caps[:2] == ["AFA ensemble (fixed weights)", "block-wise average (2 models)"], caps
    assert caps[2:] == [f"base model {i + 1}: {n}" for i, n in enumerate(page.names)], caps
    assert len(page.loads) - before == 2   # the ensemble, its block-wise average and each model: 2 loads
    images = gallery_files(page)
    assert mse(images[0], images[1]) > 0 and mse(images[2], images[3]) > 0
    set_mode(b, "noise average")
    assert run_generation(page, 4)[0] == "AFA ensemble (noise average)"
    assert len(page.loads) - before == 2   # another request, another mode: still from the cache
    cache = b.wait_for("(t => t.includes('2 served') ? t : null)(document.querySelector('#afa-cache').innerText)",
                       timeout=15, what="the cache panel after the second request")
    assert "2/6 checkpoints" in cache and all(n in cache for n in page.names) and " MB" in cache, cache
    b.eval("document.querySelector('#afa-cache-clear').click()")
    b.wait_for("document.querySelector('#afa-cache').innerText.includes('0/6 checkpoints')", timeout=15)
    run_generation(page, 4)
    assert len(page.loads) - before == 4   # cleared: loaded again, once each


def test_the_cache_is_bounded_least_recently_used_first(comfy, sd15_checkpoints):
    from afa_nodes.studio.cache import CheckpointCache
    cache = CheckpointCache(capacity=2)
    a, b_, c = (p.name for p in sd15_checkpoints[:3])
    cache.checkpoints([a, b_])
    cache.checkpoints([b_, c])              # a is evicted (least recently used), b and c stay
    assert [n for n, _ in cache.entries()] == [c, b_] and cache.loads == 3 and cache.hits == 1
    same = cache.checkpoints([a, a, b_])    # a chosen twice: one load; c goes
    assert same[0] is same[1] and cache.loads == 4 and len(cache.entries()) == 2


# ---------------------------------------------------------------- 3. modes and their parameters
def test_every_mode_shows_its_parameters_and_they_reach_the_ensemble(page, comfy):
    b = page.b
    open_tab(b, "Generate")
    choose(b, "afa-gen-checkpoints", page.names)
    for elem_id, value in SIZE.items():
        set_number(b, elem_id, value)
    visible = "(id => !!document.querySelector('#' + id) && document.querySelector('#' + id).offsetParent !== null)"
    for mode, shown in (("fixed weights", ["afa-gen-weights"]), ("single model", ["afa-gen-model-index"]),
                        ("aggregator", ["afa-gen-map-refresh", "afa-gen-precision"]), ("noise average", [])):
        set_mode(b, mode)
        for elem_id in ("afa-gen-weights", "afa-gen-model-index", "afa-gen-map-refresh", "afa-gen-precision"):
            b.wait_for(f"{visible}('{elem_id}') === {json.dumps(elem_id in shown)}", timeout=10,
                       what=f"{elem_id} {'shown' if elem_id in shown else 'hidden'} in mode {mode}")
    # single model 2 = base model 2's image, pixel for pixel
    set_mode(b, "single model")
    set_number(b, "afa-gen-model-index", 2)
    caps = run_generation(page, 4)
    images = gallery_files(page)
    assert caps[0] == "AFA ensemble (single model)" and np.array_equal(images[0], images[3])
    # aggregator with map refresh k: k=2 reuses step 0's maps at step 1, so the image changes
    set_mode(b, "aggregator")
    pick(b, "afa-gen-aggregator", "features_agg.safetensors")
    b.eval("document.querySelector('#afa-gen-compare input').click()")  # compare off: the ensemble only
    results = {}
    for k in (1, 2):
        set_number(b, "afa-gen-map-refresh", k)
        assert run_generation(page, 1) == ["AFA ensemble (aggregator features_agg.safetensors)"]
        results[k] = gallery_files(page)[0]
    assert mse(results[1], results[2]) > 0
    newest = max((comfy.output_dir / "afa_studio").glob("*_ensemble_0.png"), key=lambda p: p.stat().st_mtime)
    settings = json.loads(Image.open(newest).text["afa"])
    assert settings["map_refresh"] == 2 and settings["mode"] == "aggregator"
    assert json.loads(Image.open(newest).text["prompt"])["1"]["inputs"]["map_refresh"] == 2
    b.eval("document.querySelector('#afa-gen-compare input').click()")
    set_mode(b, "block-wise average")


# ---------------------------------------------------------------- 4. cancel and the queue
def test_cancel_stops_a_generation_within_one_step_and_the_queue_shows_what_waits(page):
    from gradio_client import Client
    b = page.b
    open_tab(b, "Generate")
    choose(b, "afa-gen-checkpoints", page.names)
    for elem_id, value in dict(SIZE, **{"afa-gen-steps": 150}).items():
        set_number(b, elem_id, value)
    b.eval("document.querySelector('#afa-generate').click()")
    b.wait_for(r"/AFA ensemble: step [3-9]\/150/.test(document.querySelector('#afa-status').innerText)", timeout=120,
               what="the long generation to be a few steps in")
    client = Client(page.app.url, verbose=False)   # a second user asks meanwhile: it waits in the queue
    waiting = client.submit(checkpoints=page.names, width=64, height=64, steps=2, cfg=2.0, compare=False,
                            api_name="/generate")
    line = b.wait_for("(t => t.includes('waiting: 1. generation') ? t : null)"
                      "(document.querySelector('#afa-status').innerText)", timeout=30, what="the queue in the status bar")
    assert "2 models, block-wise average, 2 steps, 64x64" in line, line
    b.eval("document.querySelector('#afa-cancel').click()")
    messages = "[...document.querySelectorAll('.toast-body')].map(t => t.innerText)"
    found = b.wait_for(f"(m => m.some(t => t.includes('Cancelling')) && m.some(t => t.includes('was cancelled')) ? m "
                       f": null)({messages})", timeout=60, what="the cancel and the cancelled messages")
    cancelled_at = int(re.search(r"at AFA ensemble: step (\d+)/150", next(t for t in found if "Cancelling" in t))
                       .group(1))
    stopped = next(t for t in found if "was cancelled" in t)
    b.eval("document.querySelectorAll('.toast-close').forEach(c => c.click())")
    stopped_at = int(re.search(r"at AFA ensemble: step (\d+)/150", stopped).group(1))
    assert cancelled_at <= stopped_at <= cancelled_at + 1, (cancelled_at, stopped_at)
    out = waiting.result(timeout=120)              # the waiting request runs next
    assert [p["caption"] for p in out[0]["value"]] == ["AFA ensemble (block-wise average)"]
    b.wait_for("document.querySelector('#afa-status').innerText.startsWith('Idle')", timeout=30)
    set_number(b, "afa-gen-steps", 2)
    client.close()


# ---------------------------------------------------------------- 6. LoRA, ControlNet, img2img, inpainting
def newest_settings(comfy):
    newest = max((comfy.output_dir / "afa_studio").glob("*_ensemble_0.png"), key=lambda p: p.stat().st_mtime)
    return json.loads(Image.open(newest).text["afa"])


def test_lora_controlnet_img2img_and_inpainting_through_the_served_studio(page, comfy, tmp_path):
    """Through the running studio's /generate (what the Generate button calls), with gradio's client:
    the page's typed-text route for these fields is not covered by a chromium test yet."""
    from gradio_client import Client, handle_file
    client = Client(page.app.url, verbose=False)
    base = dict(checkpoints=page.names, width=64, height=64, steps=2, cfg=2.0, seed=3, compare=False,
                record_maps=False, api_name="/generate")

    def image(**extra):
        out = client.predict(**dict(base, **extra))
        item = out[0]["value"][0]
        return np.asarray(Image.open(item["image"]).convert("RGB"), dtype=np.float32) / 255
    plain = image()
    assert mse(image(loras="all: tiny_lora.safetensors:1"), plain) > 0          # a LoRA on the ensemble
    assert newest_settings(comfy)["loras"] == [[["tiny_lora.safetensors", 1.0]]] * 2
    assert np.array_equal(image(loras="1: tiny_lora.safetensors:0"), plain)     # strength 0 = none
    assert mse(image(loras="2: tiny_lora.safetensors:1"), plain) > 0            # one model's own LoRA
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(tmp_path / "control.png")
    control = image(controlnet="tiny_controlnet.safetensors", control_image=handle_file(tmp_path / "control.png"))
    assert mse(control, plain) > 0
    assert newest_settings(comfy)["controlnet"] == {"name": "tiny_controlnet.safetensors", "strength": 1.0}
    assert np.array_equal(image(controlnet="tiny_controlnet.safetensors", control_strength=0.0,
                                control_image=handle_file(tmp_path / "control.png")), plain)
    img2img = image(init_image=handle_file(tmp_path / "control.png"), denoise=0.5)
    settings = newest_settings(comfy)
    assert mse(img2img, plain) > 0 and settings["img2img"] and settings["denoise"] == 0.5
    mask = np.zeros((64, 64), dtype="uint8")
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    inpaint = image(init_image=handle_file(tmp_path / "control.png"), mask=handle_file(tmp_path / "mask.png"))
    assert newest_settings(comfy)["inpaint"] and mse(inpaint, plain) > 0
    client.close()


# ---------------------------------------------------------------- 7. maps: hover a position
def test_hovering_the_map_reads_each_models_weight_there(page):
    b = page.b
    open_tab(b, "Generate")
    choose(b, "afa-gen-checkpoints", page.names)
    set_mode(b, "fixed weights")
    set_text(b, "afa-gen-weights", "0.75, 0.25")
    if b.eval("document.querySelector('#afa-gen-compare input').checked"):
        b.eval("document.querySelector('#afa-gen-compare input').click()")  # the ensemble only
    run_generation(page, 1)
    open_tab(b, "Maps")
    b.wait_for("!!document.querySelector('#afa-maps-hover .afa-hover-map')", timeout=30, what="the hover map")
    b.eval("document.querySelector('#afa-maps-hover .afa-hover-map').scrollIntoView()")
    box = b.eval("(r => [r.left + r.width * 0.7, r.top + r.height * 0.3])"
                 "(document.querySelector('#afa-maps-hover .afa-hover-map').getBoundingClientRect())")
    b.mouse(*box)
    b.eval(f"document.querySelector('#afa-maps-hover .afa-hover-map').dispatchEvent(new MouseEvent('mousemove', "
           f"{{bubbles: true, clientX: {box[0]}, clientY: {box[1]}}}))")
    readout = b.wait_for("(t => t.startsWith('position') ? t : null)"
                         "(document.querySelector('#afa-maps-hover .afa-hover-readout').innerText)", timeout=15,
                         what="the weights under the pointer")
    values = [float(v) for v in re.findall(r"safetensors (\d\.\d+)", readout)]
    assert values == [0.75, 0.25], readout


# ---------------------------------------------------------------- 1. first run (last: its demo button leaves the page's dropdowns hard to drive)
def test_first_run_says_where_checkpoints_go_and_adds_the_demo_ones(page, comfy):
    b = page.b
    open_tab(b, "Generate")
    hint = text(b, "afa-gen-hint")
    assert "Checkpoints are read from" in hint and str(comfy.models_dir / "checkpoints") in hint, hint
    b.eval("document.querySelector('#afa-demo').click()")
    b.wait_for("document.querySelector('#afa-gen-result').innerText.includes('Demo checkpoints ready')", timeout=120,
               what="the demo checkpoints")
    b.wait_for(f"document.querySelector('#afa-gen-hint').innerText.includes({json.dumps(str(page.root / 'demo'))})",
               timeout=15, what="the demo folder among the folders read")
    tokens = b.eval("[...document.querySelectorAll('#afa-gen-checkpoints .token')].map(t => t.innerText.trim())")
    assert tokens == ["afa_demo_sd15_synthetic_0.safetensors", "afa_demo_sd15_synthetic_1.safetensors"]


def test_the_hint_says_when_no_checkpoint_is_found(comfy, monkeypatch):
    from afa_nodes.studio import catalog, gen_tab
    monkeypatch.setattr(catalog, "checkpoints", lambda: [])
    assert "No checkpoint found yet" in gen_tab.checkpoint_hint() and "--demo" in gen_tab.checkpoint_hint()
