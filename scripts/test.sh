#!/usr/bin/env bash
# The test command (README, second command; CI runs it through .ci/run): install, then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Torch extensions (DeepSpeed's small CPU comm op) are compiled once into this cache.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/fastnft/torch_extensions}
exec python3 -m pytest -q -p no:cacheprovider --durations=10 "$@"
