#!/usr/bin/env bash
# What capturing targets while the teacher writes (`generate --capture`) costs, against
# the two-pass way (generate, then precompute over the replies), on the main job's
# teacher and math prompts, same replies, same targets (top-16 + 16 draws). Prints a
# table. Run scripts/run.sh once first (teacher, data tools, release build); a quiet CPU.
#   scripts/bench_capture.sh [--prompts 64] [--max-new-tokens 48]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
prompts=64 max_new=48
while [[ $# -gt 0 ]]; do
  case $1 in
    --prompts) prompts=$2; shift 2 ;;
    --max-new-tokens) max_new=$2; shift 2 ;;
    *) echo "bench_capture.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cache=.cache/real
[[ -d $cache/teacher ]] || { echo "run scripts/run.sh once first" >&2; exit 1; }
scripts/setup.sh --release >/dev/null
source scripts/env.sh
distill=target/release/distill
python scripts/real_data.py math $cache/math-256-64 --train 256 --heldout 64 >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
head -n "$prompts" $cache/math-256-64/train.jsonl > "$work/prompts.jsonl"
gen=(--model $cache/teacher --input "$work/prompts.jsonl" --max-new-tokens "$max_new" --device cpu --no-progress)
seconds() { local t0=$(date +%s%N); "$@" >/dev/null 2>&1; echo $(( ($(date +%s%N) - t0) / 1000000 )); }
plain=$(seconds $distill generate "${gen[@]}" --output "$work/plain.jsonl")
two_gen=$(seconds $distill generate "${gen[@]}" --output "$work/replies.jsonl" --with-ids)
two_pre=$(seconds $distill precompute --teacher $cache/teacher --input "$work/replies.jsonl" --token-ids \
  --output "$work/two-pass" --top-k 16 --sample 16 --devices cpu --no-progress)
one=$(seconds $distill generate "${gen[@]}" --output "$work/captured.jsonl" --capture "$work/one-pass" \
  --target-top-k 16 --target-sample 16)
python - "$work" "$plain" "$two_gen" "$two_pre" "$one" <<'PY'
import json, sys
work, (plain, gen, pre, one) = sys.argv[1], [int(x) / 1000 for x in sys.argv[2:]]
rows = lambda f: [json.loads(l) for l in open(f"{work}/{f}")]
a, b = rows("replies.jsonl"), rows("captured.jsonl")
assert [r["response_ids"] for r in a] == [r["response_ids"] for r in b], "the two runs wrote different replies"
tokens = sum(r["new_tokens"] for r in a)
print("| way | seconds | vs generate alone |\n|---|---|---|")
print(f"| generate alone ({len(a)} prompts, {tokens} reply tokens) | {plain:.1f} | 1.00x |")
print(f"| generate --with-ids, then precompute --token-ids | {gen:.1f} + {pre:.1f} = {gen + pre:.1f} | {(gen + pre) / plain:.2f}x |")
print(f"| generate --capture (one pass) | {one:.1f} | {one / plain:.2f}x |")
PY
