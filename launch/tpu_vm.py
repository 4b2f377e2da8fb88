"""Runs a trainer on a Cloud TPU VM (one host or a pod slice) through gcloud.

    python -m launch.tpu_vm --name=my-tpu --zone=us-central2-b \\
        --accelerator_type=v4-8 --spot --delete -- \\
        python3 -m trainers.cnn --data_dir=gs://B/data --model_dir=gs://B/run

Steps, each a `gcloud compute tpus tpu-vm` command printed as it runs
(`--dry_run` prints them and runs none):
  1. `gcloud auth list`: fail early when nobody is logged in;
  2. `describe`: create the TPU VM if absent, wait until READY;
  3. `scp` a tarball of this project to every host, `ssh --worker=all` to
     unpack and `pip install` it;
  4. `ssh --worker=all --command="... trainer --tpu=local"`, streaming logs
     (with --pod, a multi-host TF slice: only worker 0 runs the trainer, with
     --tpu=NAME, and reaches the other hosts' TPUs through the -pod runtime,
     as the Cloud TPU TensorFlow pod guide does);
  5. when the run ends non-zero, `describe` again: PREEMPTED/TERMINATED means
     the VM is gone (spot/preemptible): delete, recreate, reinstall, re-run;
     a READY VM with exit 42 (the trainer checkpointed on SIGTERM) is re-run
     as is. Either way the trainer resumes from its gs:// checkpoint, and
     neither counts against --max_restarts; other crashes do; exit 1 (a user
     error) stops;
  6. `delete` the VM if --delete.
Data and model dirs must be gs:// paths: the checkpoint has to outlive the VM.
On Ctrl-C the trainers get SIGTERM (they checkpoint), and we say what is
still running.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

from absl import app
from absl import flags

from launch import processes

PREEMPTED = 42
USER_ERROR = 1
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the hosts need to `pip install` the project.
PROJECT_FILES = ("pipeline", "trainers", "launch", "bench", "setup.cfg",
                 "pyproject.toml", "README.md")
GONE_STATES = ("PREEMPTED", "TERMINATED")  # the VM will not come back
PASSING_STATES = ("CREATING", "STARTING", "RESTARTING", "REPAIRING",
                  "REIMAGING", "STOPPING", "DELETING", "UNHIDING")

_NAME = flags.DEFINE_string("name", None, "TPU VM name.")
_ZONE = flags.DEFINE_string("zone", None, "Zone, e.g. us-central2-b.")
_PROJECT = flags.DEFINE_string("project", None, "GCP project; default: "
                               "gcloud's configured one.")
_ACCELERATOR_TYPE = flags.DEFINE_string("accelerator_type", "v4-8",
                                        "e.g. v4-8 (one host), v4-32 (pod).")
_VERSION = flags.DEFINE_string(
    "version", "tpu-vm-tf-2.16.1-pjrt",
    "TPU software version; pod slices need the -pod- variant, e.g. "
    "tpu-vm-tf-2.16.1-pod-pjrt.")
_SPOT = flags.DEFINE_bool("spot", False, "Create a Spot TPU VM (cheaper, "
                          "preemptible).")
_POD = flags.DEFINE_bool(
    "pod", False, "A multi-host slice (e.g. v4-32): run the trainer on worker "
    "0 with --tpu=NAME; needs a -pod- --version.")
_DELETE = flags.DEFINE_bool("delete", False,
                            "Delete the TPU VM when the run ends.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "Print every gcloud command; run none.")
_MAX_RESTARTS = flags.DEFINE_integer(
    "max_restarts", 0, "Re-runs after crashes (preemptions are free).")
_MAX_PREEMPTIONS = flags.DEFINE_integer(
    "max_preemptions", 20, "Re-runs after preemptions, a safety cap.")
_REMOTE_DIR = flags.DEFINE_string(
    "remote_dir", "tfrecord-pipeline", "Project dir on the hosts, under ~.")
_POLL_SECONDS = flags.DEFINE_float("poll_seconds", 20.0,
                                   "Between `describe`s while waiting.")
_READY_TIMEOUT_SECONDS = flags.DEFINE_float(
    "ready_timeout_seconds", 3600.0, "Give up waiting for READY after this.")
_GRACE_SECONDS = flags.DEFINE_float(
    "grace_seconds", 60.0, "On Ctrl-C, how long trainers get to checkpoint.")


class LaunchError(Exception):
  """Reported as one line; the message says what is left running."""


@dataclasses.dataclass(frozen=True)
class TpuConfig:
  name: str
  zone: str
  project: str | None
  accelerator_type: str
  version: str
  spot: bool
  pod: bool
  delete: bool
  dry_run: bool
  max_restarts: int
  max_preemptions: int
  remote_dir: str
  poll_seconds: float
  ready_timeout_seconds: float
  grace_seconds: float


class Gcloud:
  """Runs (or, in a dry run, prints and plays) `gcloud` commands.

  The dry run goes through the same code as a real run, with gcloud's answers
  played for a VM that does not exist yet: so what it prints is what a first
  real run would do.
  """

  def __init__(self, config: TpuConfig):
    self.config = config
    self._dry_run_state = "NOT_FOUND"

  def command(self, *args) -> list:
    command = ["gcloud", *args]
    if args[:2] == ("compute", "tpus"):
      command.append(f"--zone={self.config.zone}")
      if self.config.project:
        command.append(f"--project={self.config.project}")
    return command

  def run(self, *args, check_error: str | None = None
          ) -> subprocess.CompletedProcess:
    """Runs to completion, output captured; check_error: raise on failure."""
    command = self.command(*args)
    processes.say("+ " + shlex.join(command))
    if self.config.dry_run:
      return self._play(args)
    result = subprocess.run(command, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0 and check_error:
      raise LaunchError(f"{check_error}: {gcloud_error(result.stderr)}")
    return result

  def stream(self, *args, watchdog: processes.Watchdog):
    """Starts a long command whose output streams to ours, prefixed."""
    command = self.command(*args)
    processes.say("+ " + shlex.join(command))
    if self.config.dry_run:
      return None
    return processes.start(command, name=self.config.name, env=dict(os.environ),
                           watchdog=watchdog)

  def _play(self, args) -> subprocess.CompletedProcess:
    output = ""
    if args[:2] == ("auth", "list"):
      output = "(dry run)\n"
    elif "create" in args:
      self._dry_run_state = "READY"
    elif "describe" in args:
      if self._dry_run_state == "NOT_FOUND":
        return subprocess.CompletedProcess(args, 1, "", "NOT_FOUND")
      output = self._dry_run_state + "\n"
    return subprocess.CompletedProcess(args, 0, output, "")


def gcloud_error(stderr: str) -> str:
  """gcloud's own one-line reason, e.g. `INVALID_ARGUMENT: ...`."""
  lines = [line.strip() for line in stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("ERROR:")]
  line = (errors or lines or ["(no message)"])[-1]
  # "ERROR: (gcloud.compute.tpus.tpu-vm.create) INVALID_ARGUMENT: ..." ->
  # "INVALID_ARGUMENT: ..."
  if line.startswith("ERROR: (gcloud."):
    line = line.split(") ", 1)[-1]
  return line


