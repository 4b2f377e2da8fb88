"""launch/dataflow.sh: the Dataflow command it builds, and its input checks."""

import os
import shlex
import subprocess

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(PROJECT_ROOT, "launch", "dataflow.sh")
CONVERTER_FLAGS = ["--input=gs://bucket/raw", "--output_dir=gs://bucket/data",
                   "--num_shards=16"]


def run_script(*args):
  return subprocess.run([SCRIPT, *args], capture_output=True, text=True,
                        timeout=30, check=False)


def test_dry_run_prints_the_converter_with_dataflow_options():
  result = run_script("--project=my-project", "--region=us-central1",
                      "--bucket=gs://bucket/", "--dry_run", "--",
                      *CONVERTER_FLAGS)
  assert result.returncode == 0, result.stderr
  command = shlex.split(result.stdout)
  assert command[1:3] == ["-m", "pipeline.make_tfrecords"]
  assert command[3:6] == CONVERTER_FLAGS
  assert command[6:] == [
      "--runner=DataflowRunner", "--project=my-project",
      "--region=us-central1", "--temp_location=gs://bucket/dataflow/tmp",
      f"--setup_file={PROJECT_ROOT}/pyproject.toml"]


def assert_one_line_error(result, expected):
  assert result.returncode == 1
  assert result.stderr.strip().count("\n") == 0, result.stderr
  assert expected in result.stderr


def test_missing_project_is_one_line():
  assert_one_line_error(
      run_script("--region=r", "--bucket=gs://b", "--", *CONVERTER_FLAGS),
      "--project and --region are required")


def test_local_output_dir_is_one_line():
  assert_one_line_error(
      run_script("--project=p", "--region=r", "--bucket=gs://b", "--",
                 "--input=gs://b/raw", "--output_dir=data/out"),
      "needs --output_dir=gs://")


def test_local_bucket_is_one_line():
  assert_one_line_error(
      run_script("--project=p", "--region=r", "--bucket=/tmp/b", "--",
                 *CONVERTER_FLAGS), "--bucket=gs://BUCKET is required")
