"""What the studio's tabs share: the one-job concurrency group, the title, and turning errors
into messages the page shows."""
from __future__ import annotations

import functools
import html

import gradio as gr

from .. import logger
from ..core.errors import AFAError

JOB_GROUP = "afa_job"          # gradio concurrency id of everything that takes the JobBoard
TITLE = "AFA Studio"


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
