"""The studio's Win map tab in headless chromium: pick two checkpoints and a folder, measure, and
the verdict, the winners/wins picture and (ticked) the held-out evaluation show on the page;
the same through the tab's API endpoint with gradio_client. Skipped without chromium."""
from types import SimpleNamespace

import pytest
from test_studio import DATASET, serve_studio
from test_studio_browser import choose, open_tab, pick, set_number, shot
from toy_dataset import make_dataset

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]


@pytest.fixture(scope="module")
def page(comfy, sd15_checkpoints, browser):
    make_dataset(comfy.input_dir / DATASET, n=4)
    with serve_studio(comfy) as app:
        b = browser
        b.send("Page.enable")
        b.send("Page.navigate", {"url": app.url})
        b.wait_for("!!document.querySelector('#afa-generate') && "
                   "document.querySelector('#afa-status')?.innerText.startsWith('Idle')", timeout=90,
                   what="the studio page and its first status poll")
        yield SimpleNamespace(b=b, app=app, names=[p.name for p in sd15_checkpoints[:2]])


def test_win_map_from_the_page_shows_verdict_picture_and_evaluation(page, tmp_path):
    b = page.b
    open_tab(b, "Win map")
    b.wait_for("!!document.querySelector('#afa-winmap-run')", timeout=30, what="the Win map tab")
    choose(b, "afa-winmap-checkpoints", page.names)
    pick(b, "afa-winmap-dataset", DATASET)
    for elem_id, value in (("steps", 2), ("seeds", 1), ("grid", 4), ("resolution", 64), ("max-images", 2)):
        set_number(b, f"afa-winmap-{elem_id}", value)
    b.eval("document.querySelector('#afa-winmap-evaluate input').click()")
    b.eval("document.querySelector('#afa-winmap-run').click()")
    verdict = b.wait_for("(() => { const t = document.querySelector('#afa-winmap-verdict').innerText;"
                         " return t.startsWith('Verdict') ? t : null; })()", timeout=300, what="the verdict")
    assert any(v in verdict for v in ("complementary", "dominates everywhere", "nearly the same")), verdict
    b.wait_for("document.querySelector('#afa-winmap-overview img')?.naturalWidth > 300", timeout=30,
               what="the winners picture")
    b.wait_for("document.querySelector('#afa-winmap-evaluation img')?.naturalWidth > 300", timeout=30,
               what="the evaluation plot")
    report = b.eval("document.querySelector('#afa-winmap-report textarea').value")
    assert report.splitlines()[2].strip().startswith("ensemble: block-wise average"), report
    assert b.eval("document.querySelector('#afa-status').innerText").startswith("Idle")
    shot(b, tmp_path, "studio_winmap.png")


def test_win_map_api_refuses_a_missing_folder_and_keeps_serving(page):
    from gradio_client import Client
    client = Client(page.app.url, verbose=False)
    with pytest.raises(Exception, match="does not exist"):
        client.predict(page.names, "no_such_folder", 2, 1, 4, 64, 1, False, "block-wise average", "none",
                       api_name="/win_map")
    out = client.predict(page.names, DATASET, 1, 1, 2, 64, 1, False, "block-wise average", "none",
                         api_name="/win_map")
    assert out[0].startswith("**Verdict:**") and out[2] is None and out[3] == ""
