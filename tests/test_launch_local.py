"""launch.local mechanics, driven with a tiny worker program (no TF).

The worker reads TF_CONFIG, binds its own port (as a gRPC server would),
records who it is, counts steps into a per-worker checkpoint file and resumes
from it, and on demand crashes, exits 42 or 1, or spawns a grandchild. That
makes ports, roles, restarts, signals and orphan cleanup exact and fast to
check; tests/test_launch_trainer.py does the same with the real trainer.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent('''\
    import json, os, signal, socket, subprocess, sys, time
    out_dir, steps = sys.argv[1], int(sys.argv[2])
    faults = dict(arg.split("=", 1) for arg in sys.argv[3:])
    config = json.loads(os.environ.get("TF_CONFIG", "null"))
    index = config["task"]["index"] if config else 0
    server = None
    if config:  # hold our port like a gRPC server does
      server = socket.socket()
      server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      server.bind(("localhost", int(config["cluster"]["worker"][index].split(":")[1])))
      server.listen()
    checkpoint = os.path.join(out_dir, f"checkpoint-{index}")
    step = int(open(checkpoint).read()) if os.path.exists(checkpoint) else 0
    record = {"pid": os.getpid(), "index": index, "tf_config": config,
              "start_step": step}
    if "grandchild" in faults:
      record["grandchild"] = subprocess.Popen(["sleep", "300"]).pid
    with open(os.path.join(out_dir, "starts.jsonl"), "a") as starts:
      starts.write(json.dumps(record) + "\\n")

    def save(step):
      with open(checkpoint + ".tmp", "w") as f:
        f.write(str(step))
      os.replace(checkpoint + ".tmp", checkpoint)

    def preempted(signum, frame):
      save(step)
      print(f"worker {index}: SIGTERM at step {step}, checkpointed", flush=True)
      sys.exit(42)
    signal.signal(signal.SIGTERM, preempted)

    def once(name):
      """True the first time this fault fires across restarts."""
      marker = os.path.join(out_dir, f"fired-{name}-{index}")
      if os.path.exists(marker):
        return False
      open(marker, "w").close()
      return True

    while step < steps:
      time.sleep(float(faults.get("step_seconds", 0.02)))
      step += 1
      save(step)
      print(f"worker {index} step {step}", flush=True)
      if str(index) == faults.get("worker") and step >= int(faults["at"]):
        code = int(faults["exit"])
        if faults.get("always") or once("exit"):
          os._exit(code)
    print(f"worker {index} done", flush=True)
''')


@pytest.fixture()
def worker(tmp_path):
  """(command prefix, output dir): `command + [steps, key=value faults...]`."""
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  return [sys.executable, str(script), str(out_dir)], out_dir


def launcher_command(*flags):
  return [sys.executable, "-m", "launch.local", *flags, "--"]


def run_launcher(command, timeout=60):
  return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True,
                        text=True, timeout=timeout, check=False)


def starts(out_dir):
  path = out_dir / "starts.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()]


def checkpoints(out_dir, num_workers):
  return [int((out_dir / f"checkpoint-{index}").read_text())
          for index in range(num_workers)]


def is_gone(pid):
  """Exited (a zombie left for init to reap counts as gone)."""
  try:
    return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
  except psutil.NoSuchProcess:
    return True


def wait_until(condition, timeout=20):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return True
    time.sleep(0.05)
  return False


def port_is_free(port):
  with socket.socket() as sock:
    try:
      sock.bind(("localhost", port))  # no SO_REUSEADDR: a listener blocks it
      return True
    except OSError:
      return False


def test_two_workers_get_a_cluster_and_run_to_the_end(worker):
  command, out_dir = worker
  result = run_launcher(launcher_command("--num_workers=2") + command + ["5"])
  assert result.returncode == 0, result.stdout + result.stderr
  records = sorted(starts(out_dir), key=lambda record: record["index"])
  assert [record["index"] for record in records] == [0, 1]
  cluster = records[0]["tf_config"]["cluster"]
  assert records[1]["tf_config"]["cluster"] == cluster
  assert list(cluster) == ["worker"] and len(set(cluster["worker"])) == 2
  assert [record["tf_config"]["task"] for record in records] == [
      {"type": "worker", "index": 0}, {"type": "worker", "index": 1}]
  assert checkpoints(out_dir, 2) == [5, 5]
  assert "[worker 0] worker 0 step 5" in result.stdout
  assert "[worker 1] worker 1 done" in result.stdout
  ports = [int(address.split(":")[1]) for address in cluster["worker"]]
  assert all(port_is_free(port) for port in ports)
  assert all(is_gone(record["pid"]) for record in records)


def test_one_worker_runs_without_tf_config(worker):
  command, out_dir = worker
  result = run_launcher(launcher_command("--num_workers=1") + command + ["3"])
  assert result.returncode == 0, result.stderr
  assert starts(out_dir)[0]["tf_config"] is None
  assert checkpoints(out_dir, 1) == [3]


def test_per_worker_log_files(worker, tmp_path):
  command, _ = worker
  log_dir = tmp_path / "logs"
  result = run_launcher(launcher_command(
      "--num_workers=2", f"--worker_log_dir={log_dir}") + command + ["2"])
  assert result.returncode == 0, result.stderr
  for index in range(2):
    lines = (log_dir / f"worker-{index}.log").read_text().splitlines()
    assert lines[-1] == f"worker {index} done"


def test_crash_restarts_the_group_which_resumes(worker):
  command, out_dir = worker
  result = run_launcher(launcher_command("--num_workers=2", "--max_restarts=1")
                        + command + ["8", "worker=1", "at=3", "exit=3"])
  assert result.returncode == 0, result.stdout + result.stderr
  records = starts(out_dir)
  assert len(records) == 4  # two attempts of two workers
  resumed = next(record for record in records[2:] if record["index"] == 1)
  assert resumed["start_step"] == 3
  assert checkpoints(out_dir, 2) == [8, 8]
  assert "restart 1 of 1" in result.stdout
  assert all(is_gone(record["pid"]) for record in records)


def test_crash_without_restarts_left_exits_with_its_code(worker):
  command, out_dir = worker
  result = run_launcher(
      launcher_command("--num_workers=2", "--max_restarts=1") + command +
      ["50", "worker=1", "at=2", "exit=3", "always=1", "step_seconds=0.05"])
  assert result.returncode == 3, result.stdout + result.stderr
  assert len(starts(out_dir)) == 4
  assert "no restarts left" in result.stdout
  # Worker 0 was stopped by SIGTERM, checkpointed, and did not run on.
  assert checkpoints(out_dir, 2)[0] < 50
  assert "SIGTERM at step" in result.stdout
  assert all(is_gone(record["pid"]) for record in starts(out_dir))


def test_preemption_restarts_without_counting(worker):
  command, out_dir = worker
  result = run_launcher(launcher_command("--num_workers=2", "--max_restarts=0")
                        + command + ["6", "worker=0", "at=2", "exit=42"])
  assert result.returncode == 0, result.stdout + result.stderr
  assert len(starts(out_dir)) == 4
  assert "preemption 1 (not counted as a restart)" in result.stdout
  assert checkpoints(out_dir, 2) == [6, 6]


def test_user_error_is_not_retried(worker):
  command, out_dir = worker
  result = run_launcher(launcher_command("--num_workers=2", "--max_restarts=3")
                        + command + ["6", "worker=1", "at=1", "exit=1"])
  assert result.returncode == 1
  assert len(starts(out_dir)) == 2


def start_launcher(command):
  return subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_sigkilled_worker_is_restarted_and_the_run_finishes(worker):
  command, out_dir = worker
  launcher = start_launcher(launcher_command(
      "--num_workers=2", "--max_restarts=1") + command +
                            ["40", "step_seconds=0.05"])
  assert wait_until(lambda: len(starts(out_dir)) == 2)
  assert wait_until(lambda: (out_dir / "checkpoint-1").exists())
  worker_1 = next(record for record in starts(out_dir) if record["index"] == 1)
  os.kill(worker_1["pid"], signal.SIGKILL)
  output, _ = launcher.communicate(timeout=60)
  assert launcher.returncode == 0, output
  assert "worker 1 failed (killed by SIGKILL)" in output
  assert len(starts(out_dir)) == 4
  assert checkpoints(out_dir, 2) == [40, 40]


def test_ctrl_c_stops_every_worker_and_grandchild(worker):
  command, out_dir = worker
  launcher = start_launcher(launcher_command("--num_workers=2") + command +
                            ["1000", "grandchild=1", "step_seconds=0.05"])
  assert wait_until(lambda: len(starts(out_dir)) == 2)
  launcher.send_signal(signal.SIGINT)
  output, _ = launcher.communicate(timeout=30)
  assert launcher.returncode == 130, output
  records = starts(out_dir)
  pids = [record["pid"] for record in records]
  pids += [record["grandchild"] for record in records]
  assert all(is_gone(pid) for pid in pids)
  assert output.count("SIGTERM at step") == 2  # both checkpointed first
  ports = [int(address.split(":")[1])
           for address in records[0]["tf_config"]["cluster"]["worker"]]
  assert all(port_is_free(port) for port in ports)


def test_sigterm_to_the_launcher_checkpoints_and_passes_on_42(worker):
  command, out_dir = worker
  launcher = start_launcher(launcher_command("--num_workers=2") + command +
                            ["1000", "step_seconds=0.05"])
  assert wait_until(lambda: len(starts(out_dir)) == 2)
  launcher.send_signal(signal.SIGTERM)
  output, _ = launcher.communicate(timeout=30)
  assert launcher.returncode == 42, output
  assert all(step < 1000 for step in checkpoints(out_dir, 2))


def test_sigkilled_launcher_leaves_no_worker(worker):
  command, out_dir = worker
  launcher = start_launcher(launcher_command(
      "--num_workers=2", "--grace_seconds=2") + command +
                            ["1000", "grandchild=1", "step_seconds=0.05"])
  assert wait_until(lambda: len(starts(out_dir)) == 2)
  launcher.kill()
  launcher.communicate(timeout=10)
  records = starts(out_dir)
  pids = [record["pid"] for record in records]
  pids += [record["grandchild"] for record in records]
  assert wait_until(lambda: all(is_gone(pid) for pid in pids), timeout=15)



def test_watchdog_closed_on_an_exception_stops_what_it_still_watches():
  """What a launcher leaving on an exception (a Ctrl-C between starting a
  child and the code that stops it) does with that child."""
  from launch import processes  # pylint: disable=g-import-not-at-top
  watchdog = processes.Watchdog(grace_seconds=1)
  child = processes.start(
      [sys.executable, "-c", "import time; time.sleep(60)"], name="sleeper",
      env=dict(os.environ), watchdog=watchdog)
  try:
    watchdog.close(stop_watched=True)
    assert wait_until(lambda: child.popen.poll() is not None, timeout=10)
  finally:
    if child.popen.poll() is None:
      child.popen.kill()

def assert_one_line_error(result, expected):
  assert result.returncode == 1
  assert result.stderr.strip().count("\n") == 0, result.stderr
  assert expected in result.stderr
  assert "Traceback" not in result.stderr


def test_unknown_module_is_one_line(worker):
  _, out_dir = worker
  result = run_launcher(launcher_command("--num_workers=2") +
                        [sys.executable, "-m", "trainers.no_such_trainer"])
  assert_one_line_error(result, "no module named trainers.no_such_trainer")
  assert not starts(out_dir)


def test_unknown_program_is_one_line():
  result = run_launcher(launcher_command() + ["no-such-program-xyz"])
  assert_one_line_error(result, "command not found: no-such-program-xyz")


def test_missing_command_is_one_line():
  result = run_launcher([sys.executable, "-m", "launch.local"])
  assert_one_line_error(result, "no command")


def test_taken_port_is_one_line(worker):
  command, out_dir = worker
  with socket.socket() as taken:
    taken.bind(("localhost", 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = run_launcher(launcher_command(
        "--num_workers=2", f"--ports={port},0") + command + ["2"])
  assert_one_line_error(result, f"port {port} is already in use")
  assert not starts(out_dir)


def test_given_ports_are_used_again_after_a_restart(worker):
  command, out_dir = worker
  with socket.socket() as first, socket.socket() as second:
    first.bind(("localhost", 0))
    second.bind(("localhost", 0))
    ports = [first.getsockname()[1], second.getsockname()[1]]
  result = run_launcher(launcher_command(
      "--num_workers=2", f"--ports={ports[0]},{ports[1]}", "--max_restarts=1")
                        + command + ["3", "worker=1", "at=1", "exit=3"])
  assert result.returncode == 0, result.stdout + result.stderr
  records = starts(out_dir)
  assert len(records) == 4
  for record in records:
    assert record["tf_config"]["cluster"]["worker"] == [
        f"localhost:{port}" for port in ports]


def test_launcher_survives_its_watchdog_dying(worker):
  command, out_dir = worker
  launcher = start_launcher(launcher_command("--num_workers=2") + command +
                            ["1000", "step_seconds=0.05"])
  assert wait_until(lambda: len(starts(out_dir)) == 2)
  watchdog = next(child for child in psutil.Process(launcher.pid).children()
                  if "launch.processes" in child.cmdline())
  watchdog.kill()
  launcher.send_signal(signal.SIGINT)
  output, _ = launcher.communicate(timeout=30)
  assert launcher.returncode == 130, output
  assert "the watchdog process died" in output
  assert "Traceback" not in output
  assert all(is_gone(record["pid"]) for record in starts(out_dir))
