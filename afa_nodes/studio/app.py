"""The gradio UI of AFA Studio: Generate, Train and Maps tabs over one `Studio`.

`build_app(studio)` returns the gr.Blocks; `launch(demo, port, share)` serves it on
127.0.0.1. Named API endpoints (for gradio_client): /generate, /maps, /train_start,
/train_stop, /cancel, /status, /refresh, /cache_clear, /demo. Jobs (/generate,
/train_start) wait in the studio's own queue (jobs.JobBoard: one runs, the others wait in
order); the status bar says what runs and lists what waits, and Cancel stops the running
job. Bad input raises gr.Error with the back end's AFAError message; the app keeps serving.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..core.errors import AFAError
from ..core.spec import Mode
from . import catalog
from .gen_tab import checkpoint_hint, generate_tab, lora_list, wire_generate
from .state import Studio
from .train_tab import samples_key, train_tab, train_values, wire_train
from .training import validation_rows
from .ui import JOB_GROUP, TITLE, user_errors, waiting_requests
from .winmap_tab import winmap_tab

POLL_SECONDS = 1.0
# the Maps tab's hover view: each model's weight at the position under the pointer (maps_view.hover_html)
HOVER_JS = """
element.addEventListener('mousemove', (e) => {
  const img = e.target.closest('.afa-hover-map');
  const out = element.querySelector('.afa-hover-readout');
  if (!img || !out) return;
  const grid = JSON.parse(img.dataset.weights), models = JSON.parse(img.dataset.models);
  const r = img.getBoundingClientRect();
  const y = Math.min(grid.length - 1, Math.max(0, Math.floor((e.clientY - r.top) / r.height * grid.length)));
  const x = Math.min(grid[0].length - 1, Math.max(0, Math.floor((e.clientX - r.left) / r.width * grid[0].length)));
  out.innerText = `position x ${x}, y ${y} (of ${grid[0].length} x ${grid.length}): ` +
    models.map((m, i) => `${m} ${grid[y][x][i].toFixed(3)}`).join(', ');
});
"""
CSS = """
#afa-status {padding: 6px 12px; border-radius: 6px; background: var(--block-background-fill);}
#afa-status p {margin: 0;}
"""


def _default_point(points: list) -> int:
    return points.index("middle") if "middle" in points else len(points) // 2


# ---------------------------------------------------------------- the app
def build_app(studio: Studio) -> gr.Blocks:
    # delete_cache: gradio keeps a copy of every image it served; drop copies older than a day, hourly
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## {TITLE}: ensembles of diffusion models with Adaptive Feature Aggregation")
        with gr.Row():
            status = gr.Markdown("Idle.", elem_id="afa-status")
            cancel = gr.Button("Cancel the running job", variant="stop", scale=0, min_width=200,
                               elem_id="afa-cancel")
        seen = gr.State(None)         # per session: what the poll last sent (versions, lists)
        maps_state = gr.State(None)   # per session: MapsView of this session's last generation
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                gen = generate_tab()
            with gr.Tab("Train", id="train"):
                train = train_tab()
            with gr.Tab("Maps", id="maps"):
                maps = _maps_tab()
            with gr.Tab("Win map", id="winmap"):
                winmap_tab(studio)
        _wire_generate(studio, gen, maps, maps_state)
        _wire_maps(maps, maps_state)
        wire_train(studio, train)
        _wire_poll(demo, studio, status, seen, gen, train)

        def cancel_job():
            message = studio.cancel()
            gr.Info(message, title=TITLE)
            return studio.board.status_line(waiting_requests(demo))
        cancel.click(cancel_job, None, status, api_name="cancel", concurrency_limit=None,
                     api_description="Cancel the running generation (within one step) or stop the training.")

        def status_api() -> dict:
            return _status_api(demo, studio)
        gr.api(status_api, api_name="status", api_description="The studio's job and the training run as JSON.")
    return demo


def _maps_tab() -> dict:
    c = {}
    c["caption"] = gr.Markdown("Generate an image (with 'record attention maps' on) to explore its maps here.",
                               elem_id="afa-maps-caption")
    with gr.Row():
        c["point"] = gr.Slider(0, 1, 0, step=1, label="aggregation point", interactive=True, elem_id="afa-maps-point")
        c["step"] = gr.Slider(0, 1, 0, step=1, label="sampler step", interactive=True, elem_id="afa-maps-step")
    with gr.Row():
        c["branch"] = gr.Radio(["cond", "uncond"], value="cond", label="pass")
        c["image"] = gr.Slider(0, 1, 0, step=1, label="image of the batch", interactive=True)
    with gr.Row():
        c["per_model"] = gr.Image(label="per-model maps (bright = that model's features are used)", type="pil",
                                  format="png", interactive=False, elem_id="afa-maps-per-model")
        c["overlay"] = gr.Image(label="dominant model over the image", type="pil", format="png", interactive=False,
                                elem_id="afa-maps-overlay")
    c["hover"] = gr.HTML("", js_on_load=HOVER_JS, elem_id="afa-maps-hover")
    with gr.Row():
        c["dominant"] = gr.Image(label="dominant model", type="pil", format="png", interactive=False,
                                 elem_id="afa-maps-dominant")
        c["chart"] = gr.Image(label="mean weight per aggregation point (this step)", type="pil", format="png",
                              interactive=False)
    return c


# ---------------------------------------------------------------- generate + maps
def _maps_outputs(maps: dict) -> list:
    return [maps[k] for k in ("caption", "point", "step", "image", "branch", "per_model", "dominant", "overlay",
                              "chart", "hover")]


def _maps_values(view, note: str = ""):
    """Outputs of `_maps_outputs` for a new generation: sliders sized to its run, first render."""
    if view is None:
        return [note or "No maps for this generation.", gr.Slider(0, 1, 0), gr.Slider(0, 1, 0), gr.Slider(0, 1, 0),
                gr.Radio(["cond", "uncond"], value="cond"), None, None, None, None, ""]
    point, step = _default_point(view.points), len(view.steps) - 1
    fig = view.render(point, step, "cond" if "cond" in view.branches else view.branches[0], 0)
    return [fig.caption,
            gr.Slider(0, max(1, len(view.points) - 1), point, step=1, interactive=len(view.points) > 1,
                      label=f"aggregation point (0-{len(view.points) - 1}: {', '.join(view.points)})"),
            gr.Slider(0, max(1, len(view.steps) - 1), step, step=1, interactive=len(view.steps) > 1,
                      label=f"sampler step (0-{len(view.steps) - 1}, of the recorded steps)"),
            gr.Slider(0, max(1, view.batch - 1), 0, step=1, interactive=view.batch > 1, label=f"image of the batch (0-{view.batch - 1})"),
            gr.Radio(view.branches, value="cond" if "cond" in view.branches else view.branches[0]),
            fig.per_model, fig.dominant, fig.overlay, fig.chart, fig.hover]


def _wire_generate(studio: Studio, gen: dict, maps: dict, maps_state):
    def on_result(result, batch):
        pictures = [(str(p.path), p.caption) for p in result.pictures]
        folder = Path(result.pictures[0].path).parent if result.pictures else ""
        summary = (f"{len(pictures)} image(s) in {result.seconds:.1f} s, saved in `{folder}` with their settings "
                   "(PNG text 'afa') and the ComfyUI workflow (PNG text 'prompt').")
        columns = min(4, max(1, len(pictures) // max(1, int(batch or 1))))
        return [gr.Gallery(pictures, columns=columns), summary, result.maps] + _maps_values(result.maps, result.note)
    wire_generate(studio, gen, on_result, [gen["gallery"], gen["result"], maps_state] + _maps_outputs(maps))


def _wire_maps(maps: dict, maps_state):
    @user_errors
    def render(view, point, step, branch, image):
        if view is None:
            raise AFAError("no maps yet in this browser session: generate an image in the Generate tab "
                           "(with 'record attention maps' on), then come back.")
        fig = view.render(int(point), int(step), branch, int(image))
        return fig.caption, fig.per_model, fig.dominant, fig.overlay, fig.chart, fig.hover

    inputs = [maps_state, maps["point"], maps["step"], maps["branch"], maps["image"]]
    outputs = [maps["caption"], maps["per_model"], maps["dominant"], maps["overlay"], maps["chart"], maps["hover"]]
    # .input fires on user changes only (not when a generation resizes the sliders)
    maps["point"].input(render, inputs, outputs, api_name="maps", show_progress="minimal", trigger_mode="always_last",
                        api_description="Render the maps of this session's last generation.")
    for control in (maps["step"], maps["image"], maps["branch"]):
        control.input(render, inputs, outputs, api_visibility="private", show_progress="minimal",
                      trigger_mode="always_last")


# ---------------------------------------------------------------- poll (status bar, training, lists)
def _wire_poll(demo: gr.Blocks, studio: Studio, status, seen, gen: dict, train: dict):
    lists = [gen["checkpoints"], gen["aggregator"], train["checkpoints"], train["options"]["dataset_folder"],
             gen["controlnet"], train["diffusion_models"], train["text_encoders"], train["vae"],
             gen["diffusion_models"], gen["text_encoders"], gen["vae"]]
    texts = [gen["hint"], gen["cache"], gen["lora_list"]]
    train_outputs = [train["progress"], train["curve"], train["table"], train["report"], train["samples"]]

    def poll(last):
        """Every second per open page: the status bar, and what changed since this page's last poll."""
        last = dict(last or {})
        snap = studio.training_snapshot()
        out = [studio.board.status_line(waiting_requests(demo))]
        if last.get("train") == (snap.version, snap.state):
            out += [gr.skip()] * len(train_outputs)
        else:
            last["train"] = (snap.version, snap.state)
            samples = samples_key(snap)
            out += train_values(snap, samples_changed=last.get("samples") != samples)
            last["samples"] = samples
        for i, values in enumerate(_list_choices()):
            if last.get(f"list{i}") == values:
                out.append(gr.skip())
            else:
                last[f"list{i}"] = values
                out.append(gr.Dropdown(choices=values))
        for i, text in enumerate(_texts(studio)):
            out.append(gr.skip() if last.get(f"text{i}") == text else text)
            last[f"text{i}"] = text
        return out + [last]

    outputs = [status] + train_outputs + lists + texts + [seen]
    gr.Timer(POLL_SECONDS).tick(poll, seen, outputs, api_visibility="private", show_progress="hidden",
                                concurrency_limit=None, concurrency_id="afa_poll")
    demo.load(poll, seen, outputs, api_visibility="private", show_progress="hidden", concurrency_limit=None,
              concurrency_id="afa_poll")

    def refresh():
        return [gr.Dropdown(choices=values) for values in _list_choices()]
    gen["refresh"].click(refresh, None, lists, api_name="refresh", concurrency_limit=None,
                         api_description="Re-read ComfyUI's model folders and input directory.")


