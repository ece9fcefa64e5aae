"""What the studio's tabs share: the one-job concurrency group, the title, turning errors
into messages the page shows, and the DiT split-file choice (Generate and Train)."""
from __future__ import annotations

import functools
import html

import gradio as gr

from .. import logger
from ..core.errors import AFAError
from . import catalog

JOB_GROUP = "afa_job"          # gradio concurrency id of everything that takes the JobBoard
TITLE = "AFA Studio"
SPLIT = ("diffusion_models", "text_encoders", "vae", "clip_type")   # DiT split files, instead of checkpoints


def user_errors(fn):
    """AFAError -> gr.Error with its message (shown in the UI, no traceback); anything else is
    logged with its traceback and shown briefly. The app keeps serving either way."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except AFAError as e:
            logger.info("AFA Studio refused a request: %s", e)
            raise gr.Error(as_text(str(e)), title=TITLE, print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the UI must say something; the log has the traceback
            logger.exception("AFA Studio: %s failed", fn.__name__)
            raise gr.Error(as_text(f"{type(e).__name__}: {e} (the traceback is in the studio's log)"), title=TITLE,
                           print_exception=False) from None
    return wrapper


def as_text(message: str) -> str:
    """A message for gradio's HTML-rendering places (toasts, Markdown): names from files and
    user input (checkpoint names, captions) show as text, never as markup."""
    return html.escape(message, quote=False)


def waiting_requests(demo: gr.Blocks) -> int:
    """Requests in gradio's queue for the job group (0 when gradio's internals differ)."""
    try:
        return len(demo._queue.event_queue_per_concurrency_id[JOB_GROUP].queue)
    except (AttributeError, KeyError):
        return 0


def label(name: str) -> str:
    return name.replace("_", " ")


def split_file_widgets(c: dict, tab: str):
    """The SPLIT widgets (elem ids afa-<tab>-diffusion-models, ...) into `c`: diffusion model files
    sharing text encoder file(s) and a VAE, as ComfyUI's Load Diffusion Model, (Dual/Triple)CLIPLoader
    with a type and Load VAE read them."""
    c["diffusion_models"] = gr.Dropdown(catalog.diffusion_models(), value=[], multiselect=True, max_choices=6,
                                        allow_custom_value=True, label="diffusion model files (2-6)",
                                        info="models/diffusion_models, as 'Load Diffusion Model' reads them",
                                        elem_id=f"afa-{tab}-diffusion-models")
    c["text_encoders"] = gr.Dropdown(catalog.text_encoders(), value=[], multiselect=True, max_choices=3,
                                     allow_custom_value=True, label="text encoder file(s) (1-3)",
                                     info="models/text_encoders, shared by the diffusion models (FLUX: clip_l + "
                                          "t5xxl; SD3/SD3.5: clip_l + clip_g + t5xxl)",
                                     elem_id=f"afa-{tab}-text-encoders")
    with gr.Row():
        c["vae"] = gr.Dropdown(catalog.vaes(), value=catalog.NONE, allow_custom_value=True, label="VAE",
                               info="models/vae (FLUX: ae.safetensors)", elem_id=f"afa-{tab}-vae")
        c["clip_type"] = gr.Dropdown(catalog.CLIP_TYPES, value="auto", label="text encoder type",
                                     info="as in ComfyUI's Load CLIP / DualCLIPLoader; auto: the models' family's",
                                     elem_id=f"afa-{tab}-clip-type")
