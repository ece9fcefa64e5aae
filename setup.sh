#!/usr/bin/env bash
# ComfyUI-AFA: first command on a fresh machine (idempotent; quick when all is there).
#
#   bash setup.sh [--allow-missing-comfyui] [--no-generate]
#
# 1. torch: kept if importable, else `pip install torch torchvision` in ONE command (a matching
#    pair; $AFA_TORCH_SPEC overrides, e.g. AFA_TORCH_SPEC="torch==2.14.1 torchvision==0.29.1");
# 2. the pack's requirements (install.py, never touches torch) and pytest;
# 3. finds ComfyUI ($COMFYUI_PATH, the ComfyUI this pack is installed in, ~/comfy/ComfyUI);
#    none -> prints exactly how to get one and exits 1 (0 with --allow-missing-comfyui);
# 4. installs ComfyUI's requirements minus torch/torchvision/torchaudio and symlinks this
#    pack as <ComfyUI>/custom_nodes/ComfyUI-AFA; fails when torchvision does not import
#    (ComfyUI needs it) (an existing symlink is re-pointed here; a
#    real folder of that name is left alone with a warning);
# 5. runs the demo: `python -m afa_nodes generate` (skip with --no-generate).
# $PYTHON selects the interpreter (default: python, else python3).
set -euo pipefail

ALLOW_MISSING=0
GENERATE=1
for arg in "$@"; do
  case "$arg" in
    --allow-missing-comfyui) ALLOW_MISSING=1 ;;
    --no-generate) GENERATE=0 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")"
PACK_DIR="$(pwd -P)"
PACK_NAME="ComfyUI-AFA"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
say() { echo "[setup] $*"; }

"$PY" - <<'EOF'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"[setup] Python >= 3.10 is needed, this is {sys.version.split()[0]} ({sys.executable}); set PYTHON=...")
EOF

# 1. torch -------------------------------------------------------------------------------
# ComfyUI imports torchvision at start-up (comfy/sd.py -> ldm/cascade/stage_c_coder.py), so
# torch and torchvision are installed TOGETHER, in one pip command, so that pip picks a
# matching pair from what this machine's pip offers (its index, find-links and constraints).
if TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
  say "torch $TORCH_VERSION already installed: leaving it."
else
  # shellcheck disable=SC2206
  TORCH_SPEC=(${AFA_TORCH_SPEC:-torch torchvision})
  say "torch not importable: pip install ${TORCH_SPEC[*]}"
  "$PY" -m pip install "${TORCH_SPEC[@]}"
fi

# 2. pack requirements (+ the studio's gradio) + pytest ----------------------------------------
"$PY" install.py -r requirements.txt -r requirements-studio.txt
if ! "$PY" -c "import pytest" >/dev/null 2>&1; then
  say "installing pytest"
  "$PY" -m pip install pytest
fi

# 3. ComfyUI -------------------------------------------------------------------------------
if ! COMFY="$("$PY" -m afa_nodes.comfy_find --find)"; then
  if [ "$ALLOW_MISSING" = 1 ]; then
    say "No ComfyUI found (see above): continuing without it; ComfyUI tests will be skipped."
    exit 0
  fi
  exit 1
fi
say "ComfyUI $("$PY" -m afa_nodes.comfy_find --version) at $COMFY"

# 4. ComfyUI requirements (minus the torch family) and the pack link ----------------------
# + what ComfyUI imports without listing it (v0.8.0: `requests` in app/frontend_management.py).
if [ -f "$COMFY/requirements.txt" ]; then
  "$PY" install.py -r "$COMFY/requirements.txt" requests
fi
if ! TV_ERR="$("$PY" -c 'import torchvision' 2>&1)"; then
  echo "[setup] ERROR: ComfyUI needs torchvision, and it does not import beside torch $("$PY" -c 'import torch; print(torch.__version__)'):" >&2
  echo "$TV_ERR" | tail -n 1 >&2
  echo "[setup] Install the torchvision built for that torch (https://pytorch.org/get-started/previous-versions/)," >&2
  echo "[setup] or reinstall both together: $PY -m pip install --force-reinstall torch torchvision" >&2
  exit 1
fi
LINK="$COMFY/custom_nodes/$PACK_NAME"
mkdir -p "$COMFY/custom_nodes"
if [ -L "$LINK" ]; then
  if [ "$(cd "$LINK" 2>/dev/null && pwd -P)" != "$PACK_DIR" ]; then
    say "re-pointing $LINK -> $PACK_DIR (was $(readlink "$LINK"))"
    rm "$LINK"
    ln -s "$PACK_DIR" "$LINK"
  fi
elif [ -e "$LINK" ]; then
  if [ "$(cd "$LINK" && pwd -P)" != "$PACK_DIR" ]; then
    say "WARNING: $LINK is a folder, not a link to this checkout: leaving it alone (ComfyUI will load that copy)."
  fi
else
  ln -s "$PACK_DIR" "$LINK"
  say "installed the pack: $LINK -> $PACK_DIR"
fi

# 5. the main job --------------------------------------------------------------------------
if [ "$GENERATE" = 1 ]; then
  "$PY" -m afa_nodes generate
fi
