"""Boot ComfyUI as a library in this process (no server), as its main.py would.

Used by the command line (``python -m afa_nodes ...``), AFA Studio and the tests. Which
ComfyUI: the one given, else the one :func:`comfy_find.find_comfyui` finds. Model folders
come from ``<ComfyUI>/extra_model_paths.yaml`` and the extra files given, as with main.py
(:func:`apply_model_paths`); :func:`load_nodes` loads custom nodes as ComfyUI does.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import itertools
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from . import logger  # relative: works when ComfyUI imports the pack by folder path
from .comfy_find import (
    HOW_TO_GET_COMFYUI,
    ComfyUINotFoundError,
    comfyui_version,
    find_comfyui,
    is_comfyui_dir,
    pack_root,
)
from .core.errors import AFAError

__all__ = [
    "ComfyInfo",
    "apply_model_paths",
    "boot_comfyui",
    "booted",
    "load_nodes",
]


@dataclass(frozen=True)
class ComfyInfo:
    """What :func:`boot_comfyui` booted."""

    path: Path          # the ComfyUI folder (holds main.py)
    version: str        # from comfyui_version.py, "unknown" when absent
    cpu: bool           # whether ComfyUI was started with --cpu
    device: str         # comfy.model_management.get_torch_device() as text


_lock = threading.RLock()
_info: ComfyInfo | None = None
_loaded_node_paths: set[str] = set()
_builtin_nodes_loaded = False


# --------------------------------------------------------------------------- boot
def booted() -> ComfyInfo | None:
    """The :class:`ComfyInfo` of the ComfyUI booted in this process, if any."""
    return _info


def _accelerator_available() -> bool:
    try:
        import torch
    except ImportError:  # ComfyUI will fail on its own with a clear message
        return False
    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            return True
    with contextlib.suppress(Exception):
        if torch.backends.mps.is_available():
            return True
    with contextlib.suppress(Exception):
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return True
    return False


_COMFY_TOP_LEVEL = ("comfy", "folder_paths", "nodes", "utils", "app", "server", "execution")


def _check_shadowing(path: Path) -> None:
    """Refuse to boot when ComfyUI's top-level module names are taken by others."""
    for name in _COMFY_TOP_LEVEL:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        locs = list(getattr(mod, "__path__", []) or [])
        if getattr(mod, "__file__", None):
            locs.append(mod.__file__)
        if not any(Path(l).resolve().is_relative_to(path.resolve()) for l in locs if l):
            raise AFAError(
                f"Cannot boot ComfyUI from {path}: a module named {name!r} is already "
                f"imported from {locs or mod!r}. ComfyUI needs that top-level name; "
                "rename the other module or start a fresh Python process.")


def _running_comfy_path() -> Path | None:
    """ComfyUI already imported in this process (e.g. we run inside ComfyUI)."""
    fp = sys.modules.get("folder_paths")
    if fp is not None and "comfy.cli_args" in sys.modules:
        base = getattr(fp, "base_path", None)
        if base:
            return Path(base)
    return None