def check_trainer_command(command: list, tpu_flag: str) -> list:
  """The command with tpu_flag (--tpu=...); gs:// data and model dirs required."""
  if not command:
    raise LaunchError("no command: put the trainer after `--`, e.g. "
                      "`-- python3 -m trainers.cnn --data_dir=gs://...`")
  values = dict(arg[2:].split("=", 1) for arg in command
                if arg.startswith("--") and "=" in arg)
  for flag in ("data_dir", "model_dir"):
    if not values.get(flag, "").startswith("gs://"):
      raise LaunchError(f"the trainer needs --{flag}=gs://...: the TPU hosts "
                        "cannot see local paths, and checkpoints must outlive "
                        "a preempted VM")
  if "tpu" in values or "--tpu" in command:
    return list(command)
  return [*command, tpu_flag]


def check_gcloud(gcloud: Gcloud) -> None:
  if not gcloud.config.dry_run and shutil.which("gcloud") is None:
    raise LaunchError("gcloud not found on PATH: install the Google Cloud "
                      "CLI (https://cloud.google.com/sdk/docs/install)")
  accounts = gcloud.run("auth", "list", "--filter=status:ACTIVE",
                        "--format=value(account)",
                        check_error="gcloud auth list failed").stdout
  if not accounts.strip():
    raise LaunchError("gcloud is not logged in: run `gcloud auth login`")


def tpu(*args) -> tuple:
  return ("compute", "tpus", "tpu-vm", *args)


def state_of(gcloud: Gcloud) -> str:
  """READY, PREEMPTED, ... or NOT_FOUND."""
  result = gcloud.run(*tpu("describe", gcloud.config.name,
                           "--format=value(state)"))
  if result.returncode != 0:
    if "NOT_FOUND" in result.stderr:
      return "NOT_FOUND"
    raise LaunchError(f"cannot describe TPU VM {gcloud.config.name}: "
                      f"{gcloud_error(result.stderr)}")
  return result.stdout.strip()


