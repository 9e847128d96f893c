#!/usr/bin/env bash
# Set everything up, train small demo checkpoints into models/ if there are none,
# then serve them: interactive docs at http://127.0.0.1:8000/docs
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec metalearn demo --model-dir "${MODEL_DIR:-models}" --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
