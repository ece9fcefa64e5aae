"""AFA Studio on DiT split files in headless Debian chromium (tests/browser.py): with no models
chosen Start shows the message saying what to choose; the tiny SD3 split files
(tests/dit_files.py) picked under 'DiT split files' (diffusion models, text encoder, VAE, type)
train an aggregator to the end from the page, and generate in the Generate tab with each model
alone beside the ensemble. Skipped when chromium is not installed."""
import json
from types import SimpleNamespace

import pytest
from browser import STUDIO_READY, choose, gallery_files, open_accordion, open_page, open_tab, pick, run_generation, \
    select, set_number, set_text, shot, toast
from PIL import Image
from dit_files import check_trained, in_comfyui_folders, sd3_demo_files
from test_studio import DATASET, serve_studio
from toy_dataset import make_dataset

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]  # gradio's own pandas deprecations


@pytest.fixture(scope="module")
def page(comfy, sd15_checkpoints, browser):
    files = sd3_demo_files(sd15_checkpoints[0])
    make_dataset(comfy.input_dir / DATASET)
    with in_comfyui_folders(files) as names, serve_studio(comfy) as app:
        open_page(browser, app.url, STUDIO_READY, what="the studio page and its first status poll")
        yield SimpleNamespace(b=browser, app=app, files=files, names=names)


def test_start_without_models_says_what_to_choose(page):
    b = page.b
    open_tab(b, "Train")
    pick(b, "afa-train-dataset-folder", DATASET)
    b.eval("document.querySelector('#afa-train-start').click()")
    assert "or under 'DiT split files' 2-6 diffusion model files" in toast(b, "choose at least 2 checkpoints")
    assert b.eval("document.querySelector('#afa-status').innerText").startswith("Idle")


def test_training_on_split_files_picked_on_the_page(page, comfy, tmp_path):
    b, names = page.b, page.names
    open_tab(b, "Train")
    open_accordion(b, "DiT split files", "afa-train-diffusion-models")
    choose(b, "afa-train-diffusion-models", names["diffusion_models"])
    choose(b, "afa-train-text-encoders", names["text_encoders"])
    select(b, "afa-train-vae", names["vae"][0])
    select(b, "afa-train-clip-type", "sd3")
    pick(b, "afa-train-dataset-folder", DATASET)
    set_text(b, "afa-train-save-name", "browser_sd3")
    for elem_id, value in (("steps", 2), ("batch-size", 1), ("resolution", 64), ("save-every", 0)):
        set_number(b, f"afa-train-{elem_id}", value)
    b.eval("document.querySelector('#afa-train-start').click()")
    b.wait_for("document.querySelector('#afa-train-progress').innerText.startsWith('Finished')", timeout=180,
               what="the training on the split files to finish")
    assert "browser_sd3.safetensors" in b.eval("document.querySelector('#afa-train-progress').innerText")
    rows = b.wait_for("(() => { const r = [...document.querySelectorAll('#afa-train-table [role=row]')]"
                      ".filter(tr => tr.getAttribute('aria-rowindex') !== '1').map(tr => tr.innerText);"
                      " return r.length === 4 ? r : null; })()", timeout=15, what="the validation table")
    assert sum(names["diffusion_models"][0] in r for r in rows) == 1, rows
    shot(b, tmp_path, "studio_train_dit.png")
    check_trained(comfy.models_dir / "afa" / "browser_sd3.safetensors", page.files, "mmdit")


def test_generating_with_split_files_picked_on_the_page(page, tmp_path):
    b, names = page.b, page.names
    open_tab(b, "Generate")
    b.eval("[...document.querySelectorAll('button, .label-wrap')].filter(e => e.offsetParent !== null && "
           "e.innerText.trim().startsWith('DiT split files')).pop()?.click()")   # the Generate tab's accordion
    b.wait_for("document.querySelector('#afa-gen-diffusion-models')?.offsetParent != null", timeout=10,
               what="the Generate tab's 'DiT split files' open")
    choose(b, "afa-gen-diffusion-models", names["diffusion_models"])
    choose(b, "afa-gen-text-encoders", names["text_encoders"])
    select(b, "afa-gen-vae", names["vae"][0])
    for elem_id, value in (("afa-gen-width", 64), ("afa-gen-height", 64), ("afa-gen-steps", 2), ("afa-gen-cfg", 2)):
        set_number(b, elem_id, value)
    if b.eval("document.querySelector('#afa-gen-record-maps input').checked"):
        b.eval("document.querySelector('#afa-gen-record-maps input').click()")
    captions = run_generation(b, 3)
    assert captions == ["AFA ensemble (block-wise average)"] + [
        f"base model {i + 1}: {n}" for i, n in enumerate(names["diffusion_models"])], captions
    settings = json.loads(Image.open(gallery_files(b)[0]).text["afa"])
    assert settings["split_files"]["diffusion_models"] == names["diffusion_models"]
    assert settings["split_files"]["clip_type"] == "sd3" and settings["width"] == 64
    shot(b, tmp_path, "studio_generate_dit.png")
