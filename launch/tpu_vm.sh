#!/usr/bin/env bash
# Runs a trainer on a Cloud TPU VM; see launch/tpu_vm.py for the flags.
#   launch/tpu_vm.sh --name=my-tpu --zone=us-central2-b --accelerator_type=v4-8 \
#       --spot --delete -- python3 -m trainers.cnn \
#       --data_dir=gs://BUCKET/data --model_dir=gs://BUCKET/runs/cnn
set -euo pipefail
project_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${project_root}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m launch.tpu_vm "$@"
