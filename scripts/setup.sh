#!/usr/bin/env bash
# Installs everything AvatarServe needs on a fresh Debian/Ubuntu machine (idempotent).
# - system packages: redis-server (local sink-frame cache), espeak-ng (demo/toy speech), prometheus (metrics tests),
#   chromium (ops page tests); python3-venv when this Python cannot make a virtual environment
# - a project-local virtual environment, .venv (no system site packages: what the project needs, it declares)
# - PyTorch in it: the CPU wheel torch==2.13.0 when the venv has no torch yet. GPU users put their CUDA build of torch
#   into .venv first (`python3 -m venv .venv && .venv/bin/pip install torch`); it is kept.
# - the client SDK distribution (clients/python, avatarserve-client; not on PyPI), editable, then the project
#   itself (editable) with its test extras; the project depends on the client
# Set AVATARSERVE_VENV to use another folder, PYTHON for the interpreter that creates it.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${AVATARSERVE_VENV:-.venv}

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ! -x "$VENV/bin/python" ] && ! $PY -c "import ensurepip, venv" >/dev/null 2>&1; then
  missing+=("python3-venv")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating the virtual environment $VENV"
  $PY -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] pip install torch==2.13.0 (CPU wheel) into $VENV"
  "$VPY" -m pip install -q torch==2.13.0
fi
echo "[setup] pip install -e ./clients/python (avatarserve-client) into $VENV"
"$VPY" -m pip install -q -e ./clients/python
echo "[setup] pip install -e .[test] into $VENV"
"$VPY" -m pip install -q -e ".[test]"
