"""ComfyUI discovery (no ComfyUI needed: fake folders in tmp dirs) and the skip message."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from afa_nodes import comfy_env
from afa_nodes.comfy_env import HOW_TO_GET_COMFYUI

import conftest

REPO = Path(__file__).resolve().parent.parent


def fake_comfyui(path: Path, version: str = "9.9.9") -> Path:
    (path / "comfy").mkdir(parents=True)
    (path / "main.py").write_text("# fake\n")
    (path / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    (path / "custom_nodes").mkdir()
    return path


def fake_pack(path: Path) -> Path:
    (path / "afa_nodes").mkdir(parents=True)
    (path / "afa_nodes" / "comfy_env.py").write_text("")
    return path


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No COMFYUI_PATH, pack outside any ComfyUI, default location empty."""
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    pack = fake_pack(tmp_path / "checkout" / "ComfyUI-AFA")
    monkeypatch.setattr(comfy_env, "__file__", str(pack / "afa_nodes" / "comfy_env.py"))
    monkeypatch.setattr(comfy_env, "DEFAULT_COMFYUI", tmp_path / "home" / "comfy" / "ComfyUI")
    return tmp_path


def test_is_comfyui_dir(tmp_path):
    assert not comfy_env.is_comfyui_dir(tmp_path)
    assert not comfy_env.is_comfyui_dir(None)
    (tmp_path / "main.py").write_text("")
    assert not comfy_env.is_comfyui_dir(tmp_path)  # comfy/ missing
    (tmp_path / "comfy").mkdir()
    assert comfy_env.is_comfyui_dir(tmp_path)


def test_nothing_found(isolated):
    assert comfy_env.find_comfyui() is None


def test_default_location(isolated):
    default = fake_comfyui(isolated / "home" / "comfy" / "ComfyUI")
    assert comfy_env.find_comfyui() == default


def test_env_var_wins(isolated, monkeypatch):
    fake_comfyui(isolated / "home" / "comfy" / "ComfyUI")
    explicit = fake_comfyui(isolated / "elsewhere" / "ComfyUI")
    monkeypatch.setenv("COMFYUI_PATH", str(explicit))
    assert comfy_env.find_comfyui() == explicit


def test_env_var_wrong_does_not_fall_back(isolated, monkeypatch, caplog):
    fake_comfyui(isolated / "home" / "comfy" / "ComfyUI")
    monkeypatch.setenv("COMFYUI_PATH", str(isolated / "nope"))
    assert comfy_env.find_comfyui() is None
    assert "not a ComfyUI folder" in caplog.text


def test_installed_in_comfyui_beats_default(isolated, monkeypatch):
    fake_comfyui(isolated / "home" / "comfy" / "ComfyUI")
    host = fake_comfyui(isolated / "host" / "ComfyUI")
    pack = fake_pack(host / "custom_nodes" / "ComfyUI-AFA")
    monkeypatch.setattr(comfy_env, "__file__", str(pack / "afa_nodes" / "comfy_env.py"))
    assert comfy_env.find_comfyui() == host


def test_installed_by_symlink_unresolved_path(isolated, monkeypatch):
    """Pack checked out elsewhere, symlinked into custom_nodes, imported via the link."""
    host = fake_comfyui(isolated / "host" / "ComfyUI")
    checkout = fake_pack(isolated / "src" / "afa-checkout")
    link = host / "custom_nodes" / "ComfyUI-AFA"
    link.symlink_to(checkout, target_is_directory=True)
    monkeypatch.setattr(comfy_env, "__file__", str(link / "afa_nodes" / "comfy_env.py"))
    assert comfy_env.find_comfyui() == host


def test_installed_resolved_path(isolated, monkeypatch):
    """Pack physically in custom_nodes but imported through a symlink from elsewhere."""
    host = fake_comfyui(isolated / "host" / "ComfyUI")
    real = fake_pack(host / "custom_nodes" / "ComfyUI-AFA")
    alias = isolated / "alias"
    alias.symlink_to(real, target_is_directory=True)
    monkeypatch.setattr(comfy_env, "__file__", str(alias / "afa_nodes" / "comfy_env.py"))
    assert comfy_env.pack_root() == alias
    assert comfy_env.pack_root(resolve=True) == real.resolve()
    assert comfy_env.find_comfyui() == host


