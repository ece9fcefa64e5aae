"""The real ComfyUI frontend in headless Debian chromium: the AFA nodes are in the node
library, and an example workflow from workflows/ loads and runs from the UI.
Screenshots go to test-artifacts/. Skipped when chromium is not installed."""
import json
from pathlib import Path

import pytest
from browser import ARTIFACTS

pytestmark = pytest.mark.comfyui
WORKFLOW = Path(__file__).resolve().parent.parent / "workflows" / "afa_2_models_txt2img.json"
AFA_NODES = ["AFAEnsembleLoader", "AFAEnsemble", "AFACLIPMerge", "AFALoadAggregator", "AFATrainAggregator",
             "AFARecordAttention", "AFAAttentionPreview"]


def test_example_workflow_loads_and_runs_from_the_ui(comfy_server, sd15_checkpoints, browser):
    srv, b = comfy_server, browser
    srv.post_json("/settings/Comfy.TutorialCompleted", True)  # no first-run templates dialog
    b.send("Page.enable")
    b.send("Page.navigate", {"url": srv.base_url + "/"})
    b.wait_for("!!window.comfyAPI?.app?.app?.graph && !!window.LiteGraph?.registered_node_types?.AFAEnsembleLoader",
               what="the frontend with the AFA nodes")
    categories = b.eval(f"{json.dumps(AFA_NODES)}.map(t => window.LiteGraph.registered_node_types[t]?.category)")
    assert categories == ["AFA"] * len(AFA_NODES)

    # the node library (sidebar) lists the AFA category and its nodes
    b.eval("(() => { const t = [...document.querySelectorAll('button, [role=tab]')].find(e =>"
           " /node.?library/i.test((e.className || '') + ' ' + (e.getAttribute('aria-label') || '')"
           " + ' ' + (e.title || ''))); if (t) t.click(); })()")
    b.wait_for("document.body.innerText.includes('AFA')", timeout=30, what="the AFA category in the node library")
    b.eval("(() => { const e = [...document.querySelectorAll('.p-tree-node-label, [class*=tree] span, span')]"
           ".find(s => s.textContent.trim() === 'AFA'); if (e) e.click(); })()")
    b.wait_for("document.body.innerText.includes('AFA Ensemble Loader')", timeout=30,
               what="AFA Ensemble Loader in the node library")
    b.screenshot(ARTIFACTS / "afa_node_library.png")

    # load the shared workflow file as an artist would (drag-and-drop = loadGraphData), shrink it for a CPU
    workflow = json.loads(WORKFLOW.read_text())
    b.wait_for(f"(async () => {{ const app = window.comfyAPI.app.app;"
               f" await app.loadGraphData({json.dumps(workflow)});"
               " await new Promise(r => setTimeout(r, 500));"
               " return app.graph.nodes.some(n => n.type === 'AFAEnsembleLoader'); })()",
               timeout=60, what="the workflow to load")
    b.eval("(() => { const set = (n, name, v) => { const w = n.widgets?.find(w => w.name === name); if (w) w.value = v; };"
           " for (const n of window.comfyAPI.app.app.graph.nodes) { set(n, 'steps', 2);"
           " set(n, 'width', 64); set(n, 'height', 64); set(n, 'filename_prefix', 'browser_afa'); } })()")
    before = set(srv.get_json("/history").keys())
    b.eval("window.comfyAPI.app.app.queuePrompt(0, 1)")
    prompt_id = b.wait_for(f"(async () => {{ const h = await (await fetch('/history')).json();"
                           f" const ids = Object.keys(h).filter(k => !{json.dumps(sorted(before))}.includes(k));"
                           " return ids.length ? ids[0] : null; })()", timeout=300, what="the queued prompt in /history")
    entry = srv.wait(prompt_id, timeout=300)
    images = srv.output_images(entry)
    assert images and all(p.name.startswith("browser_afa") for p in images)
    from PIL import Image
    import numpy as np
    pixels = np.asarray(Image.open(images[0]), dtype=np.float32)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0
    b.screenshot(ARTIFACTS / "afa_workflow_ran.png")
