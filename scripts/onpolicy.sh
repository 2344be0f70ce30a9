#!/usr/bin/env bash
# On-policy distillation in rounds (GKD / MiniLLM style), offline: the teacher is never
# in memory next to the student. Round r:
#   1. the student (round r-1's last checkpoint; --student in round 1) samples replies
#      to the prompts: `distill generate --with-ids` keeps the exact token ids and the
#      student's own log-prob of each sampled token (`response_logprobs`);
#   2. the teacher precomputes its targets on exactly those tokens
#      (`distill precompute --token-ids`: no re-tokenisation);
#   3. training continues from that student on the round's shards (`distill train`).
# With --mix FILE --mix-rows N, each round also trains on N rows of fixed data (FILE's
# rows, a different seeded choice per round), precomputed into the same shard set (their
# `sampler_logprob` is null): GKD's mixture of on-policy and fixed data.
# With --route FIELD=NAME:DIR,NAME:DIR (instead of --teacher), several teachers of the
# student's tokenizer share the rounds: each sample is scored by the teacher its prompt
# row's FIELD names (generate keeps the prompt row's fields), every teacher precomputes
# the round's rows (top-k, no draws: a mixture has no exact draws) and
# `distill merge-teachers --route` keeps each row's own teacher's targets; rows without
# the field (fixed --mix rows, say) take the teachers' mixture at equal weights. Reverse
# KL on the student's own samples: pass `-- --loss reverse-kl`.
# Each round keeps its samples, shards and run under OUTPUT/round-R. Every stage resumes
# after a crash: a generation that finished is kept (its file is written atomically,
# so an interrupted one starts again), precompute continues after its last complete
# shard, training continues from its newest checkpoint (`--resume`), a finished round
# is skipped.
#
#   scripts/onpolicy.sh {--teacher DIR | --route FIELD=NAME:DIR,...} --student DIR --prompts FILES --output DIR
#       [--rounds 1] [--steps 8] [--samples 2] [--temperature 1] [--max-new-tokens 64]
#       [--top-k 16] [--sample 16] [--mix FILE --mix-rows N] [--device cpu]
#       [-- more `distill train` flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=1 steps=8 samples=2 temperature=1 max_new=64 top_k=16 draws=16 device=cpu
teacher="" route="" student="" prompts="" output="" mix="" mix_rows=0
train_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --teacher) teacher=$2; shift 2 ;;
    --route) route=$2; shift 2 ;;
    --student) student=$2; shift 2 ;;
    --prompts) prompts=$2; shift 2 ;;
    --output) output=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --samples) samples=$2; shift 2 ;;
    --temperature) temperature=$2; shift 2 ;;
    --max-new-tokens) max_new=$2; shift 2 ;;
    --top-k) top_k=$2; shift 2 ;;
    --sample) draws=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --mix) mix=$2; shift 2 ;;
    --mix-rows) mix_rows=$2; shift 2 ;;
    --) shift; train_args=("$@"); break ;;
    *) echo "onpolicy.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
for need in student prompts output; do
  [[ -n ${!need} ]] || { echo "onpolicy.sh: --$need is required" >&2; exit 2; }
done
if [[ -n $teacher && -n $route ]] || [[ -z $teacher && -z $route ]]; then
  echo "onpolicy.sh: give --teacher DIR or --route FIELD=NAME:DIR,NAME:DIR (not both)" >&2; exit 2
fi
route_field=${route%%=*}
IFS=',' read -ra route_teachers <<< "${route#*=}"
if [[ -n $route ]]; then  # every teacher named and present before the first round writes
  [[ $route == *=* && ${#route_teachers[@]} -ge 2 ]] || { echo "onpolicy.sh: --route $route: expected FIELD=NAME:DIR,NAME:DIR" >&2; exit 2; }
  for spec in "${route_teachers[@]}"; do
    [[ $spec == *:* && -f ${spec#*:}/config.json ]] || { echo "onpolicy.sh: --route: $spec is not NAME:DIR of a model folder" >&2; exit 2; }
  done
fi
source scripts/env.sh
distill=${DISTILL_BIN:-target/release/distill}
mkdir -p "$output"
current=$student
for ((r = 1; r <= rounds; r++)); do
  dir=$output/round-$r
  final=$dir/run/$(printf "checkpoint-%07d" "$steps")
  mkdir -p "$dir"
  if [[ ! -d $final ]]; then
    if [[ ! -f $dir/samples.jsonl ]]; then
      echo "round $r: $current samples $samples replies per prompt"
      $distill generate --model "$current" --input $prompts --output "$dir/samples.jsonl" --with-ids \
        --temperature "$temperature" --num-samples "$samples" --seed "$r" --max-new-tokens "$max_new" \
        --device "$device" --no-progress
    fi
    inputs=("$dir/samples.jsonl")
    if [[ -n $mix && $mix_rows -gt 0 ]]; then
      if [[ ! -f $dir/mix.jsonl ]]; then
        python - "$mix" "$mix_rows" "$r" "$dir/mix.jsonl" <<'PY'
import os, random, sys
path, n, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rows = [l for l in open(path) if l.strip()]
chosen = random.Random(seed).sample(rows, min(n, len(rows)))
with open(out + ".tmp", "w") as f:
    f.writelines(l if l.endswith("\n") else l + "\n" for l in chosen)
os.replace(out + ".tmp", out)
PY
      fi
      inputs+=("$dir/mix.jsonl")
    fi
    if [[ -z $route ]]; then
      echo "round $r: the teacher scores the samples"
      $distill precompute --teacher "$teacher" --input "${inputs[@]}" --token-ids --output "$dir/shards" \
        --top-k "$top_k" --sample "$draws" --devices "$device" --no-progress | { grep -E "tokens|time" || true; }
    elif [[ ! -f $dir/shards/manifest.json ]]; then
      names=() sets=()
      for spec in "${route_teachers[@]}"; do
        name=${spec%%:*}
        echo "round $r: teacher $name scores the samples"
        $distill precompute --teacher "${spec#*:}" --input "${inputs[@]}" --token-ids --output "$dir/shards-$name" \
          --top-k "$top_k" --sample 0 --devices "$device" --no-progress | { grep -E "tokens|time" || true; }
        names+=("$name") sets+=("$dir/shards-$name")
      done
      $distill merge-teachers --output "$dir/shards" --route "$route_field=$(IFS=,; echo "${names[*]}")" "${sets[@]}" \
        | grep -E "routed" || true
    fi
    echo "round $r: training $steps steps from $current"
    $distill train --student "$current" --shards "$dir/shards" --output "$dir/run" --resume --device "$device" \
      --steps "$steps" --save-every "$steps" --keep-last 1 "${train_args[@]}" 2>&1 | tail -2
  fi
  current=$final
done
echo "on-policy: $rounds rounds done; the student is $current"
