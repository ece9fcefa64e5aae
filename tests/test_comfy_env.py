"""ComfyUI discovery (no ComfyUI needed: fake folders in tmp dirs), the skip message, booting ComfyUI
and its model paths."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from afa_nodes import comfy_env, comfy_find
from afa_nodes.comfy_find import HOW_TO_GET_COMFYUI

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
    (path / "afa_nodes" / "comfy_find.py").write_text("")
    return path


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No COMFYUI_PATH, pack outside any ComfyUI, default location empty."""
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    pack = fake_pack(tmp_path / "checkout" / "ComfyUI-AFA")
    monkeypatch.setattr(comfy_find, "__file__", str(pack / "afa_nodes" / "comfy_find.py"))
    monkeypatch.setattr(comfy_find, "DEFAULT_COMFYUI", tmp_path / "home" / "comfy" / "ComfyUI")
    return tmp_path


def test_is_comfyui_dir(tmp_path):
    assert not comfy_find.is_comfyui_dir(tmp_path)
    assert not comfy_find.is_comfyui_dir(None)
    (tmp_path / "main.py").write_text("")
    assert not comfy_find.is_comfyui_dir(tmp_path)  # comfy/ missing
    (tmp_path / "comfy").mkdir()
    assert comfy_find.is_comfyui_dir(tmp_path)


def test_nothing_found(isolated):
    assert comfy_find.find_comfyui() is None


def test_default_location(isolated):
    default = fake_comfyui(isolated / "home" / "comfy" / "ComfyUI")
    assert comfy_find.find_comfyui() == default


def test_env_var_wins(isolated, monkeypatch):
    fake_comfyui(isolated / "home" / "comfy" / "ComfyUI")
    explicit = fake_comfyui(isolated / "elsewhere" / "ComfyUI")
    monkeypatch.setenv("COMFYUI_PATH", str(explicit))
    assert comfy_find.find_comfyui() == explicit


def test_env_var_wrong_does_not_fall_back(isolated, monkeypatch, caplog):
    fake_comfyui(isolated / "home" / "comfy" / "ComfyUI")
    monkeypatch.setenv("COMFYUI_PATH", str(isolated / "nope"))
    assert comfy_find.find_comfyui() is None
    assert "not a ComfyUI folder" in caplog.text


def test_installed_in_comfyui_beats_default(isolated, monkeypatch):
    fake_comfyui(isolated / "home" / "comfy" / "ComfyUI")
    host = fake_comfyui(isolated / "host" / "ComfyUI")
    pack = fake_pack(host / "custom_nodes" / "ComfyUI-AFA")
    monkeypatch.setattr(comfy_find, "__file__", str(pack / "afa_nodes" / "comfy_find.py"))
    assert comfy_find.find_comfyui() == host


def test_installed_by_symlink_unresolved_path(isolated, monkeypatch):
    """Pack checked out elsewhere, symlinked into custom_nodes, imported via the link."""
    host = fake_comfyui(isolated / "host" / "ComfyUI")
    checkout = fake_pack(isolated / "src" / "afa-checkout")
    link = host / "custom_nodes" / "ComfyUI-AFA"
    link.symlink_to(checkout, target_is_directory=True)
    monkeypatch.setattr(comfy_find, "__file__", str(link / "afa_nodes" / "comfy_find.py"))
    assert comfy_find.find_comfyui() == host


def test_installed_resolved_path(isolated, monkeypatch):
    """Pack physically in custom_nodes but imported through a symlink from elsewhere."""
    host = fake_comfyui(isolated / "host" / "ComfyUI")
    real = fake_pack(host / "custom_nodes" / "ComfyUI-AFA")
    alias = isolated / "alias"
    alias.symlink_to(real, target_is_directory=True)
    monkeypatch.setattr(comfy_find, "__file__", str(alias / "afa_nodes" / "comfy_find.py"))
    assert comfy_find.pack_root() == alias
    assert comfy_find.pack_root(resolve=True) == real.resolve()
    assert comfy_find.find_comfyui() == host


