#!/usr/bin/env bash
# The main job (README, first command): install, then demos -> few-shot SFT -> π-StepNFT -> held-out evaluation
# on ManiSkill3 PickCube-v1 with the embedded default config. Extra arguments go to `fastnft pipeline`
# (e.g. --ablations all, --resume, --set train.iterations=10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/fastnft/torch_extensions}
exec fastnft pipeline --config configs/pickcube_stepnft.yaml "$@"