def boot_comfyui(
    path: str | os.PathLike | None = None,
    cpu: bool | None = None,
    extra_args: Sequence[str] = (),
    *,
    output_dir: str | os.PathLike | None = None,
    temp_dir: str | os.PathLike | None = None,
    input_dir: str | os.PathLike | None = None,
    user_dir: str | os.PathLike | None = None,
    extra_model_paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    load_custom_nodes: bool | Iterable[str | os.PathLike] = False,
    load_builtin_nodes: bool = False,
) -> ComfyInfo:
    """Import ComfyUI as a library in this process and return what was booted.

    ``path``: the ComfyUI folder (default: :func:`find_comfyui`).
    ``cpu``: True passes ``--cpu``; False never does; None (default) passes it
    when torch sees no CUDA/MPS/XPU device. ``extra_args`` are more ComfyUI
    command-line arguments (parsed by ComfyUI's own parser, as ``main.py`` does).
    The directory arguments call ``folder_paths.set_*_directory`` (applied on
    every call); ``extra_model_paths`` loads an extra_model_paths.yaml, or each of a
    list of them (as ``--extra-model-paths-config``; on every call). The first boot
    loads ``<ComfyUI>/extra_model_paths.yaml`` when present, as main.py does.
    ``load_custom_nodes``: True loads this pack as a custom node (as ComfyUI
    would); an iterable loads those custom-node folders. ``load_builtin_nodes``
    loads ComfyUI's comfy_extras nodes. See :func:`load_nodes`.

    Idempotent: a second call returns the same :class:`ComfyInfo` (arguments that
    can only be applied once, ``cpu``/``extra_args``, are then ignored with a
    warning if they differ). Raises :class:`ComfyUINotFoundError` when no ComfyUI
    is found and :class:`AFAError` when the requested ComfyUI conflicts with the
    one already imported.
    """
    global _info
    with _lock:
        requested = Path(path).expanduser().absolute() if path is not None else None
        if _info is not None and ((cpu is not None and bool(cpu) != _info.cpu) or extra_args):
            logger.warning("ComfyUI is already booted (cpu=%s); ignoring cpu=%s extra_args=%s: "
                           "command-line arguments are parsed once per process.",
                           _info.cpu, cpu, list(extra_args))
        if _info is None:
            running = _running_comfy_path()
            if running is not None:
                _info = _describe(running, cpu_flag=None)
                logger.debug("Using the ComfyUI already running in this process: %s", running)
            else:
                _info = _boot(requested, cpu, extra_args)
        if requested is not None and requested.resolve() != _info.path.resolve():
            raise AFAError(
                f"ComfyUI from {_info.path} is already loaded in this process; cannot also "
                f"boot {requested}. Use a fresh Python process (or the same COMFYUI_PATH).")

        import folder_paths  # noqa: E402  (ComfyUI module, on sys.path now)

        for folder, set_directory in ((output_dir, folder_paths.set_output_directory),
                                      (temp_dir, folder_paths.set_temp_directory),
                                      (input_dir, folder_paths.set_input_directory),
                                      (user_dir, folder_paths.set_user_directory)):
            if folder is not None:
                os.makedirs(folder, exist_ok=True)
                set_directory(os.path.abspath(folder))
        if extra_model_paths is not None:
            single = isinstance(extra_model_paths, (str, os.PathLike))
            apply_model_paths(configs=[extra_model_paths] if single else extra_model_paths)

        if load_custom_nodes or load_builtin_nodes:
            if load_custom_nodes is True:
                custom: list = [pack_root()]
            elif load_custom_nodes:
                custom = list(load_custom_nodes)
            else:
                custom = []
            load_nodes(custom, builtin=load_builtin_nodes)
        return _info


def _describe(path: Path, cpu_flag: bool | None) -> ComfyInfo:
    import comfy.model_management as mm
    from comfy.cli_args import args

    return ComfyInfo(path=Path(path).absolute(), version=comfyui_version(path),
                     cpu=bool(getattr(args, "cpu", False)) if cpu_flag is None else cpu_flag,
                     device=str(mm.get_torch_device()))


def _boot(path: Path | None, cpu: bool | None, extra_args: Sequence[str]) -> ComfyInfo:
    if path is None:
        path = find_comfyui()
        if path is None:
            raise ComfyUINotFoundError(HOW_TO_GET_COMFYUI)
    if not is_comfyui_dir(path):
        raise ComfyUINotFoundError(f"{path} is not a ComfyUI folder (no main.py and comfy/).\n"
                                   + HOW_TO_GET_COMFYUI)
    path = Path(path).absolute()
    _check_shadowing(path)
    if cpu is None:
        cpu = not _accelerator_available()

    sp = str(path)
    if sp in sys.path:
        sys.path.remove(sp)
    sys.path.insert(0, sp)
    importlib.invalidate_caches()

    import comfy.options  # namespace package `comfy` from ComfyUI

    comfy_paths = [Path(p).resolve() for p in getattr(sys.modules["comfy"], "__path__", [])]
    if (path / "comfy").resolve() not in comfy_paths:
        raise AFAError(f"`import comfy` did not pick ComfyUI's comfy/ folder at {path} "
                       f"(got {comfy_paths}); another package named 'comfy' shadows it.")

    argv = [str(path / "main.py")] + (["--cpu"] if cpu else []) + [str(a) for a in extra_args]
    old_argv = sys.argv
    sys.argv = argv
    comfy.options.enable_args_parsing()
    try:
        import comfy.cli_args  # parses sys.argv exactly once, like main.py
    except SystemExit as e:  # argparse error
        raise AFAError(f"ComfyUI rejected the arguments {argv[1:]} (exit {e.code}); "
                       "see `python main.py --help` in the ComfyUI folder.") from None
    finally:
        sys.argv = old_argv
        comfy.options.enable_args_parsing(False)

    import folder_paths  # noqa: F401
    # As main.py does, import ComfyUI's `utils` package BEFORE anything imports `nodes`:
    # nodes.py puts <ComfyUI>/comfy on sys.path[0], after which `import utils` would find
    # comfy/utils.py and `server` (utils.install_util) would fail to import.
    import utils.extra_config  # noqa: F401
    import comfy.model_management  # noqa: F401  (device set-up reads the parsed args)
    import comfy.utils  # noqa: F401
    import comfy.sd  # noqa: F401

    # main.py's model folders: <ComfyUI>/extra_model_paths.yaml, then --extra-model-paths-config files
    apply_model_paths(path, itertools.chain(*(comfy.cli_args.args.extra_model_paths_config or [])))
    info = _describe(path, cpu_flag=bool(cpu))
    logger.info("Booted ComfyUI %s from %s on %s", info.version, info.path, info.device)
    return info


