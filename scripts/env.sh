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

# Removes DIR when it holds only what `distill train` writes (a run to redo); refuses,
# touching nothing, when anything else is there: scripts never delete what they did not write.
remove_train_run() {
  local dir=$1 entry name
  [[ -e $dir ]] || return 0
  for entry in "$dir"/* "$dir"/.[!.]*; do
    [[ -e $entry ]] || continue
    name=${entry##*/}
    case $name in
      run.json | metrics.jsonl | loss.png | checkpoint-[0-9]* | .checkpoint-[0-9]*.tmp) ;;
      *) echo "$dir holds $name, which distill train did not write; move it or set RUN_DIR elsewhere" >&2
         return 1 ;;
    esac
  done
  rm -rf "$dir"
}