def _list_choices() -> list:
    """Choices of the lists the poll keeps fresh, in the order of `_wire_poll`'s `lists`."""
    checkpoints = catalog.checkpoints()
    split = [catalog.diffusion_models(), catalog.text_encoders(), catalog.vaes()]
    return [checkpoints, catalog.aggregators(), checkpoints, catalog.dataset_folders(), catalog.controlnets(),
            *split, *split]


def _texts(studio: Studio) -> list:
    """Texts the poll keeps fresh, in the order of `_wire_poll`'s `texts`."""
    return [checkpoint_hint(), studio.cache.summary(), lora_list(catalog.loras())]


def _status_api(demo: gr.Blocks, studio: Studio) -> dict:
    snap = studio.training_snapshot()
    job = studio.board.current
    return {"status": studio.board.status_line(waiting_requests(demo)),
            "job": None if job is None else {"kind": job.kind, "label": job.label, "detail": job.detail},
            "waiting": waiting_requests(demo),
            "checkpoint_folders": catalog.checkpoint_folders(),
            "queue": [{"kind": j.kind, "label": j.label} for j in studio.board.waiting()],
            "cache": {"checkpoints": studio.cache.entries(), "loads": studio.cache.loads, "hits": studio.cache.hits,
                      "capacity": studio.cache.capacity},
            "training": {"state": snap.state, "message": snap.message, "step": snap.step, "total": snap.total,
                         "loss": snap.history[-1][1] if snap.history else None, "eta_seconds": snap.eta_seconds,
                         "validation": validation_rows(snap.validation), "file": snap.out_path,
                         "report": snap.report, "samples": snap.samples}}


# ---------------------------------------------------------------- serving
def launch(demo: gr.Blocks, port: int = 7860, share: bool = False, allowed_paths=()) -> tuple:
    """Serve on 127.0.0.1:`port` without blocking; a public gradio link only when `share`.
    Returns (local URL, public URL or None). `demo.block_thread()` then waits for Ctrl-C and
    `demo.close()` stops the server."""
    demo.queue(default_concurrency_limit=1)
    _, url, share_url = demo.launch(server_name="127.0.0.1", server_port=port, share=bool(share),
                                    prevent_thread_lock=True, ssr_mode=False, quiet=True, show_error=True,
                                    allowed_paths=list(allowed_paths), footer_links=["api"], css=CSS)
    return url, (share_url if share else None)
