#!/usr/bin/env bash
# Installs everything AvatarServe needs on a fresh Debian/Ubuntu machine (idempotent).
# - system packages: redis-server (local sink-frame cache), espeak-ng (demo/toy speech), prometheus (metrics tests)
# - PyTorch: the CPU wheel torch==2.13.0 when no torch is installed yet (GPU users install their own CUDA build first)
# - the project itself with its test extras
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
if ! $PY -c "import torch" >/dev/null 2>&1; then
  echo "[setup] pip install torch==2.13.0 (CPU wheel)"
  $PY -m pip install -q torch==2.13.0
fi
echo "[setup] pip install -e .[test]"
$PY -m pip install -q -e ".[test]"
