#!/usr/bin/env bash
# Runs the converter (pipeline.make_tfrecords) on Google Cloud Dataflow.
#
#   launch/dataflow.sh --project=P --region=us-central1 --bucket=gs://B \
#       [--dry_run] -- --input=gs://B/raw --output_dir=gs://B/data [converter flags]
#
# It adds Beam's options for Dataflow (runner, project, region, temp_location
# under the bucket) and --setup_file=pyproject.toml, so Beam builds this
# project as an sdist and installs it on every Dataflow worker. Needs
#   pip install 'apache-beam[gcp]' build
# and Application Default Credentials (`gcloud auth application-default login`).
# --dry_run prints the command instead of running it.
set -euo pipefail
project_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${project_root}${PYTHONPATH:+:${PYTHONPATH}}"
python="${PYTHON:-python3}"

fail() { echo "launch/dataflow.sh: $*" >&2; exit 1; }

project="" region="" bucket="" dry_run=0
while (($#)); do
  case "$1" in
    --project=*) project="${1#*=}" ;;
    --region=*) region="${1#*=}" ;;
    --bucket=*) bucket="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) fail "unknown option $1 (converter flags go after --)" ;;
  esac
  shift
done
[[ -n "$project" && -n "$region" ]] || fail "--project and --region are required"
[[ "$bucket" == gs://* ]] || fail "--bucket=gs://BUCKET is required (Dataflow's temp and staging files go there)"
output_dir=""
for arg in "$@"; do
  [[ "$arg" == --output_dir=* ]] && output_dir="${arg#*=}"
done
[[ "$output_dir" == gs://* ]] || fail "the converter needs --output_dir=gs://... (Dataflow workers cannot write local paths)"

command=("$python" -m pipeline.make_tfrecords "$@"
         --runner=DataflowRunner --project="$project" --region="$region"
         --temp_location="${bucket%/}/dataflow/tmp"
         --setup_file="$project_root/pyproject.toml")
if ((dry_run)); then
  printf '%q ' "${command[@]}"; echo
  exit 0
fi
"$python" -c "import apache_beam.io.gcp.gcsio, build" 2>/dev/null \
  || fail "missing packages: pip install 'apache-beam[gcp]' build"
exec "${command[@]}"
