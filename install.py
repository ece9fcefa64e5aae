"""Install ComfyUI-AFA's Python requirements (ComfyUI-Manager runs this file).

    python install.py                   # the pack's requirements.txt
    python install.py -r OTHER.txt ...  # any requirements file(s), same rules
    python install.py -r OTHER.txt requests   # plus single requirements

Idempotent and quick: when every requirement is already satisfied, pip is not
run at all. torch, torchvision and torchaudio are NEVER installed or replaced:
their lines are dropped, and the installed torch is pinned with a pip
constraint so no other package can pull in a different build. If torch is not
installed, the other requirements are still installed, then the user is told
how to install torch for their machine and the exit code is 1.

Uses only the standard library (and ``packaging`` when present) and never
imports the pack, so it runs before the pack's own dependencies exist.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

logger = logging.getLogger("ComfyUI-AFA")

HERE = Path(__file__).resolve().parent
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}

TORCH_HELP = (
    "PyTorch is not installed in this Python ({python}). ComfyUI-AFA (and ComfyUI) need it, "
    "but this installer never installs torch because the right build depends on your GPU. "
    "Install it with the command for your machine from https://pytorch.org/get-started/locally/ "
    "(CPU only: `{python} -m pip install torch --index-url https://download.pytorch.org/whl/cpu`), "
    "or use the Python environment your ComfyUI runs with."
)


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(line: str) -> str | None:
    """The project name of one requirements line (None for blanks, comments, options)."""
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    m = _NAME_RE.match(line)
    return _canon(m.group(1)) if m else None


def read_requirements(path: str | os.PathLike) -> list[str]:
    """Requirement lines of ``path`` without comments, options and the torch family."""
    out, skipped = [], []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            logger.warning("Ignoring pip option line in %s: %s", path, line)
            continue
        name = requirement_name(line)
        if name in TORCH_FAMILY:
            skipped.append(line)
            continue
        out.append(line)
    if skipped:
        logger.info("Not installing %s from %s (the torch family is never installed here).",
                    ", ".join(skipped), path)
    return out


def _packaging():
    try:
        from packaging.requirements import Requirement  # type: ignore
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement  # type: ignore
        except ImportError:
            return None
    return Requirement


def unsatisfied(lines: list[str]) -> list[str]:
    """Lines whose requirement is not met by what is installed (all of them when unsure)."""
    Requirement = _packaging()
    if Requirement is None:
        return list(lines)
    missing = []
    for line in lines:
        try:
            req = Requirement(line)
        except Exception:  # noqa: BLE001 - let pip judge lines we cannot parse
            missing.append(line)
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(line)
    return missing


def torch_version() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def _torch_pins() -> list[str]:
    pins = []
    for name in sorted(TORCH_FAMILY):
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return pins


def _dry_run(base_cmd: list[str], tmp: Path) -> list[dict] | None:
    """What pip would install (``pip install --dry-run --report``); None when unknown."""
    report = tmp / "report.json"
    try:
        rc = subprocess.call(base_cmd + ["--dry-run", "--quiet", "--report", str(report)],
                             stdout=subprocess.DEVNULL)
        if rc != 0 or not report.exists():
            return None
        import json

        return json.loads(report.read_text(encoding="utf-8")).get("install", [])
    except (OSError, ValueError):
        return None


def pip_install(lines: list[str]) -> int:
    """pip-install ``lines`` with the installed torch family pinned and no torch-family
    package pulled in as a dependency; return pip's exit code."""
    with tempfile.TemporaryDirectory(prefix="afa-install-") as tmp_name:
        tmp = Path(tmp_name)
        req = tmp / "requirements.txt"
        req.write_text("\n".join(lines) + "\n", encoding="utf-8")
        cmd = [sys.executable, "-m", "pip", "install", "-r", str(req)]
        pins = _torch_pins()
        if pins:
            con = tmp / "constraints.txt"
            con.write_text("\n".join(pins) + "\n", encoding="utf-8")
            cmd += ["-c", str(con)]
        plan = _dry_run(cmd, tmp)
        if plan:
            blocked = {_canon(i["metadata"]["name"]) for i in plan} & TORCH_FAMILY
            if blocked:
                rest = [i for i in plan if _canon(i["metadata"]["name"]) not in TORCH_FAMILY]
                needers = sorted(i["metadata"]["name"] for i in rest if any(
                    requirement_name(r) in blocked for r in i["metadata"].get("requires_dist") or []))
                logger.warning(
                    "%s would be installed as a dependency of %s: NOT installing it (this script "
                    "never installs the torch family; a torchvision/torchaudio must match your torch "
                    "build). Installing everything else with --no-deps. If you need it, install the "
                    "release built for torch %s yourself.", ", ".join(sorted(blocked)),
                    ", ".join(needers) or "the requirements", torch_version() or "(none)")
                specs = [i["download_info"]["url"] if i.get("is_direct") else
                         f"{i['metadata']['name']}=={i['metadata']['version']}" for i in rest]
                if not specs:
                    return 0
                cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *specs]
        logger.info("Running: %s", " ".join(cmd))
        return subprocess.call(cmd)


def install(files: list[str | os.PathLike], extra: list[str] = ()) -> int:
    lines: list[str] = []
    for f in files:
        for line in read_requirements(f):
            if line not in lines:
                lines.append(line)
    for line in extra:
        if requirement_name(line) in TORCH_FAMILY:
            logger.info("Not installing %s (the torch family is never installed here).", line)
        elif line not in lines:
            lines.append(line)
    todo = unsatisfied(lines)
    rc = 0
    if todo:
        logger.info("Installing %d requirement(s): %s", len(todo), ", ".join(todo))
        rc = pip_install(todo)
        if rc != 0:
            logger.error("pip failed (exit %d) installing: %s", rc, ", ".join(todo))
    else:
        logger.info("Requirements already satisfied (%s).",
                    ", ".join([str(f) for f in files] + list(extra)))
    if torch_version() is None:
        logger.error(TORCH_HELP.format(python=sys.executable))
        return rc or 1
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Install ComfyUI-AFA requirements (never torch).")
    ap.add_argument("-r", "--requirements", action="append", default=None,
                    help="requirements file (repeatable); default: the pack's requirements.txt")
    ap.add_argument("packages", nargs="*", help="more single requirements, e.g. 'requests>=2'")
    args = ap.parse_args(argv)
    if not logger.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("[ComfyUI-AFA install] %(message)s"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    files = args.requirements if args.requirements is not None else (
        [] if args.packages else [HERE / "requirements.txt"])
    for f in files:
        if not Path(f).is_file():
            logger.error("No such requirements file: %s", f)
            return 2
    return install(files, args.packages)


if __name__ == "__main__":
    sys.exit(main())
