# Sourced by the other scripts: points cargo's torch-sys at the venv's torch.
# Usage: source scripts/env.sh
DISTILL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DISTILL_ROOT
export DISTILL_VENV="${DISTILL_VENV:-$DISTILL_ROOT/.venv}"
export VIRTUAL_ENV="$DISTILL_VENV"
export PATH="$DISTILL_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export DISTILL_PYTHON="$DISTILL_VENV/bin/python"
# Tests and the default job never reach a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
