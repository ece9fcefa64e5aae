"""AFA Studio's generation inputs (issue #17 A) driven in headless chromium against a running
studio: a LoRA on one model and on the ensemble, img2img, inpainting with a mask, and a ControlNet,
each typed, chosen or uploaded on the page and pressed through the Generate button. Tiny files in
ComfyUI's real key layouts (tests/tiny_models.py), 64 px, 2 steps, the ensemble image only."""
import json

import numpy as np
import pytest
from browser import (choose, gallery_files, open_accordion, open_tab, run_generation, select, set_number, set_text,
                     toast, upload)
from PIL import Image
from studio_page import CONTROLNET, LORA, SIZE, mse, pixels, studio_page

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]


@pytest.fixture(scope="module")
def page(comfy, comfy_nodes, sd15_checkpoints, browser, tmp_path_factory):
    # comfy_nodes: the pack's nodes registered, so ComfyUI can validate the saved workflows
    with studio_page(comfy, sd15_checkpoints, browser, tmp_path_factory.mktemp("studio_generate")) as p:
        b = p.b
        open_tab(b, "Generate")
        choose(b, "afa-gen-checkpoints", p.names)
        for elem_id, value in dict(SIZE, **{"afa-gen-seed": 3}).items():
            set_number(b, elem_id, value)
        for elem_id in ("afa-gen-compare", "afa-gen-record-maps"):  # the ensemble's image only, no maps
            if b.eval(f"document.querySelector('#{elem_id} input').checked"):
                b.eval(f"document.querySelector('#{elem_id} input').click()")
        yield p


def ensemble(page):
    """Press Generate; -> (the ensemble image as float pixels, the settings embedded in its PNG)."""
    assert run_generation(page.b, 1)[0].startswith("AFA ensemble")
    path = gallery_files(page.b)[0]
    return pixels(path), json.loads(Image.open(path).text["afa"])


def saved_workflow(page) -> list:
    """The ComfyUI graph embedded in the shown image's PNG, checked as ComfyUI's /prompt checks
    it (the pack's on_prompt handler, then validate_prompt: node types, inputs, links, files);
    -> its nodes' class types."""
    import asyncio

    import execution

    from afa_nodes.nodes import accept_both_slot_names
    graph = json.loads(Image.open(gallery_files(page.b)[0]).text["prompt"])
    accept_both_slot_names({"prompt": graph})   # v0.3.64 names the growing slots 'model_1', not 'models.model_1'
    valid, error, _, node_errors = asyncio.run(execution.validate_prompt("afa-studio-test", graph, None))
    assert valid, (error, node_errors)
    return sorted(n["class_type"] for n in graph.values())


