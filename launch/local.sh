#!/usr/bin/env bash
# Runs N trainer workers on this machine; see launch/local.py for the flags.
#   launch/local.sh --num_workers=2 --max_restarts=3 -- \
#       python -m trainers.cnn --data_dir=DIR --model_dir=DIR --train_steps=N
# The project goes on PYTHONPATH (not `cd`), so relative paths in the
# trainer's flags still mean what they mean in your shell.
set -euo pipefail
project_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${project_root}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m launch.local "$@"
