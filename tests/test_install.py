"""install.py never installs torch and skips pip when all is satisfied; packaging files agree."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Load the repo's install.py by path: the module name `install` is too generic to trust sys.path.
_spec = importlib.util.spec_from_file_location("afa_install", REPO / "install.py")
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)


def test_torch_family_is_filtered(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\ntorch\ntorchvision>=0.1\nTorchAudio==2.0 ; python_version>'3'\n"
                   "torchsde\nnumpy>=1.25.0  # inline comment\n--extra-index-url x\n\neinops\n")
    assert install.read_requirements(req) == ["torchsde", "numpy>=1.25.0", "einops"]


def test_requirement_name():
    assert install.requirement_name("Pillow>=9") == "pillow"
    assert install.requirement_name("pydantic-settings~=2.0") == "pydantic-settings"
    assert install.requirement_name("Some_Pkg.Name[extra]==1") == "some-pkg-name"
    assert install.requirement_name("# x") is None and install.requirement_name("-r a.txt") is None


def test_unsatisfied():
    assert install.unsatisfied(["pytest", "pytest>=1"]) == []
    assert install.unsatisfied(["pytest<1"]) == ["pytest<1"]
    assert install.unsatisfied(["no-such-package-afa-xyz"]) == ["no-such-package-afa-xyz"]
    assert install.unsatisfied(["no-such-package-afa-xyz; python_version < '3'"]) == []


def test_pack_requirements_have_no_torch():
    names = {install.requirement_name(l) for l in (REPO / "requirements.txt").read_text().splitlines()}
    assert {"safetensors", "einops", "pillow", "numpy"} <= names
    assert not names & install.TORCH_FAMILY


def test_install_is_a_noop_when_satisfied(tmp_path):
    req = tmp_path / "r.txt"
    req.write_text("pytest\ntorch\n")
    r = subprocess.run([sys.executable, str(REPO / "install.py"), "-r", str(req)],
                       capture_output=True, text=True, timeout=120)
    assert "already satisfied" in r.stdout
    assert "Running:" not in r.stdout          # pip not run
    has_torch = install.torch_version() is not None
    assert r.returncode == (0 if has_torch else 1)


def test_pyproject():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert data["project"]["name"] == "comfyui-afa"
    assert data["project"]["version"] == "0.1.0"
    assert "torch" not in " ".join(data["project"]["dependencies"])
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] == "comfyui-afa" and comfy["DisplayName"] == "ComfyUI-AFA"
    markers = " ".join(data["tool"]["pytest"]["ini_options"]["markers"])
    assert "comfyui" in markers


def test_single_requirements_on_the_command_line():
    r = subprocess.run([sys.executable, str(REPO / "install.py"), "pytest", "torchvision>=0"],
                       capture_output=True, text=True, timeout=120)
    assert "already satisfied" in r.stdout and "Running:" not in r.stdout
    assert "torchvision>=0 (the torch family is never installed here)" in r.stdout