def clear_image(b, elem_id):
    """Press the image's Remove Image button (nothing when it holds none)."""
    b.eval(f"document.querySelector('#{elem_id} button[aria-label=\\'Remove Image\\']')?.click()")
    b.wait_for(f"!document.querySelector('#{elem_id} img')", timeout=15, what=f"#{elem_id} emptied")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """init.png: smooth colour ramps; mask.png: the right half white (repaint); control.png: noise."""
    folder = tmp_path_factory.mktemp("generate_inputs")
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    init = np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)), np.full((64, 64), 50.0)], -1)
    Image.fromarray(init.astype("uint8")).save(folder / "init.png")
    mask = np.zeros((64, 64), dtype="uint8")
    mask[:, 32:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    noise = np.random.default_rng(0).random((64, 64, 3)) * 255
    Image.fromarray(noise.astype("uint8")).save(folder / "control.png")
    return folder


def test_a_lora_typed_on_the_page_changes_one_model_or_the_ensemble(page):
    """Typed into the LoRA box (open: text typed into a closed accordion's hidden box goes nowhere,
    which is why an earlier attempt saw no change)."""
    b = page.b
    open_accordion(b, "LoRA", "afa-gen-loras")
    set_text(b, "afa-gen-loras", "")
    plain, settings = ensemble(page)
    assert settings["loras"] == [[], []]
    set_text(b, "afa-gen-loras", f"2: {LORA}:1")
    model2, settings = ensemble(page)
    assert settings["loras"] == [[], [[LORA, 1.0]]] and mse(model2, plain) > 1e-3
    set_text(b, "afa-gen-loras", f"2: {LORA}:0")            # strength 0: as no LoRA, pixel for pixel
    zero, settings = ensemble(page)
    assert settings["loras"] == [[], [[LORA, 0.0]]] and np.array_equal(zero, plain)
    b.eval("(() => { const t = document.querySelector('#afa-gen-loras textarea'); t.value = '';"
           " t.dispatchEvent(new Event('input', {bubbles: true})); t.focus(); })()")
    b.send("Input.insertText", {"text": f"all: {LORA}"})    # typed as a user types; strength 1 when left out
    everyone, settings = ensemble(page)
    assert settings["loras"] == [[[LORA, 1.0]], [[LORA, 1.0]]]
    assert mse(everyone, plain) > 1e-3 and mse(everyone, model2) > 1e-3
    nodes = saved_workflow(page)                             # the saved workflow has the LoRAs too
    assert nodes.count("LoraLoader") == 2 and nodes.count("CheckpointLoaderSimple") == 2
    assert "AFAEnsemble" in nodes and "AFACLIPMerge" in nodes
    set_text(b, "afa-gen-loras", "3: missing.safetensors")
    b.eval("document.querySelector('#afa-generate').click()")
    assert "model 3 is not in the ensemble" in toast(b, "LoRA line 1")
    set_text(b, "afa-gen-loras", "")


def test_a_controlnet_chosen_with_a_control_image_guides_the_ensemble(page, images):
    b = page.b
    plain, _ = ensemble(page)
    open_accordion(b, "ControlNet", "afa-gen-controlnet")
    select(b, "afa-gen-controlnet", CONTROLNET)
    upload(b, "afa-gen-control-image", images / "control.png")
    set_number(b, "afa-gen-control-strength", 1)
    guided, settings = ensemble(page)
    assert settings["controlnet"] == {"name": CONTROLNET, "strength": 1.0} and mse(guided, plain) > 1e-3
    nodes = saved_workflow(page)
    assert {"ControlNetLoader", "ControlNetApplyAdvanced", "LoadImage", "AFAEnsembleLoader"} <= set(nodes)
    set_number(b, "afa-gen-control-strength", 0)             # strength 0: as none, pixel for pixel
    zero, settings = ensemble(page)
    assert settings["controlnet"]["strength"] == 0.0 and np.array_equal(zero, plain)
    clear_image(b, "afa-gen-control-image")
    set_number(b, "afa-gen-control-strength", 1)
    b.eval("document.querySelector('#afa-generate').click()")
    toast(b, "needs a control image")
    select(b, "afa-gen-controlnet", "none")


def test_img2img_keeps_the_init_image_by_denoise_and_inpainting_repaints_only_the_mask(page, images):
    """The demo checkpoints' VAE is random, so an image comes back from it changed: 'the init image'
    is what denoise 0 gives (the init image through the VAE), and the tests measure against it."""
    b = page.b
    txt2img, settings = ensemble(page)
    assert not settings["img2img"]
    open_accordion(b, "img2img", "afa-gen-init")
    upload(b, "afa-gen-init", images / "init.png")
    kept = {}
    for denoise in (0.0, 0.3, 0.5):
        set_number(b, "afa-gen-denoise", denoise)
        kept[denoise], settings = ensemble(page)
        assert settings["img2img"] and settings["denoise"] == denoise and not settings["inpaint"]
    assert {"LoadImage", "ImageScale", "VAEEncode"} <= set(saved_workflow(page))
    init, through_vae = pixels(images / "init.png"), kept[0.0]
    assert mse(kept[0.3], through_vae) < mse(kept[0.5], through_vae) < 0.8 * mse(txt2img, through_vae)
    assert mse(kept[0.5], init) < mse(txt2img, init) and mse(kept[0.5], txt2img) > 1e-3

    set_number(b, "afa-gen-denoise", 1.0)
    upload(b, "afa-gen-mask", images / "mask.png")           # right half white: repaint it
    inpainted, settings = ensemble(page)
    assert settings["inpaint"] and {"LoadImageMask", "VAEEncodeForInpaint"} <= set(saved_workflow(page))
    keep, repaint = np.s_[:, :28], np.s_[:, 36:]             # 4 px either side of the edge: grow_mask, VAE
    assert mse(inpainted[keep], through_vae[keep]) < 0.25 * mse(inpainted[repaint], through_vae[repaint])
    assert mse(inpainted[keep], init[keep]) < mse(txt2img[keep], init[keep])
    assert mse(inpainted[repaint], txt2img[repaint]) < mse(inpainted[repaint], through_vae[repaint])
    clear_image(b, "afa-gen-init")                           # a mask without an init image: a message
    b.eval("document.querySelector('#afa-generate').click()")
    toast(b, "inpainting needs an init image")
    clear_image(b, "afa-gen-mask")
    again, settings = ensemble(page)
    assert not settings["img2img"] and np.array_equal(again, txt2img) and "EmptyLatentImage" in saved_workflow(page)