def create(gcloud: Gcloud) -> None:
  config = gcloud.config
  processes.say(f"launch.tpu_vm: creating TPU VM {config.name} "
                f"({config.accelerator_type}) in {config.zone}")
  result = gcloud.run(*tpu(
      "create", config.name, f"--accelerator-type={config.accelerator_type}",
      f"--version={config.version}", *(["--spot"] if config.spot else [])))
  if result.returncode != 0:
    reason = gcloud_error(result.stderr)
    state = state_of(gcloud)
    left = ("nothing was created" if state == "NOT_FOUND" else
            f"{config.name} exists in state {state}; "
            f"delete it with `{delete_command(gcloud)}`")
    raise LaunchError(f"gcloud refused to create TPU VM {config.name}: "
                      f"{reason} ({left})")


def delete_command(gcloud: Gcloud) -> str:
  return shlex.join(gcloud.command(*tpu("delete", gcloud.config.name,
                                        "--quiet")))


def make_ready(gcloud: Gcloud) -> bool:
  """Waits for READY, creating or recreating the VM; True if it is new."""
  config = gcloud.config
  deadline = time.monotonic() + config.ready_timeout_seconds
  is_new = False
  while True:
    state = state_of(gcloud)
    if state == "READY":
      return is_new
    if state == "NOT_FOUND":
      create(gcloud)
      is_new = True
      continue
    if state in GONE_STATES:
      processes.say(f"launch.tpu_vm: {config.name} is {state}; deleting and "
                    "recreating it")
      gcloud.run(*tpu("delete", config.name, "--quiet"),
                 check_error=f"cannot delete {state} TPU VM {config.name}")
      continue
    if state == "STOPPED":
      gcloud.run(*tpu("start", config.name),
                 check_error=f"cannot start TPU VM {config.name}")
      continue
    if state not in PASSING_STATES:
      raise LaunchError(f"TPU VM {config.name} is in state {state}, which "
                        f"this launcher does not handle; it is left as is")
    if time.monotonic() > deadline:
      raise LaunchError(f"TPU VM {config.name} still {state} after "
                        f"{config.ready_timeout_seconds:g}s; it is left as is")
    processes.say(f"launch.tpu_vm: {config.name} is {state}, waiting")
    time.sleep(config.poll_seconds)


def make_project_tarball(directory: str) -> str:
  path = os.path.join(directory, "project.tar.gz")

  def skip_caches(info):
    return None if "__pycache__" in info.name else info

  with tarfile.open(path, "w:gz") as tar:
    for name in PROJECT_FILES:
      if os.path.exists(os.path.join(PROJECT_ROOT, name)):
        tar.add(os.path.join(PROJECT_ROOT, name), arcname=name,
                filter=skip_caches)
  return path


def install(gcloud: Gcloud) -> None:
  """Copies this project to every host and pip-installs it there."""
  config = gcloud.config
  remote = config.remote_dir
  with tempfile.TemporaryDirectory() as directory:
    tarball = make_project_tarball(directory)
    gcloud.run(*tpu("scp", tarball, f"{config.name}:{remote}.tar.gz",
                    "--worker=all"),
               check_error=f"cannot copy the project to {config.name}")
  unpack = (f"rm -rf ~/{remote} && mkdir -p ~/{remote} && "
            f"tar -xzf ~/{remote}.tar.gz -C ~/{remote} && cd ~/{remote} && "
            "python3 -m pip install --quiet -e .")
  gcloud.run(*tpu("ssh", config.name, "--worker=all", f"--command={unpack}"),
             check_error=f"cannot install the project on {config.name}")


def remote_run_command(config: TpuConfig, command: list) -> str:
  """`exec` keeps the pid written to the pid file the trainer's own."""
  # On a pod, worker 0 drives the other hosts' TPUs remotely: it must not
  # grab its local TPU as a library (the Cloud TPU pod guide's setting).
  environment = "export TPU_LOAD_LIBRARY=0 && " if config.pod else ""
  return (f"cd ~/{config.remote_dir} && echo $$ > ~/{config.remote_dir}.pid "
          f"&& {environment}exec {shlex.join(command)}")


def stop_remote(gcloud: Gcloud) -> None:
  """SIGTERM to the trainers on every host: they checkpoint and exit 42."""
  pid_file = f"~/{gcloud.config.remote_dir}.pid"
  gcloud.run(*tpu("ssh", gcloud.config.name, "--worker=all",
                  f"--command=kill -TERM $(cat {pid_file}) 2>/dev/null; true"))


def run_once(gcloud: Gcloud, command: list,
             watchdog: processes.Watchdog) -> int:
  """One run on every host; the first failing host's exit code (gcloud's)."""
  config = gcloud.config
  workers = "--worker=0" if config.pod else "--worker=all"
  ssh = tpu("ssh", config.name, workers,
            f"--command={remote_run_command(config, command)}")
  child = None
  try:
    # Started inside the try: a Ctrl-C that lands while it starts still
    # stops the remote trainers (and supervise's watchdog the local ssh).
    child = gcloud.stream(*ssh, watchdog=watchdog)
    if child is None:  # dry run
      return 0
    child.popen.wait()
  except KeyboardInterrupt:
    processes.say("launch.tpu_vm: interrupted; asking the trainers to "
                  "checkpoint and stop")
    try:
      stop_remote(gcloud)
      if child is not None:
        processes.wait_all([child], time.monotonic() + config.grace_seconds)
    finally:
      if child is not None:
        processes.stop([child], watchdog, grace_seconds=2)
    raise
  processes.stop([child], watchdog, grace_seconds=0, send_sigterm=False)
  return child.popen.returncode


