"""AFA Studio in headless Debian chromium (CDP, tests/browser.py): every tab renders, a generation
started from the page fills the gallery and the Maps tab, and bad input shows a message while the
app keeps serving. Screenshots go to the test's tmp dir and to test-artifacts/.
Skipped when chromium is not installed (apt-get install chromium)."""
import json
import time
from types import SimpleNamespace

import pytest
from browser import (STUDIO_READY, choose, gallery_captions, open_accordion, open_page, open_tab, pick, set_number,
                     set_text, shot, toast)
from test_studio import DATASET, serve_studio
from toy_dataset import make_dataset

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]  # gradio's own pandas deprecations


@pytest.fixture(scope="module")
def page(comfy, sd15_checkpoints, browser):
    make_dataset(comfy.input_dir / DATASET)
    with serve_studio(comfy) as app:
        open_page(browser, app.url, STUDIO_READY, what="the studio page and its first status poll")
        yield SimpleNamespace(b=browser, app=app, names=[p.name for p in sd15_checkpoints[:2]])


def test_bad_input_shows_a_message_and_the_app_keeps_serving(page):
    b = page.b
    open_tab(b, "Generate")
    b.eval("document.querySelector('#afa-generate').click()")
    toast(b, "choose at least 2 checkpoints")  # waits for the message; fails when it never shows
    open_tab(b, "Train")
    choose(b, "afa-train-checkpoints", page.names)
    pick(b, "afa-train-dataset-folder", "/etc")
    b.eval("document.querySelector('#afa-train-start').click()")
    assert "must be a subfolder of ComfyUI's input directory" in toast(b, "input directory")
    b.eval("document.querySelector('#afa-train-stop').click()")
    toast(b, "No training is running")
    b.eval("document.querySelector('#afa-train-stop').click()")  # pressed twice: a message again, no harm
    toast(b, "No training is running")
    assert b.eval("document.querySelector('#afa-status').innerText").startswith("Idle")


def test_training_from_the_page_shows_the_curve_the_validation_table_and_the_samples(page, tmp_path):
    b = page.b
    open_tab(b, "Train")
    choose(b, "afa-train-checkpoints", page.names)
    pick(b, "afa-train-dataset-folder", DATASET)
    set_text(b, "afa-train-save-name", "browser_agg")
    set_text(b, "afa-train-sample-prompt", "a red picture")
    for elem_id, value in (("steps", 2), ("batch-size", 2), ("resolution", 64), ("save-every", 1),
                           ("learning-rate", 0.001)):
        set_number(b, f"afa-train-{elem_id}", value)
    open_accordion(b, "more training options", "afa-train-sample-steps")
    set_number(b, "afa-train-sample-steps", 3)
    b.eval("document.querySelector('#afa-train-start').click()")
    b.wait_for("document.querySelector('#afa-status').innerText.startsWith('Busy: training')", timeout=30,
               what="the status bar to show the training")
    b.wait_for("document.querySelector('#afa-train-progress').innerText.startsWith('Finished')", timeout=180,
               what="the training to finish")
    rows = b.wait_for("(() => { const r = [...document.querySelectorAll('#afa-train-table [role=row]')]"
                      ".filter(tr => tr.getAttribute('aria-rowindex') !== '1').map(tr => tr.innerText);"
                      " return r.length === 4 ? r : null; })()", timeout=15, what="the validation table")
    assert rows[0].startswith("AFA aggregator (trained)") and "single model" in rows[2], rows
    assert "browser_agg.safetensors" in b.eval("document.querySelector('#afa-train-progress').innerText")
    b.wait_for("document.querySelector('#afa-train-curve img')?.naturalWidth === 640", timeout=30,
               what="the loss curve")
    b.wait_for("[...document.querySelectorAll('#afa-train-samples img')].filter(i => i.naturalWidth === 64)"
               ".length === 2", timeout=30, what="the two sample images (64 px) in the gallery")
    assert gallery_captions(b, "afa-train-samples") == ["step 1", "step 2"]
    shot(b, tmp_path, "studio_train.png")
    # the Generate tab's aggregator list has the new file, without a restart or a reload
    open_tab(b, "Generate")
    b.eval("document.querySelector('#afa-gen-aggregator input').focus()")
    b.wait_for("[...document.querySelectorAll('#afa-gen-aggregator li, ul.options li')]"
               ".some(li => li.innerText.includes('browser_agg.safetensors'))", timeout=15,
               what="browser_agg.safetensors in the aggregator list")
    b.eval("document.querySelector('#afa-gen-aggregator input').blur()")


def test_generate_from_the_page_then_explore_its_maps(page, tmp_path):
    b = page.b
    open_tab(b, "Generate")
    choose(b, "afa-gen-checkpoints", page.names)
    for elem_id, value in (("afa-gen-width", 64), ("afa-gen-height", 64), ("afa-gen-steps", 2), ("afa-gen-cfg", 2)):
        set_number(b, elem_id, value)
    b.eval("document.querySelector('#afa-generate').click()")
    b.wait_for("document.querySelectorAll('#afa-gallery img').length === 3", timeout=120,
               what="the ensemble's and both base models' images")
    captions = b.eval("[...document.querySelectorAll('#afa-gallery .caption-label')].map(c => c.innerText)")
    assert captions[0].startswith("AFA ensemble") and captions[1].startswith("base model 1"), captions
    assert "3 image(s)" in b.eval("document.querySelector('#afa-gen-result').innerText")
    b.wait_for("document.querySelector('#afa-status').innerText.startsWith('Idle')", timeout=10)
    shot(b, tmp_path, "studio_generate.png")

    open_tab(b, "Maps")
    b.wait_for("document.querySelector('#afa-maps-per-model img')?.complete", timeout=30, what="the per-model maps")
    assert b.eval("document.querySelector('#afa-maps-caption').innerText").startswith("point middle")
    first = b.eval("document.querySelector('#afa-maps-per-model img').src")
    set_number(b, "afa-maps-point", 0)
    b.wait_for("document.querySelector('#afa-maps-caption').innerText.startsWith('point input 0')", timeout=30,
               what="the maps of point input 0")
    b.wait_for(f"document.querySelector('#afa-maps-per-model img')?.src !== {json.dumps(first)}", timeout=30)
    for elem_id in ("afa-maps-per-model", "afa-maps-dominant", "afa-maps-overlay"):
        b.wait_for(f"(document.querySelector('#{elem_id} img')?.naturalWidth ?? 0) > 100", timeout=30,
                   what=f"the image in #{elem_id}")
    time.sleep(0.5)  # let the new images paint
    shot(b, tmp_path, "studio_maps.png")
