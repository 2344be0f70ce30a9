#!/usr/bin/env bash
# Several teachers of one tokenizer (`distill merge-teachers`), on the main job's teacher
# and student. A math expert is made from the teacher by distill itself (SFT on math
# chats with reference answers, EXPERT_STEPS steps); both teachers are precomputed over
# two data files, the main job's text documents and math chats; then one student per
# row is trained from the main job's initial student at the same budget (STEPS steps of
# BATCH_TOKENS tokens, the same rows in the same order), on the targets of:
#   teacher      the teacher alone
#   expert       the math expert alone
#   mix-0.5      both, weight 0.5 each on every document
#   mix-source   both, weights by data file: text 0.8 teacher / 0.2 expert, math 0.2 / 0.8
#   routed       each row scored by its domain's teacher alone (`merge-teachers --route
#                domain=text,math`: the rows' `domain` field names the teacher)
# Judged on held-out text (perplexity, full KL to the teacher) and held-out math chats
# (NLL of the reference answers, exact match of greedy replies). Prints the table (also in
# RUN_DIR/teachers.md). Run scripts/run.sh once first (teacher, data, tools, build).
#
# Knobs (environment): MATH_TRAIN MATH_HELDOUT EXPERT_STEPS EXPERT_LR STEPS BATCH_TOKENS LR
# TOP_K LAYERS
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${MATH_TRAIN:=256}" "${MATH_HELDOUT:=64}" "${EXPERT_STEPS:=18}" "${EXPERT_LR:=1e-4}" "${STEPS:=16}"
: "${BATCH_TOKENS:=2048}" "${LR:=3e-4}" "${TOP_K:=16}" "${LAYERS:=15}"
run=${RUN_DIR:-.cache/runs/teachers}
source scripts/real_tables.sh
train_flags=(--device cpu --batch-tokens "$BATCH_TOKENS" --pack --seq-len 256 --warmup-steps 2)

python scripts/real_data.py data $cache/data-270-50 --train-docs 270 --heldout-docs 50 --cache $cache/npm
python scripts/real_data.py math $cache/math-$MATH_TRAIN-$MATH_HELDOUT --train "$MATH_TRAIN" --heldout "$MATH_HELDOUT"
data=$cache/data-270-50 math=$cache/math-$MATH_TRAIN-$MATH_HELDOUT
# Two data files, one per kind of document: the weights of mix-source follow them.
mkdir -p "$run/data" "$run/heldout"
# Each row names its domain (read by the routed row); the other rows ignore the field.
python - "$data/train.jsonl" "$math/train.jsonl" "$run/data" <<'PY'
import json, sys
for src, name in ((sys.argv[1], "text"), (sys.argv[2], "math")):
    rows = [json.loads(l) for l in open(src) if l.strip()]
    rows = [r for r in rows if name == "math" or "messages" not in r]
    with open(f"{sys.argv[3]}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps({**r, "domain": name}) + "\n" for r in rows)
PY
grep -v '"messages"' "$data/heldout.jsonl" > "$run/heldout/text.jsonl"
cp "$math/heldout.jsonl" "$run/heldout/math.jsonl"
[[ -d $run/student-init ]] || $distill student init --teacher $teacher --output "$run/student-init" --num-layers "$LAYERS"

precompute() {  # teacher input output
  $distill precompute --teacher "$1" --input "$2" --output "$3" --top-k "$TOP_K" --sample 0 --max-len 256 \
    --devices cpu --no-progress | { grep -E "tokens|time" || true; }
}
ckpt() { echo "$run/$1/$(printf "checkpoint-%07d" "$2")"; }
train() {  # name student shards steps lr alpha
  [[ -d $(ckpt "$1" "$4") ]] && return 0
  stamp "train $1: $4 steps at learning rate $5, alpha $6"
  $distill train --student "$2" --shards "$3" --output "$run/$1" --resume --steps "$4" --save-every "$4" \
    --keep-last 1 --lr "$5" --alpha "$6" "${train_flags[@]}" 2>&1 | tail -1
}

stamp "math expert: SFT of the teacher on $MATH_TRAIN math chats"
precompute $teacher "$run/data/math.jsonl" "$run/shards-expert-sft"
train expert-sft $teacher "$run/shards-expert-sft" "$EXPERT_STEPS" "$EXPERT_LR" 1
expert=$(ckpt expert-sft "$EXPERT_STEPS")

stamp "both teachers over text + math (top-$TOP_K, no draws: draws have no exact mixture)"
precompute $teacher "$run/data" "$run/shards-teacher"
precompute "$expert" "$run/data" "$run/shards-expert"
for mix in mix-0.5 mix-source routed; do
  [[ -f $run/shards-$mix/manifest.json ]] && continue
  stamp "merge-teachers: $mix"
  weights=()
  [[ $mix == mix-source ]] && weights=(--source-weights text.jsonl=0.8,0.2 --source-weights math.jsonl=0.2,0.8)
  [[ $mix == routed ]] && weights=(--route domain=text,math)
  $distill merge-teachers --output "$run/shards-$mix" "${weights[@]}" "$run/shards-teacher:0.5" "$run/shards-expert:0.5"
done

for row in teacher expert mix-0.5 mix-source routed; do
  train "$row" "$run/student-init" "$run/shards-$row" "$STEPS" "$LR" 0.5
done

stamp "evaluate: held-out text, held-out math answers and greedy replies"
models=(--model teacher=$teacher --model expert="$expert" --model student-init="$run/student-init")
for row in teacher expert mix-0.5 mix-source routed; do models+=(--model "kd-$row=$(ckpt "$row" "$STEPS")"); done
if [[ ! -f $run/results.json ]] || [[ "$(cat "$run/results.models" 2>/dev/null)" != "${models[*]}" ]]; then
  $distill eval --device cpu --text "$run/heldout/text.jsonl" --teacher $teacher \
    --generate "$run/heldout/math.jsonl" --max-new-tokens 24 --side-by-side "$run/replies.md" \
    "${models[@]}" --json > "$run/text.tmp"
  $distill eval --device cpu --text "$run/heldout/math.jsonl" "${models[@]}" --json > "$run/math.tmp"
  mv "$run/text.tmp" "$run/results.json"
  mv "$run/math.tmp" "$run/results-math.json"
  echo "${models[*]}" > "$run/results.models"
fi
python - "$run" <<'PY'
import json, sys
run = sys.argv[1]
rows = json.load(open(f"{run}/results.json"))
math = {r["name"]: r for r in json.load(open(f"{run}/results-math.json"))}
n = rows[0]["generation"]["with_reference"]
lines = ["| model | held-out text PPL | KL to teacher on text | math answer NLL (held-out reference answers) "
         f"| exact match ({n} held-out math prompts) | reply tokens |", "|---|---|---|---|---|---|"]
for r in rows:
    t, g, m = r["text"], r["generation"], math[r["name"]]["text"]
    lines.append(f"| {r['name']} | {t['perplexity']:.2f} | {t['kl_to_teacher']:.4f} | {m['cross_entropy']:.3f} "
                 f"| {100 * g['exact_match']:.1f}% | {g['mean_new_tokens']:.1f} |")
table = "\n".join(lines)
open(f"{run}/teachers.md", "w").write(table + "\n")
print(table)
PY
stamp "done: $run/teachers.md; replies side by side $run/replies.md"
