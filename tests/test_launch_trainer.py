"""launch.local end to end with the real trainers.cnn on 2 local workers.

An uninterrupted run is the reference; a run whose worker 1 is SIGKILLed
after the first checkpoint, and one whose worker 1 gets SIGTERM, must each
end at the same step with the same metrics and (--deterministic) the same
weights. Each run starts 2 TF processes (a few seconds each), so the runs
are tiny: 8x8 images, 300 steps of batch 8.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STEPS = 300
FIRST_CHECKPOINT = 50


def trainer_command(data_dir, model_dir):
  return [sys.executable, "-m", "trainers.cnn", f"--data_dir={data_dir}",
          f"--model_dir={model_dir}", f"--train_steps={TRAIN_STEPS}",
          "--batch_size=8", f"--checkpoint_every={FIRST_CHECKPOINT}",
          "--steps_per_loop=10", "--log_every=50", "--seed=1",
          "--deterministic", "--export=false"]


def start_launcher(data_dir, model_dir, *flags):
  command = [sys.executable, "-m", "launch.local", "--num_workers=2", *flags,
             "--", *trainer_command(data_dir, model_dir)]
  return subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def finish(launcher, timeout=240):
  """The launcher's output once it exits; on a time-out it is killed (its
  watchdog then stops the workers), so a hung run leaves nothing behind."""
  try:
    output, _ = launcher.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    launcher.kill()
    launcher.communicate()
    raise
  return output


def worker_process(launcher, index):
  """The trainer process with TF_CONFIG task index `index`."""
  for child in psutil.Process(launcher.pid).children():
    config = child.environ().get("TF_CONFIG")
    if config and json.loads(config)["task"]["index"] == index:
      return child
  raise AssertionError(f"no worker {index} under the launcher")


def final_checkpoint(model_dir):
  """The model, optimizer and step tensors of the last checkpoint.

  Not the bookkeeping (save_counter, the preemption handler's
  checkpointed_runs), which a preemption's extra save changes.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  assert path and path.endswith(f"ckpt-{TRAIN_STEPS}"), path
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name)
          for name in reader.get_variable_to_shape_map()
          if name.split("/")[0] in ("model", "optimizer", "step")}


def metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.json")) as f:
    return json.load(f)


def interrupted_run(data_dir, model_dir, signum, *flags):
  """Sends `signum` to worker 1 once the first checkpoint is on disk."""
  launcher = start_launcher(data_dir, model_dir, *flags)
  first = os.path.join(model_dir, "checkpoints",
                       f"ckpt-{FIRST_CHECKPOINT}.index")
  deadline = time.monotonic() + 120
  while not os.path.exists(first) and launcher.poll() is None:
    if time.monotonic() > deadline:
      finish(launcher, timeout=0.1)
    time.sleep(0.02)
  worker_process(launcher, 1).send_signal(signum)
  output = finish(launcher)
  return launcher.returncode, output


def assert_same_result(model_dir, reference_dir):
  """Same metrics.json and bit-identical final weights as the reference."""
  assert metrics(model_dir) == metrics(reference_dir)
  expected = final_checkpoint(reference_dir)
  weights = final_checkpoint(model_dir)
  # Keras 3 saves the model's weights once, under the optimizer's references.
  assert sum("_trainable_variables/" in name for name in expected) >= 4
  assert sorted(weights) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(weights[name], value, err_msg=name)


def resumed_step(output):
  lines = [line for line in output.splitlines()
           if "[worker 0]" in line and "continuing at step" in line]
  assert len(lines) == 1, lines
  return int(lines[0].rsplit(" ", 1)[1])


@pytest.fixture(scope="module")
def reference_run(image_dataset_dir, tmp_path_factory):
  """(model dir, output) of an uninterrupted 2-worker run."""
  model_dir = str(tmp_path_factory.mktemp("reference"))
  launcher = start_launcher(image_dataset_dir, model_dir)
  output = finish(launcher)
  assert launcher.returncode == 0, output[-3000:]
  return model_dir, output


def test_two_workers_train_to_the_end(reference_run):
  model_dir, output = reference_run
  assert metrics(model_dir)["step"] == TRAIN_STEPS
  assert os.path.exists(os.path.join(model_dir, "checkpoints",
                                     f"ckpt-{TRAIN_STEPS}.index"))
  assert not os.path.exists(os.path.join(model_dir, "tmp_worker_1"))
  for index in range(2):
    assert any(line.startswith(f"[worker {index}]") and
               f"done at step {TRAIN_STEPS}" in line
               for line in output.splitlines())
  assert "attempt 1" not in output


@pytest.mark.parametrize("signum, max_restarts, expected_lines", [
    # A crash: the launcher stops worker 0 and restarts both (counted).
    (signal.SIGKILL, 1, ["worker 1 failed (killed by SIGKILL)",
                         "restart 1 of 1"]),
    # A preemption: both workers save at the same step, exit 42, and the
    # restart is free (no restarts allowed at all here).
    (signal.SIGTERM, 0, ["failed (exit code 42)",
                         "preemption 1 (not counted as a restart)"]),
])
def test_interrupted_worker_restarts_to_the_reference_weights(
    reference_run, image_dataset_dir, tmp_path, signum, max_restarts,
    expected_lines):
  reference_dir, _ = reference_run
  model_dir = str(tmp_path / "run")
  code, output = interrupted_run(image_dataset_dir, model_dir, signum,
                                 f"--max_restarts={max_restarts}")
  assert code == 0, output[-3000:]
  for line in expected_lines:
    assert line in output
  assert FIRST_CHECKPOINT <= resumed_step(output) < TRAIN_STEPS
  assert_same_result(model_dir, reference_dir)
