#!/usr/bin/env bash
# A generation metric that moves: KD from a teacher that is competent at the task. The
# main job's teacher explains math instead of answering (exact match 0%), so this job
# makes a math expert from it (SFT by distill on math chats with reference answers, as
# scripts/teachers_table.sh does), precomputes the expert's targets over the same chats
# (top-16 + 16 tail draws, precompute's default), and trains the main job's 15-layer
# student on them with KD (alpha 0.5) and with plain SFT on the reference answers, the
# same rows, steps and learning rate. Judged on held-out math chats the expert never
# saw: exact match of greedy replies and the NLL of the reference answers. Prints the
# table (also in RUN_DIR/math-STEPS-LR.md). Run scripts/run.sh once first.
#
# Knobs (environment): MATH_TRAIN MATH_HELDOUT EXPERT_STEPS EXPERT_LR STEPS LR BATCH_TOKENS LAYERS
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${MATH_TRAIN:=256}" "${MATH_HELDOUT:=64}" "${EXPERT_STEPS:=18}" "${EXPERT_LR:=1e-4}" "${STEPS:=48}"
: "${LR:=1e-3}" "${BATCH_TOKENS:=2048}" "${LAYERS:=15}"
run=${RUN_DIR:-.cache/runs/math}
source scripts/real_tables.sh
python scripts/real_data.py math $cache/math-$MATH_TRAIN-$MATH_HELDOUT --train "$MATH_TRAIN" --heldout "$MATH_HELDOUT"
math=$cache/math-$MATH_TRAIN-$MATH_HELDOUT
mkdir -p "$run"
ckpt() { echo "$run/$1/$(printf "checkpoint-%07d" "$2")"; }
train() {  # name student shards steps lr alpha
  [[ -d $(ckpt "$1" "$4") ]] && return 0
  stamp "train $1: $4 steps of $BATCH_TOKENS tokens at learning rate $5, alpha $6"
  $distill train --student "$2" --shards "$3" --output "$run/$1" --resume --steps "$4" --save-every "$4" \
    --keep-last 1 --lr "$5" --alpha "$6" --device cpu --batch-tokens "$BATCH_TOKENS" --pack --seq-len 256 \
    --warmup-steps 2 2>&1 | tail -1
}
precompute() {  # teacher output extra...
  local teacher=$1 out=$2; shift 2
  $distill precompute --teacher "$teacher" --input "$math/train.jsonl" --output "$out" --max-len 256 \
    --devices cpu --no-progress "$@" | { grep -E "tokens|time" || true; }
}
stamp "math expert: $EXPERT_STEPS steps of SFT of the teacher on $MATH_TRAIN math chats"
precompute $teacher "$run/shards-teacher" --top-k 16 --sample 0
train expert $teacher "$run/shards-teacher" "$EXPERT_STEPS" "$EXPERT_LR" 1
expert=$(ckpt expert "$EXPERT_STEPS")
stamp "the expert's targets over the same chats (top-16 + 16 tail draws)"
precompute "$expert" "$run/shards-expert"
[[ -d $run/student-init ]] || $distill student init --teacher $teacher --output "$run/student-init" --num-layers "$LAYERS"
# Named by their budget, so another STEPS or LR reuses the expert and its targets.
students=$STEPS-$LR
train kd-$students "$run/student-init" "$run/shards-expert" "$STEPS" "$LR" 0.5
train sft-$students "$run/student-init" "$run/shards-expert" "$STEPS" "$LR" 1
stamp "evaluate: held-out answers' NLL and greedy replies"
$distill eval --device cpu --text "$math/heldout.jsonl" --generate "$math/heldout.jsonl" --max-new-tokens 24 \
  --side-by-side "$run/replies-$students.md" --model teacher=$teacher --model expert="$expert" \
  --model student-init="$run/student-init" --model sft="$(ckpt "sft-$students" "$STEPS")" \
  --model kd="$(ckpt "kd-$students" "$STEPS")" --json > "$run/results.tmp"
mv "$run/results.tmp" "$run/results-$students.json"
python - "$run" "$students" <<'PY'
import json, sys
run, students = sys.argv[1], sys.argv[2]
rows = json.load(open(f"{run}/results-{students}.json"))
n = rows[0]["generation"]["with_reference"]
lines = [f"| model | exact match ({n} held-out math prompts) | NLL of the reference answers | reply tokens |",
         "|---|---|---|---|"]
for r in rows:
    t, g = r["text"], r["generation"]
    lines.append(f"| {r['name']} | {100 * g['exact_match']:.1f}% | {t['cross_entropy']:.3f} | {g['mean_new_tokens']:.1f} |")
table = "\n".join(lines)
open(f"{run}/math-{students}.md", "w").write(table + "\n")
print(table)
PY
stamp "done: $run/math-$students.md; replies side by side $run/replies-$students.md"
