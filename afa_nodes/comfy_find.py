"""Find the ComfyUI installation that ComfyUI-AFA uses (read only: nothing is imported).

The pack never ships ComfyUI code: it only *finds* an existing ComfyUI; `comfy_env`
boots the one found here as a library.

Discovery order (:func:`find_comfyui`):

1. ``$COMFYUI_PATH`` (when set, it must point at a ComfyUI folder; a wrong
   value is reported instead of silently falling back to another ComfyUI);
2. the ComfyUI this pack is installed in (``<ComfyUI>/custom_nodes/<pack>``),
   checked for both the path Python imported the pack from and its symlink-
   resolved location;
3. ``~/comfy/ComfyUI`` (where ``comfy install`` of comfy-cli puts it).

A folder is a ComfyUI when it has ``main.py`` and a ``comfy/`` folder.

Command line::

    python -m afa_nodes.comfy_find --find      # prints the path, exit 1 + how-to if none
    python -m afa_nodes.comfy_find --version   # prints the ComfyUI version found
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from . import logger  # relative: works when ComfyUI imports the pack by folder path
from .core.errors import AFAError

__all__ = [
    "HOW_TO_GET_COMFYUI",
    "ComfyUINotFoundError",
    "comfyui_version",
    "find_comfyui",
    "has_cli_flag",
    "is_comfyui_dir",
    "pack_root",
]

DEFAULT_COMFYUI = Path("~/comfy/ComfyUI")

HOW_TO_GET_COMFYUI = (
    "ComfyUI was not found. ComfyUI-AFA needs a ComfyUI installation (it looks at "
    "$COMFYUI_PATH, then the ComfyUI this pack is installed in, then ~/comfy/ComfyUI). "
    "Get one with:\n"
    "    git clone https://github.com/comfyanonymous/ComfyUI ~/comfy/ComfyUI && "
    "pip install -r ~/comfy/ComfyUI/requirements.txt\n"
    "or:\n"
    "    pip install comfy-cli && comfy install\n"
    "(comfy-cli installs into ~/comfy/ComfyUI unless told otherwise; `comfy which` prints where).\n"
    "Or point COMFYUI_PATH at an existing ComfyUI folder (the one holding main.py):\n"
    "    export COMFYUI_PATH=/path/to/ComfyUI"
)


class ComfyUINotFoundError(AFAError):
    """No usable ComfyUI installation; the message says how to get one."""


def is_comfyui_dir(path: str | os.PathLike | None) -> bool:
    """True when ``path`` holds ``main.py`` and a ``comfy/`` folder."""
    if not path:
        return False
    p = Path(path).expanduser()
    return (p / "main.py").is_file() and (p / "comfy").is_dir()


def pack_root(resolve: bool = False) -> Path:
    """The pack's root folder (parent of ``afa_nodes/``).

    Unresolved by default: when the pack is symlinked into
    ``<ComfyUI>/custom_nodes/``, Python's ``__file__`` keeps the symlinked path.
    """
    here = Path(os.path.abspath(__file__)).parent.parent
    return here.resolve() if resolve else here


def _installed_in_candidates() -> list[Path]:
    out: list[Path] = []
    for root in (pack_root(False), pack_root(True)):
        if root.parent.name == "custom_nodes":
            cand = root.parent.parent
            if cand not in out:
                out.append(cand)
    return out


def find_comfyui() -> Path | None:
    """Return the ComfyUI folder to use, or None (see the module doc for the order)."""
    env = os.environ.get("COMFYUI_PATH", "").strip()
    if env:
        p = Path(env).expanduser()
        if is_comfyui_dir(p):
            return p.absolute()
        logger.warning(
            "COMFYUI_PATH=%s is not a ComfyUI folder (no main.py and comfy/ there); "
            "fix or unset it.", env)
        return None
    for cand in _installed_in_candidates():
        if is_comfyui_dir(cand):
            return cand.absolute()
    default = DEFAULT_COMFYUI.expanduser()
    if is_comfyui_dir(default):
        return default.absolute()
    return None


def comfyui_version(path: str | os.PathLike) -> str:
    """The ``__version__`` in ``<path>/comfyui_version.py`` (read, not imported)."""
    f = Path(path).expanduser() / "comfyui_version.py"
    try:
        text = f.read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    m = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text)
    return m.group(1) if m else "unknown"


def has_cli_flag(path: str | os.PathLike, flag: str) -> bool:
    """Whether ComfyUI at ``path`` knows the command-line flag (e.g. ``--whitelist-custom-nodes``)."""
    try:
        text = (Path(path).expanduser() / "comfy" / "cli_args.py").read_text(encoding="utf-8")
    except OSError:
        return False
    return re.search(r"""['"]%s['"]""" % re.escape(flag), text) is not None


# ---------------------------------------------------------------------------- CLI
def _cli_logging() -> None:
    if any(getattr(h, "_afa_cli", False) for h in logger.handlers):
        return
    out = logging.StreamHandler(sys.stdout)
    out.setLevel(logging.INFO)
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(logging.Formatter("%(message)s"))
        h._afa_cli = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m afa_nodes.comfy_find",
                                 description="Find the ComfyUI that ComfyUI-AFA uses.")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--find", action="store_true", help="print the ComfyUI folder (default)")
    g.add_argument("--version", action="store_true", help="print the ComfyUI version")
    g.add_argument("--how-to", action="store_true", help="print how to get ComfyUI")
    ns = ap.parse_args(argv)
    _cli_logging()
    if ns.how_to:
        logger.info("%s", HOW_TO_GET_COMFYUI)
        return 0
    path = find_comfyui()
    if path is None:
        logger.error("%s", HOW_TO_GET_COMFYUI)
        return 1
    logger.info("%s", comfyui_version(path) if ns.version else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
