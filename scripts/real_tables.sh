# Sourced by the tables on the main job's teacher (targets_, teachers_, recipes_,
# math_table.sh): checks that scripts/run.sh has installed the teacher and the data
# tools, builds distill, and sets `cache`, `teacher`, `distill`, and `stamp` (seconds
# since the script started).
cache=.cache/real
teacher=$cache/teacher
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started ))s] $*"; }
[[ -d $teacher ]] || { echo "run scripts/run.sh once first: it installs the teacher and the data tools" >&2; exit 1; }
scripts/setup.sh --release
source scripts/env.sh
distill=target/release/distill
