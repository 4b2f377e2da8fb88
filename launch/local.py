"""Runs N copies of a trainer on this machine as a tf.distribute cluster.

    python -m launch.local --num_workers=2 --max_restarts=3 -- \\
        python -m trainers.cnn --data_dir=DIR --model_dir=DIR --train_steps=N

Each worker gets its own TF_CONFIG for MultiWorkerMirroredStrategy, in the
all-"worker" form with worker 0 as the chief:
    {"cluster": {"worker": ["localhost:P0", "localhost:P1"]},
     "task": {"type": "worker", "index": i}}
(one worker: no TF_CONFIG, the trainer picks its single-machine strategy).
Ports are free ones found by binding port 0, or --ports.

Faults: when a worker exits non-zero, the launcher stops the others and
restarts the whole group, which resumes from the latest checkpoint:
- exit 42 (preempted, checkpoint saved): restart; does not count against
  --max_restarts (capped by --max_preemptions so a loop cannot spin forever);
- exit 1 (a user error): no restart, it would fail the same way;
- anything else, SIGKILL included: restart while --max_restarts allows.
Stopping is SIGTERM (trainers checkpoint and exit 42), then SIGKILL after
--grace_seconds; after a crash only --crash_grace_seconds, as MWMS survivors
of a dead peer wait in a collective and cannot checkpoint anyway.
The launcher exits with the first failing worker's code (128+N for signal N,
130 for Ctrl-C), and leaves no worker process or bound port behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags

from launch import processes

PREEMPTED = 42
USER_ERROR = 1
PORT_WAIT_SECONDS = 5.0  # for --ports to be released between attempts

_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "Worker processes.")
_MAX_RESTARTS = flags.DEFINE_integer(
    "max_restarts", 0, "Group restarts after crashes (preemptions are free).")
_MAX_PREEMPTIONS = flags.DEFINE_integer(
    "max_preemptions", 100, "Group restarts after exit 42, a safety cap.")
_PORTS = flags.DEFINE_list(
    "ports", None, "One localhost port per worker; default: free ones.")
_WORKER_LOG_DIR = flags.DEFINE_string(
    "worker_log_dir", None, "Also append each worker's log to WORKER_WORKER_LOG_DIR/worker-I.log.")
_GRACE_SECONDS = flags.DEFINE_float(
    "grace_seconds", 10.0,
    "After SIGTERM, how long workers get to checkpoint before SIGKILL.")
_CRASH_GRACE_SECONDS = flags.DEFINE_float(
    "crash_grace_seconds", 1.0,
    "The same after a worker crashed: short, because under "
    "MultiWorkerMirrored the others cannot checkpoint without it and just "
    "wait in a collective.")


class UsageError(Exception):
  """A bad command line: reported as one line, exit 1."""


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
  num_workers: int
  max_restarts: int
  max_preemptions: int
  ports: tuple | None  # None: pick free ports for every attempt
  log_dir: str | None
  grace_seconds: float
  crash_grace_seconds: float


@dataclasses.dataclass(frozen=True)
class Outcome:
  returncode: int  # Popen style: -N for signal N
  worker: int | None  # the first worker that failed; None: all done / stopped
  stopped_by: int | None = None  # the signal that stopped the launcher


def free_ports(count: int) -> tuple:
  """Ports the kernel says are free now (all bound at once, so distinct).

  They are released before the workers bind them; another program could take
  one in between, which shows up as a worker failing to start (a crash, so
  the restart picks new ports).
  """
  sockets = [socket.socket() for _ in range(count)]
  try:
    for sock in sockets:
      sock.bind(("localhost", 0))
    return tuple(sock.getsockname()[1] for sock in sockets)
  finally:
    for sock in sockets:
      sock.close()


def check_ports_free(ports) -> None:
  for port in ports:
    with socket.socket() as sock:
      # SO_REUSEADDR as gRPC sets it: a port in TIME_WAIT is usable, one
      # with a listener is not.
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        sock.bind(("localhost", port))
      except OSError:
        raise UsageError(f"port {port} is already in use; pick another or "
                         "leave out --ports to use free ones") from None


def wait_for_ports(ports, seconds: float) -> None:
  """Before a restart on --ports: the stopped workers' ports, once free."""
  deadline = time.monotonic() + seconds
  while True:
    try:
      return check_ports_free(ports)
    except UsageError:
      if time.monotonic() > deadline:
        raise
    time.sleep(processes.POLL_SECONDS)


def tf_config(ports, index: int) -> str:
  return json.dumps({
      "cluster": {"worker": [f"localhost:{port}" for port in ports]},
      "task": {"type": "worker", "index": index},
  })


def check_command(command: list) -> None:
  """Fails fast on a missing program or `python -m` module, before any start."""
  if not command:
    raise UsageError("no command: put the trainer after `--`, e.g. "
                     "`-- python -m trainers.cnn --data_dir=...`")
  program = shutil.which(command[0])
  if program is None:
    raise UsageError(f"command not found: {command[0]}")
  if len(command) >= 3 and command[1] == "-m":
    module = command[2]
    # Asked of the workers' own interpreter, from the workers' cwd and env.
    probe = ("import importlib.util, sys\n"
             "try: found = importlib.util.find_spec(sys.argv[1]) is not None\n"
             "except ImportError: found = False\n"
             "sys.exit(0 if found else 3)")
    result = subprocess.run([program, "-c", probe, module],
                            capture_output=True, check=False)
    if result.returncode != 0:
      raise UsageError(f"no module named {module} for {command[0]} "
                       "(run from the project root, or install the project)")


