#!/usr/bin/env bash
# The test command: set up the machine and the project's .venv (idempotent), then run the whole suite from .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${AVATARSERVE_VENV:-.venv}
exec "$VENV/bin/python" -m pytest -q -ra "$@"
