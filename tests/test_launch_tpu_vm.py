"""launch.tpu_vm against tests/fake_gcloud, a recording fake `gcloud` on PATH.

The fake keeps the VM's state between calls (absent, CREATING, READY,
PREEMPTED) and plays training runs that finish, crash or get preempted, so
these tests check the commands, their order, and the recovery decisions.
"""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER = ["python3", "-m", "trainers.cnn", "--data_dir=gs://bucket/data",
           "--model_dir=gs://bucket/run", "--train_steps=100"]


@pytest.fixture()
def fake_gcloud(tmp_path):
  """Environment with the fake first on PATH; returns (env, state dir)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").symlink_to(os.path.join(PROJECT_ROOT, "tests",
                                               "fake_gcloud"))
  state_dir = tmp_path / "gcloud_state"
  state_dir.mkdir()
  env = dict(os.environ, FAKE_GCLOUD_DIR=str(state_dir),
             PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  return env, state_dir


def launcher_command(*flags, trainer=TRAINER):
  return [sys.executable, "-m", "launch.tpu_vm", "--name=test-tpu",
          "--zone=us-central2-b", "--poll_seconds=0.01", *flags, "--",
          *trainer]


def run_launcher(command, env, timeout=60):
  return subprocess.run(command, cwd=PROJECT_ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def calls(state_dir):
  path = state_dir / "calls.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()]


def summary(call):
  """`describe`, `create`, `ssh:install`, `ssh:run`, `auth`, ..."""
  if call[:2] == ["auth", "list"]:
    return "auth"
  verb = call[3]
  if verb == "ssh":
    remote = next(arg for arg in call if arg.startswith("--command="))
    if "--tpu=" in remote:
      return "ssh:run"
    return "ssh:install" if "pip install" in remote else "ssh:kill"
  return verb


def test_first_run_creates_installs_runs_and_survives_a_preemption(
    fake_gcloud):
  env, state_dir = fake_gcloud
  env["FAKE_GCLOUD_PREEMPT"] = "1"
  result = run_launcher(launcher_command("--spot", "--delete"), env)
  assert result.returncode == 0, result.stdout + result.stderr
  made_ready = ["describe", "create", "describe", "describe"]
  installed = ["scp", "ssh:install"]
  assert [summary(call) for call in calls(state_dir)] == [
      "auth", *made_ready, *installed, "ssh:run",
      "describe", "describe", "delete", *made_ready, *installed, "ssh:run",
      "delete"]
  create = next(call for call in calls(state_dir) if call[3] == "create")
  assert create[4] == "test-tpu"
  assert {"--accelerator-type=v4-8", "--version=tpu-vm-tf-2.16.1-pjrt",
          "--spot", "--zone=us-central2-b"} <= set(create)
  run = next(call for call in calls(state_dir) if summary(call) == "ssh:run")
  assert "--worker=all" in run
  remote = next(arg for arg in run if arg.startswith("--command="))
  assert remote.endswith(" ".join(TRAINER) + " --tpu=local")
  scp = next(call for call in calls(state_dir) if call[3] == "scp")
  assert "--worker=all" in scp and os.path.basename(scp[4]) == (
      "project.tar.gz")
  assert "[test-tpu] fake trainer: run 2 finished with exit code 0" in (
      result.stdout)
  assert "preemption 1" in result.stdout
  assert json.loads((state_dir / "state.json").read_text())["state"] is None


def test_exit_42_on_a_live_vm_reruns_without_reinstalling(fake_gcloud):
  env, state_dir = fake_gcloud
  env["FAKE_GCLOUD_EXITS"] = "1:42"
  result = run_launcher(launcher_command("--max_restarts=0"), env)
  assert result.returncode == 0, result.stdout + result.stderr
  steps = [summary(call) for call in calls(state_dir)]
  assert steps[-5:] == ["ssh:run", "describe", "describe", "ssh:run",
                        "describe"]
  assert steps.count("create") == 1 and steps.count("ssh:install") == 1
  assert "TPU VM test-tpu is still there" in result.stdout
  assert "gcloud compute tpus tpu-vm delete test-tpu" in result.stdout


def test_crash_is_restarted_while_restarts_last(fake_gcloud):
  env, state_dir = fake_gcloud
  env["FAKE_GCLOUD_EXITS"] = "1:3,2:3"
  result = run_launcher(launcher_command("--max_restarts=1"), env)
  assert result.returncode == 3, result.stdout + result.stderr
  assert [summary(call) for call in calls(state_dir)].count("ssh:run") == 2
  assert "no restarts left" in result.stdout


def test_user_error_is_not_rerun(fake_gcloud):
  env, state_dir = fake_gcloud
  env["FAKE_GCLOUD_EXITS"] = "1:1"
  result = run_launcher(launcher_command("--max_restarts=3", "--delete"),
                        env)
  assert result.returncode == 1
  steps = [summary(call) for call in calls(state_dir)]
  assert steps.count("ssh:run") == 1 and steps[-1] == "delete"


def test_dry_run_prints_every_command_and_runs_none(fake_gcloud):
  env, state_dir = fake_gcloud
  result = run_launcher(launcher_command("--dry_run", "--delete"), env)
  assert result.returncode == 0, result.stderr
  printed = [line[2:] for line in result.stdout.splitlines()
             if line.startswith("+ gcloud ")]
  assert [line.split()[4] if line.startswith("gcloud compute") else "auth"
          for line in printed] == [
              "auth", "describe", "create", "describe", "scp", "ssh", "ssh",
              "delete"]
  assert "--tpu=local" in printed[-2]
  assert calls(state_dir) == []


def test_pod_runs_the_trainer_on_worker_0_with_the_tpu_name(fake_gcloud):
  env, state_dir = fake_gcloud
  result = run_launcher(launcher_command(
      "--pod", "--accelerator_type=v4-32",
      "--version=tpu-vm-tf-2.16.1-pod-pjrt"), env)
  assert result.returncode == 0, result.stdout + result.stderr
  install = next(call for call in calls(state_dir)
                 if summary(call) == "ssh:install")
  run = next(call for call in calls(state_dir) if summary(call) == "ssh:run")
  assert "--worker=all" in install and "--worker=0" in run
  remote = next(arg for arg in run if arg.startswith("--command="))
  assert "export TPU_LOAD_LIBRARY=0 && exec " in remote
  assert remote.endswith(" ".join(TRAINER) + " --tpu=test-tpu")


def assert_one_line_error(result, expected):
  assert result.returncode == 1, result.stdout + result.stderr
  assert result.stderr.strip().count("\n") == 0, result.stderr
  assert expected in result.stderr
  assert "Traceback" not in result.stderr


def test_zone_typo_is_one_line_and_creates_nothing(fake_gcloud):
  env, state_dir = fake_gcloud
  command = launcher_command()
  command[command.index("--zone=us-central2-b")] = "--zone=us-central2-z"
  result = run_launcher(command, env)
  assert_one_line_error(
      result, "gcloud refused to create TPU VM test-tpu: INVALID_ARGUMENT: "
      "Invalid value for field 'zone': 'us-central2-z' (nothing was created)")
  assert "ssh:run" not in [summary(call) for call in calls(state_dir)]


def test_accelerator_typo_is_one_line(fake_gcloud):
  env, _ = fake_gcloud
  result = run_launcher(launcher_command("--accelerator_type=v4-9"), env)
  assert_one_line_error(result, "'accelerator_type': 'v4-9'")


def test_not_logged_in_is_one_line(fake_gcloud):
  env, state_dir = fake_gcloud
  env["FAKE_GCLOUD_LOGGED_OUT"] = "1"
  result = run_launcher(launcher_command(), env)
  assert_one_line_error(result, "gcloud is not logged in")
  assert [summary(call) for call in calls(state_dir)] == ["auth"]


def test_gcloud_missing_is_one_line(tmp_path):
  empty_bin = tmp_path / "empty_bin"
  empty_bin.mkdir()
  env = dict(os.environ, PATH=str(empty_bin))
  result = run_launcher(launcher_command(), env)
  assert_one_line_error(result, "gcloud not found on PATH")


def test_local_model_dir_is_one_line(fake_gcloud):
  env, state_dir = fake_gcloud
  trainer = [*TRAINER[:-2], "--model_dir=/tmp/run", "--train_steps=100"]
  result = run_launcher(launcher_command(trainer=trainer), env)
  assert_one_line_error(result, "needs --model_dir=gs://")
  assert calls(state_dir) == []


def test_ctrl_c_stops_the_remote_trainer(fake_gcloud):
  env, state_dir = fake_gcloud
  env["FAKE_GCLOUD_RUN_SECONDS"] = "60"
  launcher = subprocess.Popen(launcher_command(), cwd=PROJECT_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
  state_path = state_dir / "state.json"
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline and not (
      state_path.exists() and json.loads(state_path.read_text())["runs"]):
    time.sleep(0.05)
  # The fake records the run as its process starts; a Ctrl-C before the
  # launcher waits on it is the next test's case.
  time.sleep(1.0)
  launcher.send_signal(signal.SIGINT)
  output, _ = launcher.communicate(timeout=30)
  assert launcher.returncode == 130, output
  assert "ssh:kill" in [summary(call) for call in calls(state_dir)]
  assert "run 1 got SIGTERM, checkpointed" in output
  assert "TPU VM test-tpu is still there" in output
  running_pid = json.loads(state_path.read_text())["running_pid"]
  assert not psutil.pid_exists(running_pid) or (
      psutil.Process(running_pid).status() == psutil.STATUS_ZOMBIE)


def test_a_ctrl_c_while_the_run_starts_still_stops_it(fake_gcloud,
                                                       monkeypatch):
  """The window between starting the remote run and waiting on it, hit for
  sure: the interrupt is raised as soon as the process has started."""
  from launch import processes  # pylint: disable=g-import-not-at-top
  from launch import tpu_vm  # pylint: disable=g-import-not-at-top
  env, state_dir = fake_gcloud
  for name in ("PATH", "FAKE_GCLOUD_DIR"):
    monkeypatch.setenv(name, env[name])
  monkeypatch.setenv("FAKE_GCLOUD_RUN_SECONDS", "60")
  started = []

  def start_then_interrupt(*args, **kwargs):
    started.append(real_start(*args, **kwargs))
    raise KeyboardInterrupt

  real_start = processes.start
  monkeypatch.setattr(processes, "start", start_then_interrupt)
  config = tpu_vm.TpuConfig(
      name="test-tpu", zone="us-central2-b", project=None,
      accelerator_type="v4-8", version="tpu-vm-tf-2.16.1-pjrt", spot=False,
      pod=False, delete=False, dry_run=False, max_restarts=0,
      max_preemptions=0, remote_dir="tfrecord-pipeline", poll_seconds=0.01,
      ready_timeout_seconds=30, grace_seconds=2)
  try:
    with pytest.raises(KeyboardInterrupt):
      tpu_vm.supervise(tpu_vm.Gcloud(config), TRAINER + ["--tpu=local"])
    assert len(started) == 1
    assert started[0].popen.poll() is not None  # stopped, not left running
    assert "ssh:kill" in [summary(call) for call in calls(state_dir)]
  finally:
    for child in started:
      if child.popen.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
