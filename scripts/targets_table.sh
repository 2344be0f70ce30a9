#!/usr/bin/env bash
# Which cached teacher targets teach the student best, and in how many bytes: the main
# job's teacher, data and student at a larger budget, one precompute per kind of
# targets, one training run per row (same tokens, steps, learning rate and seed), every
# model evaluated on the same held-out text and top-64 shards. Prints the table (also in
# RUN_DIR/targets.md). Run scripts/run.sh once first (teacher, data tools, release build).
# Finished rows are kept (shards, checkpoint, evaluation): a rerun adds missing rows.
#
# Budget knobs (environment): TRAIN_DOCS HELDOUT_DOCS STEPS BATCH_TOKENS LR LAYERS MAX_LEN
# ROWS (names of the rows to run, space-separated; default all).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${TRAIN_DOCS:=540}" "${HELDOUT_DOCS:=50}" "${STEPS:=32}" "${BATCH_TOKENS:=2048}" "${LR:=3e-4}"
: "${LAYERS:=15}" "${MAX_LEN:=256}"
run=${RUN_DIR:-.cache/runs/targets}
source scripts/real_tables.sh

# name | precompute flags | train flags
rows=(
  "sft|--top-k 64 --sample 0|--alpha 1"
  "top64|--top-k 64 --sample 0|--alpha 0"
  "top64-label|--top-k 64 --sample 0|--alpha 0 --label-bucket"
  "sample12|--top-k 0 --sample 12|--alpha 0"
  "sample48|--top-k 0 --sample 48|--alpha 0"
  "top16-tail16|--top-k 16 --sample 16|--alpha 0"
  "topp0.9-tail8|--top-k 64 --top-p 0.9 --sample 8|--alpha 0"
  "top64-a0.5|--top-k 64 --sample 0|--alpha 0.5"
  "top64-label-a0.5|--top-k 64 --sample 0|--alpha 0.5 --label-bucket"
  "sample12-a0.5|--top-k 0 --sample 12|--alpha 0.5"
  "top16-tail16-a0.5|--top-k 16 --sample 16|--alpha 0.5"
)
wanted=" ${ROWS:-$(for r in "${rows[@]}"; do printf '%s ' "${r%%|*}"; done)} "

python scripts/real_data.py data $cache/data-$TRAIN_DOCS-$HELDOUT_DOCS --train-docs "$TRAIN_DOCS" \
  --heldout-docs "$HELDOUT_DOCS" --cache $cache/npm
data=$cache/data-$TRAIN_DOCS-$HELDOUT_DOCS
base=$cache/targets-$(cat "$data"/*.jsonl | sha256sum | cut -c1-12)-$MAX_LEN
mkdir -p "$run/evals"
if [[ ! -f $run/student-init/config.json ]]; then
  stamp "student: $LAYERS of the teacher's 30 layers"
  $distill student init --teacher $cache/teacher --output "$run/student-init" --num-layers "$LAYERS"
fi
precompute() {  # SPLIT DIR FLAGS...
  local split=$1 dir=$2; shift 2
  $distill precompute --teacher $cache/teacher --input "$data/$split.jsonl" --output "$dir" \
    --max-len "$MAX_LEN" --devices cpu --no-progress "$@" | grep -E "time"
}
evaluate() {  # NAME MODEL_DIR: held-out text (full-vocabulary KL to the teacher) and top-64
  # shards, kept in evals/NAME.json (redone when written before the full-vocabulary KL)
  [[ $(grep -cs '"kl_to_teacher"' "$run/evals/$1.json") == 2 ]] && return
  stamp "evaluate $1"
  $distill eval --device cpu --text "$data/heldout.jsonl" --shards "$base/heldout-k64" --model "$1=$2" \
    --teacher $cache/teacher --json > "$run/evals/$1.json.tmp" && mv "$run/evals/$1.json.tmp" "$run/evals/$1.json"
}
stamp "precompute heldout (top-64)"
precompute heldout "$base/heldout-k64" --top-k 64 --sample 0
evaluate teacher $cache/teacher
evaluate student-init "$run/student-init"
ckpt=$(printf "checkpoint-%07d" "$STEPS")
for row in "${rows[@]}"; do
  IFS='|' read -r name pflags tflags <<<"$row"
  [[ $wanted == *" $name "* ]] || continue
  shards=$base/train-$(echo "$pflags" | tr -d ' -')
  stamp "precompute train for $name ($pflags)"
  # shellcheck disable=SC2086
  precompute train "$shards" $pflags
  echo "$shards" > "$run/$name.shards"
  if [[ ! -d $run/$name/$ckpt ]]; then
    stamp "train $name ($STEPS steps of $BATCH_TOKENS tokens, $tflags)"
    # --resume: an interrupted row goes on from its last checkpoint (none: from the start)
    # shellcheck disable=SC2086
    $distill train --resume --student "$run/student-init" --shards "$shards" --output "$run/$name" --device cpu \
      --steps "$STEPS" --batch-tokens "$BATCH_TOKENS" --pack --seq-len "$MAX_LEN" --lr "$LR" --warmup-steps 2 \
      --save-every "$STEPS" --keep-last 1 $tflags 2>&1 | tail -1
  fi
  evaluate "$name" "$run/$name/$ckpt"
done
python - "$run" "${rows[@]}" <<'PY'
import json, os, sys
run, names = sys.argv[1], ["teacher", "student-init"] + [r.split("|")[0] for r in sys.argv[2:]]
flags = {r.split("|")[0]: r.split("|")[1:] for r in sys.argv[2:]}
evals = {n: json.load(open(f"{run}/evals/{n}.json"))[0] for n in names if os.path.exists(f"{run}/evals/{n}.json")}
def bytes_per_token(name):
    m = json.load(open(open(f"{run}/{name}.shards").read().strip() + "/manifest.json"))
    return sum(s["bytes"] for s in m["shards"]) / sum(s["tokens"] for s in m["shards"])
teacher, sft = evals["teacher"]["text"]["perplexity"], evals.get("sft", {}).get("text", {}).get("perplexity")
lines = ["| row | precompute | train | bytes/token | held-out PPL | KL to teacher (full vocabulary) | KL to teacher (top-64 buckets) | top-1 agreement | SFT-to-teacher gap closed |",
         "|---|---|---|---|---|---|---|---|---|"]
for name, r in evals.items():
    ppl, s = r["text"]["perplexity"], r["shards"]
    p, t = flags.get(name, ["", ""])
    b = f"{bytes_per_token(name):.1f}" if name in flags and name != "sft" else ""
    gap = f"{100 * (sft - ppl) / (sft - teacher):.1f}%" if sft and name not in ("teacher", "student-init", "sft") else ""
    full = r["text"].get("kl_to_teacher")
    full = f"{full:.4f}" if full is not None else "-"
    lines.append(f"| {name} | `{p}` | `{t}` | {b} | {ppl:.2f} | {full} | {s['kl_to_teacher']:.4f} | {100 * s['top1_agreement']:.1f}% | {gap} |".replace("``", ""))
table = "\n".join(lines)
open(f"{run}/targets.md", "w").write(table + "\n")
print(table)
PY
stamp "done: $run/targets.md"