def test_custom_nodes_not_under_a_comfyui(isolated, monkeypatch):
    pack = fake_pack(isolated / "x" / "custom_nodes" / "ComfyUI-AFA")
    monkeypatch.setattr(comfy_env, "__file__", str(pack / "afa_nodes" / "comfy_env.py"))
    assert comfy_env.find_comfyui() is None


def test_env_var_tilde_expanded(isolated, monkeypatch):
    home = isolated / "h"
    target = fake_comfyui(home / "CUI")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("COMFYUI_PATH", "~/CUI")
    assert comfy_env.find_comfyui() == target


def test_version_and_flags(tmp_path):
    c = fake_comfyui(tmp_path / "C", version="0.3.64")
    assert comfy_env.comfyui_version(c) == "0.3.64"
    assert comfy_env.comfyui_version(tmp_path) == "unknown"
    (c / "comfy" / "cli_args.py").write_text('parser.add_argument("--whitelist-custom-nodes", nargs="+")\n')
    assert comfy_env.has_cli_flag(c, "--whitelist-custom-nodes")
    assert not comfy_env.has_cli_flag(c, "--whitelist")


def test_how_to_message_is_actionable():
    for needle in ("git clone https://github.com/comfyanonymous/ComfyUI ~/comfy/ComfyUI",
                   "pip install -r ~/comfy/ComfyUI/requirements.txt",
                   "pip install comfy-cli && comfy install", "COMFYUI_PATH"):
        assert needle in HOW_TO_GET_COMFYUI


def test_skip_reason_contains_how_to(isolated):
    with pytest.raises(pytest.skip.Exception) as e:
        conftest.require_comfyui()
    assert HOW_TO_GET_COMFYUI in str(e.value)


def test_skip_reason_names_bad_env(isolated, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(isolated / "missing"))
    with pytest.raises(pytest.skip.Exception) as e:
        conftest.require_comfyui()
    assert "COMFYUI_PATH=" in str(e.value) and HOW_TO_GET_COMFYUI in str(e.value)


def test_boot_without_comfyui_raises_with_how_to(tmp_path):
    # In a fresh process: this one may already have booted ComfyUI (session fixtures).
    code = ("from afa_nodes import comfy_env\n"
            "try:\n    comfy_env.boot_comfyui()\n"
            "except comfy_env.ComfyUINotFoundError as e:\n    print('RAISED', e)\n")
    env = dict(os.environ, COMFYUI_PATH=str(tmp_path / "missing"))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("RAISED") and "git clone https://github.com/comfyanonymous/ComfyUI" in r.stdout


def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "afa_nodes.comfy_env", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_find(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=str(fake_comfyui(tmp_path / "C", version="1.2.3")))
    r = _cli(["--find"], env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "C")
    r = _cli(["--version"], env)
    assert r.returncode == 0 and r.stdout.strip() == "1.2.3"


def test_cli_not_found_prints_how_to(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=str(tmp_path / "nothing"))
    r = _cli(["--find"], env)
    assert r.returncode == 1
    assert r.stdout == ""
    assert "git clone https://github.com/comfyanonymous/ComfyUI" in r.stderr


@pytest.mark.comfyui
def test_boot_is_idempotent_and_loads_the_pack_like_comfyui(comfy, tmp_path):
    import importlib
    import sys

    import folder_paths
    import nodes

    cli_args = importlib.import_module("comfy.cli_args")  # (`import comfy...` would shadow the fixture)

    info = comfy_env.boot_comfyui()
    assert info is comfy.info and comfy_env.booted() is info
    assert comfy_env.boot_comfyui(comfy.path) is info
    assert info.version == comfy_env.comfyui_version(comfy.path) != "unknown"
    assert cli_args.args.cpu == info.cpu
    with pytest.raises(comfy_env.AFAError, match="already loaded"):
        comfy_env.boot_comfyui(fake_comfyui(tmp_path / "other"))
    assert folder_paths.get_output_directory() == str(comfy.output_dir)
    # ComfyUI's `utils` package, not comfy/utils.py (nodes.py puts comfy/ on sys.path).
    assert hasattr(sys.modules["utils"], "__path__")

    mappings = comfy.load_pack()
    assert "KSampler" in mappings
    assert any(os.path.realpath(d) == str(REPO) for d in nodes.LOADED_MODULE_DIRS.values())
    assert comfy.load_pack() is mappings  # loaded once
