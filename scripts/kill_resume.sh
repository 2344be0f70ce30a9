#!/usr/bin/env bash
# kill -9 at random moments, then resume, for precompute (every kind of target),
# generate --capture and train --nproc 2: the bytes each job writes must equal those of
# an uninterrupted run (scripts/kill_resume.py; 20 trials per job by default).
# Usage: scripts/kill_resume.sh [--trials N] [--seed S] [--only NAME ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --release
source scripts/env.sh
python scripts/tiny_models.py make .cache/tiny-models
python scripts/kill_resume.py --distill target/release/distill --models .cache/tiny-models "$@"