def supervise(gcloud: Gcloud, command: list) -> int:
  """Runs until done, a user error or no restarts/preemptions left."""
  watchdog = processes.Watchdog(grace_seconds=2)
  try:
    code = _run_until_done(gcloud, command, watchdog)
  except BaseException:
    # Whatever was started and not yet stopped (a Ctrl-C can land between
    # the two) is stopped by the watchdog.
    watchdog.close(stop_watched=True)
    raise
  watchdog.close()
  return code


def _run_until_done(gcloud: Gcloud, command: list,
                    watchdog: processes.Watchdog) -> int:
  config = gcloud.config
  restarts = preemptions = 0
  installed = False
  while True:
    if make_ready(gcloud) or not installed:
      install(gcloud)
      installed = True
    code = run_once(gcloud, command, watchdog)
    if code == 0:
      processes.say(f"launch.tpu_vm: training finished on {config.name}")
      return 0
    state = state_of(gcloud)
    processes.say(f"launch.tpu_vm: the run ended with exit code {code}; "
                  f"{config.name} is {state}")
    if state != "READY" or code == PREEMPTED:
      if preemptions == config.max_preemptions:
        raise LaunchError(f"gave up after {preemptions} preemptions")
      preemptions += 1
      installed = state == "READY"
      processes.say(f"launch.tpu_vm: preemption {preemptions}: re-running, "
                    "the trainer resumes from its checkpoint")
      continue
    if code == USER_ERROR:
      return USER_ERROR
    if restarts == config.max_restarts:
      processes.say(f"launch.tpu_vm: no restarts left "
                    f"(--max_restarts={config.max_restarts})")
      return code
    restarts += 1
    processes.say(f"launch.tpu_vm: restart {restarts} of "
                  f"{config.max_restarts}")


def raise_keyboard_interrupt(signum, frame):  # pylint: disable=unused-argument
  raise KeyboardInterrupt


def main(argv):
  try:
    if not _NAME.value or not _ZONE.value:
      raise LaunchError("--name and --zone are required")
    command = check_trainer_command(
        argv[1:], f"--tpu={_NAME.value}" if _POD.value else "--tpu=local")
    config = TpuConfig(
        name=_NAME.value, zone=_ZONE.value, project=_PROJECT.value,
        accelerator_type=_ACCELERATOR_TYPE.value, version=_VERSION.value,
        spot=_SPOT.value, pod=_POD.value, delete=_DELETE.value,
        dry_run=_DRY_RUN.value,
        max_restarts=_MAX_RESTARTS.value,
        max_preemptions=_MAX_PREEMPTIONS.value, remote_dir=_REMOTE_DIR.value,
        poll_seconds=_POLL_SECONDS.value,
        ready_timeout_seconds=_READY_TIMEOUT_SECONDS.value,
        grace_seconds=_GRACE_SECONDS.value)
    gcloud = Gcloud(config)
    check_gcloud(gcloud)
  except LaunchError as error:
    print(f"launch.tpu_vm: {error}", file=sys.stderr)
    return USER_ERROR

  signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
  code = USER_ERROR
  try:
    code = supervise(gcloud, command)
  except LaunchError as error:
    print(f"launch.tpu_vm: {error}", file=sys.stderr)
  except KeyboardInterrupt:
    code = 130
  try:
    clean_up(gcloud, delete=config.delete and code != 130)
  except LaunchError as error:
    print(f"launch.tpu_vm: {error}", file=sys.stderr)
    code = code or USER_ERROR
  return code


def clean_up(gcloud: Gcloud, delete: bool) -> None:
  """Deletes the VM, or says it is still there (nothing left untold)."""
  name = gcloud.config.name
  if delete:
    gcloud.run(*tpu("delete", name, "--quiet"),
               check_error=f"cannot delete TPU VM {name} (check with "
               f"`gcloud compute tpus tpu-vm list --zone={gcloud.config.zone}`)")
    processes.say(f"launch.tpu_vm: deleted {name}")
  elif not gcloud.config.dry_run and state_of(gcloud) != "NOT_FOUND":
    processes.say(f"launch.tpu_vm: TPU VM {name} is still there (and "
                  f"billed); delete it with `{delete_command(gcloud)}`")


if __name__ == "__main__":
  app.run(main)
