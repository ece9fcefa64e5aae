"""Shared pytest fixtures.

ComfyUI is found with :func:`afa_nodes.comfy_find.find_comfyui` ($COMFYUI_PATH, the
ComfyUI this pack is installed in, ~/comfy/ComfyUI). Where there is none, every
test that needs it is SKIPPED with the instructions to get one; all other tests
still run.

Fixtures (all session-scoped):

* ``comfyui_path``: the ComfyUI folder (skips when none).
* ``comfy``: ComfyUI booted in this process as a library (``--cpu`` when there is
  no GPU), with temporary output/input/user/temp directories and the
  ``models_dir`` folders registered through an extra_model_paths.yaml (as the
  server tests do). A :class:`ComfyLib`; ``comfy.load_pack()`` loads this pack
  as a custom node (as ComfyUI would) and returns ``nodes.NODE_CLASS_MAPPINGS``.
* ``comfy_nodes``: ``comfy.load_pack()``, i.e. ComfyUI's node mappings with ours.
* ``models_dir``: a temp folder with ``checkpoints/`` and ``afa/`` (and vae/, loras/).
* ``sd15_checkpoints`` / ``sdxl_checkpoints``: 3 / 2 synthetic checkpoints, built
  once into ``~/.cache/comfyui-afa-tests/<builder-version>/`` (``$AFA_TEST_CACHE``
  overrides the root) and symlinked into ``models_dir/checkpoints``; the fixture
  returns those paths (``.name`` is the ckpt_name for loader nodes). SD1.5 ones
  have CLIP and a (TAESD) VAE; SDXL-family ones are UNet-only: feed conditioning
  tensors directly (context [B, 77, 2048], pooled_output [B, 1280]).
* ``comfy_server``: a ComfyUI server (subprocess, tests/comfy_server.py) with the
  pack installed and ``models_dir`` mounted; started on first use, stopped at the end.

Pitfall: in a test taking the ``comfy`` fixture, ``import comfy.sd`` rebinds the name
``comfy`` to ComfyUI's package; import as ``import comfy.sd as comfy_sd`` instead.
In library mode there is no ``server.PromptServer.instance`` (no server runs).

Mark tests that need ComfyUI with ``@pytest.mark.comfyui``: they are skipped
(with the how-to) when none is found even if they use no fixture from here.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for _p in (str(REPO_ROOT), str(TESTS_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from afa_nodes import comfy_env  # noqa: E402
from afa_nodes.comfy_find import HOW_TO_GET_COMFYUI, find_comfyui  # noqa: E402

SD15_COUNT = 3
SDXL_COUNT = 2


def require_comfyui() -> Path:
    """The ComfyUI folder, or skip the calling test with the how-to-get-it message."""
    path = find_comfyui()
    if path is None:
        env = os.environ.get("COMFYUI_PATH")
        prefix = f"COMFYUI_PATH={env} is not a ComfyUI folder. " if env else ""
        pytest.skip(prefix + HOW_TO_GET_COMFYUI)
    return path


def checkpoint_cache_dir() -> Path:
    from afa_nodes.demo_checkpoints import BUILDER_VERSION

    root = os.environ.get("AFA_TEST_CACHE") or os.path.join("~", ".cache", "comfyui-afa-tests")
    return Path(root).expanduser() / BUILDER_VERSION


def pytest_runtest_setup(item):
    if item.get_closest_marker("comfyui") is not None:
        require_comfyui()


@dataclass
class ComfyLib:
    """ComfyUI booted in the test process."""

    info: comfy_env.ComfyInfo
    models_dir: Path
    output_dir: Path
    input_dir: Path
    temp_dir: Path
    user_dir: Path
    _nodes: dict | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def version(self) -> str:
        return self.info.version

    def load_pack(self, builtin: bool = True) -> dict:
        """Load this pack the way ComfyUI does (plus comfy_extras when ``builtin``);
        return ``nodes.NODE_CLASS_MAPPINGS``. Raises if the pack fails to import."""
        if self._nodes is None:
            self._nodes = comfy_env.load_nodes([REPO_ROOT], builtin=builtin)
        return self._nodes


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    return require_comfyui()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    for sub in ("checkpoints", "afa", "vae", "loras"):
        (d / sub).mkdir()
    return d


def _extra_model_paths_yaml(models_dir: Path, where: Path) -> Path:
    y = where / "extra_model_paths.yaml"
    y.write_text("afa_tests:\n    base_path: \"%s\"\n%s" % (
        models_dir, "".join(f"    {s}: {s}\n" for s in ("checkpoints", "afa", "vae", "loras"))),
        encoding="utf-8")
    return y


@pytest.fixture(scope="session")
def comfy(comfyui_path, models_dir, tmp_path_factory) -> ComfyLib:
    root = tmp_path_factory.mktemp("comfy_lib")
    dirs = {k: root / k for k in ("output", "input", "temp", "user")}
    info = comfy_env.boot_comfyui(
        comfyui_path, output_dir=dirs["output"], input_dir=dirs["input"],
        temp_dir=dirs["temp"], user_dir=dirs["user"],
        extra_model_paths=_extra_model_paths_yaml(models_dir, root))
    return ComfyLib(info=info, models_dir=models_dir, output_dir=dirs["output"],
                    input_dir=dirs["input"], temp_dir=dirs["temp"], user_dir=dirs["user"])


@pytest.fixture(scope="session")
def comfy_nodes(comfy) -> dict:
    return comfy.load_pack()


def _link_into(models_dir: Path, paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        link = models_dir / "checkpoints" / p.name
        if not link.exists():
            try:
                link.symlink_to(p)
            except OSError:  # filesystems without symlinks
                import shutil

                shutil.copy2(p, link)
        out.append(link)
    return out


@pytest.fixture(scope="session")
def sd15_checkpoints(comfy, models_dir) -> list[Path]:
    from afa_nodes.demo_checkpoints import ensure_demo_checkpoints

    built = ensure_demo_checkpoints(checkpoint_cache_dir(), "sd15", SD15_COUNT)
    return _link_into(models_dir, built)


@pytest.fixture(scope="session")
def sdxl_checkpoints(comfy, models_dir) -> list[Path]:
    from afa_nodes.demo_checkpoints import ensure_demo_checkpoints

    built = ensure_demo_checkpoints(checkpoint_cache_dir(), "sdxl", SDXL_COUNT)
    return _link_into(models_dir, built)


@pytest.fixture(scope="session")
def comfy_server(comfyui_path, models_dir):
    from comfy_server import ComfyServer

    with ComfyServer(comfyui_path, models_dir=models_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium (tests/browser.py); skips when it is not installed."""
    from browser import Browser, chromium_path
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    b = Browser(exe)
    yield b
    b.close()


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on shared cores: one torch thread beats two fighting over them."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
