"""The studio's Win map tab in headless chromium: pick two checkpoints and a folder, measure, and
the verdict, the winners/wins picture and (ticked) the held-out evaluation show on the page;
the same through the tab's API endpoint with gradio_client. Skipped without chromium."""
import pytest
from test_studio import DATASET
from test_studio_browser import choose, open_tab, page, pick, set_number, shot  # noqa: F401 - page: the fixture

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]


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
    b.wait_for("document.querySelector('#afa-status').innerText.startsWith('Idle')", timeout=30,
               what="the status bar to show the studio idle again")
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