def test_custom_nodes_not_under_a_comfyui(isolated, monkeypatch):
    pack = fake_pack(isolated / "x" / "custom_nodes" / "ComfyUI-AFA")
    monkeypatch.setattr(comfy_find, "__file__", str(pack / "afa_nodes" / "comfy_find.py"))
    assert comfy_find.find_comfyui() is None


def test_env_var_tilde_expanded(isolated, monkeypatch):
    home = isolated / "h"
    target = fake_comfyui(home / "CUI")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("COMFYUI_PATH", "~/CUI")
    assert comfy_find.find_comfyui() == target


def test_version_and_flags(tmp_path):
    c = fake_comfyui(tmp_path / "C", version="0.3.64")
    assert comfy_find.comfyui_version(c) == "0.3.64"
    assert comfy_find.comfyui_version(tmp_path) == "unknown"
    (c / "comfy" / "cli_args.py").write_text('parser.add_argument("--whitelist-custom-nodes", nargs="+")\n')
    assert comfy_find.has_cli_flag(c, "--whitelist-custom-nodes")
    assert not comfy_find.has_cli_flag(c, "--whitelist")


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
    return subprocess.run([sys.executable, "-m", "afa_nodes.comfy_find", *args], cwd=REPO,
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
    assert info.version == comfy_find.comfyui_version(comfy.path) != "unknown"
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


def _model_paths_yaml(path: Path, base: Path, category: str, sub: str) -> Path:
    path.write_text(f'{path.stem}:\n    base_path: "{base}"\n    {category}: {sub}\n', encoding="utf-8")
    return path


@pytest.mark.comfyui
def test_model_paths_from_the_comfyui_folder_then_the_given_files(comfy, tmp_path, monkeypatch):
    """As main.py: <ComfyUI>/extra_model_paths.yaml (here a ComfyUI-like temp folder, never the real
    one), then the given files; a missing file is named before anything is loaded."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "folder_names_and_paths", dict(folder_paths.folder_names_and_paths))
    models, category = tmp_path / "models", "afa_test_category"
    host = fake_comfyui(tmp_path / "ComfyUI")
    _model_paths_yaml(host / "extra_model_paths.yaml", models, category, "from_host")
    given = _model_paths_yaml(tmp_path / "given.yaml", models, category, "from_given")
    comfy_env.apply_model_paths(host, [given])
    assert folder_paths.get_folder_paths(category) == [str(models / "from_host"), str(models / "from_given")]
    with pytest.raises(comfy_env.AFAError, match="extra model paths file not found: .*missing.yaml"):
        comfy_env.apply_model_paths(host, [tmp_path / "missing.yaml"])
    comfy_env.apply_model_paths(tmp_path / "no_comfyui_here")  # no yaml there: nothing to load


@pytest.mark.comfyui
@pytest.mark.slow
def test_boot_honours_the_comfyui_folders_model_paths(comfyui_path, tmp_path):
    """A fresh process booting a ComfyUI (a temp folder linking the real one's files, plus its own
    extra_model_paths.yaml) sees the folder listed there, as `generate` and `train` do."""
    host = tmp_path / "ComfyUI"
    host.mkdir()
    for entry in comfyui_path.iterdir():
        if entry.name != "extra_model_paths.yaml":
            (host / entry.name).symlink_to(entry)
    _model_paths_yaml(host / "extra_model_paths.yaml", tmp_path / "models", "afa_test_category", "from_host")
    code = ("from afa_nodes import comfy_env\ncomfy_env.boot_comfyui(cpu=True)\nimport folder_paths\n"
            "print('PATHS', folder_paths.get_folder_paths('afa_test_category'))\n")
    env = dict(os.environ, COMFYUI_PATH=str(host), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"PATHS {[str(tmp_path / 'models' / 'from_host')]}" in r.stdout
