#!/usr/bin/env bash
# The main job: set up the machine and the project's .venv, start the local cluster (redis-server + Ray head + Serve
# app), stream a demo clip end to end through the gRPC API, write out/demo.mp4, and stop the cluster again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${AVATARSERVE_VENV:-.venv}
PY="$VENV/bin/python"
AVATARSERVE="$VENV/bin/avatarserve"
OUT=${OUT:-out}
mkdir -p "$OUT"

"$PY" -m avatarserve.toy.demo "$OUT" --seconds "${DEMO_SECONDS:-8}"
UP_JSON=$("$AVATARSERVE" up --config "${AVATARSERVE_CONFIG:-deploy/local.yaml}")
echo "$UP_JSON"
trap '"$AVATARSERVE" down >/dev/null' EXIT
ADDR=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["grpc_address"])' "$UP_JSON")
"$AVATARSERVE" stream --server "$ADDR" --image "$OUT/demo_face.png" --audio "$OUT/demo_speech.wav" \
    --out "$OUT/demo.mp4" --seed 0 ${REALTIME:+--realtime}
echo "wrote $OUT/demo.mp4"
