"""AFA Studio's WebUI features (issue #17 A) driven in headless chromium against one running studio
(tests/browser.py, tests/studio_page.py): the first-run hint and the demo checkpoints, compare mode
on a bounded checkpoint cache (checkpoint loads counted), every mode with its parameters, cancel and
the queue, and map hover. LoRA / img2img / inpainting / ControlNet: test_studio_generate_browser.py.
Tiny models, 64 px, 2 steps."""
import json
import re

import numpy as np
import pytest
from browser import choose, gallery_files, open_tab, pick, run_generation, select, set_number, set_text, text
from PIL import Image
from studio_page import AGGREGATOR, SIZE, mse, pixels, studio_page

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]


@pytest.fixture(scope="module")
def page(comfy, sd15_checkpoints, browser, tmp_path_factory):
    with studio_page(comfy, sd15_checkpoints, browser, tmp_path_factory.mktemp("studio_features")) as p:
        yield p


def images_shown(page):
    return [pixels(p) for p in gallery_files(page.b)]


def set_mode(b, mode):
    select(b, "afa-gen-mode", mode)


# ---------------------------------------------------------------- 2. compare + cache
def test_compare_mode_loads_each_checkpoint_once_across_requests_and_modes(page):
    b = page.b
    open_tab(b, "Generate")
    b.eval("document.querySelector('#afa-cache-clear').click()")
    b.wait_for("document.querySelector('#afa-cache').innerText.includes('0/6 files')", timeout=15)
    choose(b, "afa-gen-checkpoints", page.names)
    for elem_id, value in SIZE.items():
        set_number(b, elem_id, value)
    set_mode(b, "fixed weights")
    set_text(b, "afa-gen-weights", "0.8, 0.2")
    before = len(page.loads)
    caps = run_generation(b, 4)
    assert caps[:2] == ["AFA ensemble (fixed weights)", "block-wise average (2 models)"], caps
    assert caps[2:] == [f"base model {i + 1}: {n}" for i, n in enumerate(page.names)], caps
    assert len(page.loads) - before == 2   # the ensemble, its block-wise average and each model: 2 loads
    images = images_shown(page)
    assert mse(images[0], images[1]) > 0 and mse(images[2], images[3]) > 0
    set_mode(b, "noise average")
    assert run_generation(b, 4)[0] == "AFA ensemble (noise average)"
    assert len(page.loads) - before == 2   # another request, another mode: still from the cache
    cache = b.wait_for("(t => t.includes('2 served') ? t : null)(document.querySelector('#afa-cache').innerText)",
                       timeout=15, what="the cache panel after the second request")
    assert "2/6 files" in cache and all(n in cache for n in page.names) and " MB" in cache, cache
    b.eval("document.querySelector('#afa-cache-clear').click()")
    b.wait_for("document.querySelector('#afa-cache').innerText.includes('0/6 files')", timeout=15)
    run_generation(b, 4)
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
                        ("aggregator", ["afa-gen-map-refresh", "afa-gen-precision", "afa-gen-full-res"]),
                        ("noise average", [])):
        set_mode(b, mode)
        for elem_id in ("afa-gen-weights", "afa-gen-model-index", "afa-gen-map-refresh", "afa-gen-precision",
                        "afa-gen-full-res"):
            b.wait_for(f"{visible}('{elem_id}') === {json.dumps(elem_id in shown)}", timeout=10,
                       what=f"{elem_id} {'shown' if elem_id in shown else 'hidden'} in mode {mode}")
    # single model 2 = base model 2's image, pixel for pixel
    set_mode(b, "single model")
    set_number(b, "afa-gen-model-index", 2)
    caps = run_generation(b, 4)
    images = images_shown(page)
    assert caps[0] == "AFA ensemble (single model)" and np.array_equal(images[0], images[3])
    # aggregator with map refresh k: k=2 reuses step 0's maps at step 1, so the image changes
    set_mode(b, "aggregator")
    pick(b, "afa-gen-aggregator", AGGREGATOR)
    b.eval("document.querySelector('#afa-gen-compare input').click()")  # compare off: the ensemble only
    results = {}
    for k in (1, 2):
        set_number(b, "afa-gen-map-refresh", k)
        assert run_generation(b, 1) == [f"AFA ensemble (aggregator {AGGREGATOR})"]
        results[k] = images_shown(page)[0]
    assert mse(results[1], results[2]) > 0
    newest = max((comfy.output_dir / "afa_studio").glob("*_ensemble_0.png"), key=lambda p: p.stat().st_mtime)
    settings = json.loads(Image.open(newest).text["afa"])
    assert settings["map_refresh"] == 2 and settings["mode"] == "aggregator"
    assert json.loads(Image.open(newest).text["prompt"])["1"]["inputs"]["map_refresh"] == 2
    # the aggregator at half resolution: another image, and the saved workflow says so
    set_number(b, "afa-gen-map-refresh", 1)
    select(b, "afa-gen-full-res", "half resolution")
    run_generation(b, 1)
    assert mse(results[1], images_shown(page)[0]) > 0
    newest = max((comfy.output_dir / "afa_studio").glob("*_ensemble_0.png"), key=lambda p: p.stat().st_mtime)
    assert json.loads(Image.open(newest).text["afa"])["full_res"] == "half resolution"
    assert json.loads(Image.open(newest).text["prompt"])["1"]["inputs"]["full_res"] == "half resolution"
    select(b, "afa-gen-full-res", "exact")
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


# ---------------------------------------------------------------- 7. maps: hover a position
def test_hovering_the_map_reads_each_models_weight_there(page):
    b = page.b
    open_tab(b, "Generate")
    choose(b, "afa-gen-checkpoints", page.names)
    set_mode(b, "fixed weights")
    set_text(b, "afa-gen-weights", "0.75, 0.25")
    if b.eval("document.querySelector('#afa-gen-compare input').checked"):
        b.eval("document.querySelector('#afa-gen-compare input').click()")  # the ensemble only
    run_generation(b, 1)
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