class _Signals:
  """Turns SIGINT/SIGTERM/SIGHUP into a flag the supervision loop reads."""

  def __init__(self):
    self.received = []
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
      signal.signal(signum, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received.append(signum)

  @property
  def first(self) -> int | None:
    return self.received[0] if self.received else None

  def hurry(self) -> bool:
    """A second signal (Ctrl-C twice): skip the grace period."""
    return len(self.received) > 1


def run_group(command: list, config: LaunchConfig, attempt: int,
              watchdog: processes.Watchdog, signals: _Signals) -> Outcome:
  """One attempt: start every worker, wait for all to finish or one to fail."""
  ports = config.ports or free_ports(config.num_workers)
  if config.ports and attempt > 0:
    wait_for_ports(ports, PORT_WAIT_SECONDS)
  processes.say(f"launch.local: attempt {attempt}: {config.num_workers} "
                f"worker(s) on ports {','.join(map(str, ports))}")
  children = []
  for index in range(config.num_workers):
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # logs arrive as they happen
    env.pop("TF_CONFIG", None)  # the cluster is ours to describe, not inherited
    if config.num_workers > 1:
      env["TF_CONFIG"] = tf_config(ports, index)
    log_path = (os.path.join(config.log_dir, f"worker-{index}.log")
                if config.log_dir else None)
    children.append(processes.start(
        command, name=f"worker {index}", env=env, watchdog=watchdog,
        log_path=log_path))

  failed = None
  while signals.first is None and failed is None:
    returncodes = [child.popen.poll() for child in children]
    if all(code == 0 for code in returncodes):
      break
    failed = next((index for index, code in enumerate(returncodes)
                   if code not in (None, 0)), None)
    time.sleep(processes.POLL_SECONDS)

  if signals.first is not None:
    processes.say(f"launch.local: got {signal.Signals(signals.first).name}, "
                  "stopping the workers (SIGTERM, then SIGKILL after "
                  f"{config.grace_seconds:g}s)")
    processes.stop(children, watchdog, config.grace_seconds,
                   hurry=signals.hurry)
    codes = [child.popen.returncode for child in children]
    # Workers that checkpointed on our SIGTERM say so with 42; pass that on.
    returncode = (PREEMPTED if PREEMPTED in codes
                  else -signals.first)
    return Outcome(returncode, None, stopped_by=signals.first)
  if failed is None:
    processes.stop(children, watchdog, 0, send_sigterm=False)
    return Outcome(0, None)

  returncode = children[failed].popen.returncode
  processes.say(f"launch.local: worker {failed} failed "
                f"({processes.describe_exit(returncode)}); stopping the others")
  grace_seconds = config.crash_grace_seconds
  if returncode == PREEMPTED:
    # The others are likely saving the same coordinated checkpoint: let them
    # finish on their own before we send anything.
    processes.wait_all(children, time.monotonic() + config.grace_seconds,
                       signals.hurry)
    grace_seconds = config.grace_seconds
  processes.stop(children, watchdog, grace_seconds, hurry=signals.hurry)
  return Outcome(returncode, failed)


def supervise(command: list, config: LaunchConfig) -> int:
  """Runs attempts until success, a user error, Ctrl-C or no restarts left."""
  signals = _Signals()
  watchdog = processes.Watchdog(config.grace_seconds)
  restarts = preemptions = 0
  try:
    for attempt in range(config.max_restarts + config.max_preemptions + 1):
      try:
        outcome = run_group(command, config, attempt, watchdog, signals)
      except UsageError as error:  # a --ports port taken between attempts
        print(f"launch.local: {error}", file=sys.stderr)
        return USER_ERROR
      code = outcome.returncode
      if outcome.stopped_by is not None or code in (0, USER_ERROR):
        break
      if code == PREEMPTED:
        if preemptions == config.max_preemptions:
          break
        preemptions += 1
        why = f"preemption {preemptions} (not counted as a restart)"
      else:
        if restarts == config.max_restarts:
          processes.say(f"launch.local: no restarts left "
                        f"(--max_restarts={config.max_restarts})")
          break
        restarts += 1
        why = f"restart {restarts} of {config.max_restarts}"
      processes.say(f"launch.local: restarting all workers, {why}; they "
                    "resume from the latest checkpoint")
  finally:
    watchdog.close()
  if outcome.stopped_by == signal.SIGINT:
    code = 130
  processes.say(f"launch.local: done, exit code {processes.exit_code(code)}")
  return processes.exit_code(code)


def main(argv):
  command = argv[1:]
  try:
    if _NUM_WORKERS.value < 1:
      raise UsageError("--num_workers must be at least 1")
    if _MAX_RESTARTS.value < 0 or _MAX_PREEMPTIONS.value < 0:
      raise UsageError("--max_restarts and --max_preemptions must be >= 0")
    ports = None
    if _PORTS.value:
      try:
        ports = tuple(int(port) for port in _PORTS.value)
      except ValueError:
        raise UsageError(f"--ports must be numbers, got {_PORTS.value}") from None
      if len(ports) != _NUM_WORKERS.value:
        raise UsageError(f"--ports lists {len(ports)} ports for "
                         f"--num_workers={_NUM_WORKERS.value}")
      check_ports_free(ports)
    check_command(command)
    if _WORKER_LOG_DIR.value:
      os.makedirs(_WORKER_LOG_DIR.value, exist_ok=True)
  except UsageError as error:
    print(f"launch.local: {error}", file=sys.stderr)
    return USER_ERROR
  config = LaunchConfig(
      num_workers=_NUM_WORKERS.value, max_restarts=_MAX_RESTARTS.value,
      max_preemptions=_MAX_PREEMPTIONS.value, ports=ports,
      log_dir=_WORKER_LOG_DIR.value, grace_seconds=_GRACE_SECONDS.value,
      crash_grace_seconds=_CRASH_GRACE_SECONDS.value)
  return supervise(command, config)


if __name__ == "__main__":
  app.run(main)