def apply_model_paths(comfyui_path: str | os.PathLike | None = None,
                      configs: Iterable[str | os.PathLike] = ()) -> None:
    """Add model folders to ComfyUI's folder_paths as main.py does at start:
    ``<comfyui_path>/extra_model_paths.yaml`` when present, then each file of ``configs``
    (read by ComfyUI's own loader). Raises :class:`AFAError` naming a missing file."""
    import utils.extra_config  # ComfyUI's

    default = Path(comfyui_path) / "extra_model_paths.yaml" if comfyui_path is not None else None
    files = ([default] if default is not None and default.is_file() else []) + [Path(p).expanduser() for p in configs]
    for path in files:
        if not path.is_file():
            raise AFAError(f"extra model paths file not found: {path}")
    for path in files:
        utils.extra_config.load_extra_path_config(str(path))
        logger.info("model folders from %s", path)


# -------------------------------------------------------------------------- nodes
def _run_sync(value):
    """Run a coroutine to completion (or return a plain value), even inside a running loop."""
    if not inspect.isawaitable(value):
        return value
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is None:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(value)
        finally:
            loop.close()
    box: dict = {}

    def worker():
        try:
            box["v"] = asyncio.run(value)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["e"] = e

    t = threading.Thread(target=worker, name="afa-load-nodes")
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box.get("v")


def load_nodes(custom_nodes: Iterable[str | os.PathLike] = (), builtin: bool = False) -> dict:
    """Load custom-node folders (and optionally ComfyUI's comfy_extras nodes) the way
    ComfyUI's ``nodes.init_extra_nodes`` does; return ``nodes.NODE_CLASS_MAPPINGS``.

    Works with ComfyUI's async node loading (v0.3.6x, v0.8) and older sync
    versions. Each folder is loaded at most once per process. Raises
    :class:`AFAError` when a custom-node folder fails to import (ComfyUI itself
    would only log "IMPORT FAILED"). The folder need not be
    under ``custom_nodes/``: ComfyUI imports it as a package whose ``sys.modules``
    key is the folder path (dots replaced by ``_x_``) and names it after the
    folder's basename.
    """
    global _builtin_nodes_loaded
    if _info is None:
        boot_comfyui()
    import nodes  # ComfyUI's

    hook_breaker = None
    with contextlib.suppress(ImportError):
        import hook_breaker_ac10a0 as hook_breaker  # protects core functions, as main.py does

    with _lock:
        if hook_breaker is not None:
            hook_breaker.save_functions()
        try:
            if hasattr(nodes, "init_public_apis") and not _builtin_nodes_loaded and builtin:
                _run_sync(nodes.init_public_apis())
            if builtin and not _builtin_nodes_loaded:
                failed = _run_sync(nodes.init_builtin_extra_nodes()) or []
                _builtin_nodes_loaded = True
                if failed:
                    logger.warning("ComfyUI comfy_extras nodes that failed to import: %s",
                                   ", ".join(map(str, failed)))
            base = set(nodes.NODE_CLASS_MAPPINGS.keys())
            for p in custom_nodes:
                p = os.path.abspath(os.fspath(p))
                if p in _loaded_node_paths:
                    continue
                ok = _run_sync(nodes.load_custom_node(p, base, module_parent="custom_nodes"))
                if not ok:
                    raise AFAError(f"ComfyUI could not import the custom nodes in {p} "
                                   "(IMPORT FAILED); the traceback is in the log above.")
                _loaded_node_paths.add(p)
        finally:
            if hook_breaker is not None:
                hook_breaker.restore_functions()
    return nodes.NODE_CLASS_MAPPINGS
