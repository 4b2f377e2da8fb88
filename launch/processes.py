"""Child processes that cannot outlive the launcher, with prefixed logs.

Both launchers start long-running children (trainer workers locally,
`gcloud ... ssh` streams for TPU VMs) and must leave nothing behind: not on a
child's crash, not on Ctrl-C, not when the launcher itself is SIGKILLed.

- Each child runs in its own session, hence its own process group, so a stop
  reaches everything it spawned and a Ctrl-C in the terminal reaches only the
  launcher, which then stops the children in order (SIGTERM so trainers can
  checkpoint, SIGKILL after a grace period).
- A watchdog process (`python -m launch.processes GRACE`, in its own session)
  holds the read end of a pipe from the launcher and is told each child's
  group as it starts and ends. If the launcher dies, even by SIGKILL, the pipe
  reaches EOF and the watchdog stops the groups still running. Unlike
  PR_SET_PDEATHSIG it also reaches grandchildren, and it needs no preexec_fn
  (unsafe once the log threads run).
- One thread per child copies its merged stdout/stderr line by line to our
  stdout with a prefix (`[worker 1] ...`), and to a log file if asked.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

POLL_SECONDS = 0.05
_output_lock = threading.Lock()


def exit_code(returncode: int) -> int:
  """Popen's -N (killed by signal N) as the shell's 128+N; others unchanged."""
  return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
  if returncode < 0:
    return f"killed by {signal.Signals(-returncode).name}"
  return f"exit code {returncode}"


def say(line: str) -> None:
  """One launcher line on stdout, never torn by the children's log lines."""
  with _output_lock:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclasses.dataclass
class Child:
  name: str
  popen: subprocess.Popen
  log_thread: threading.Thread

  @property
  def pid(self) -> int:
    return self.popen.pid


def _copy_lines(stream, prefix: bytes, log_path: str | None) -> None:
  log_file = open(log_path, "ab") if log_path else None
  try:
    for line in iter(stream.readline, b""):
      with _output_lock:
        sys.stdout.buffer.write(prefix + line)
        sys.stdout.buffer.flush()
      if log_file:
        log_file.write(line)
        log_file.flush()
  finally:
    stream.close()
    if log_file:
      log_file.close()


class Watchdog:
  """Stops the children's process groups if this process dies first."""

  def __init__(self, grace_seconds: float):
    self._process = subprocess.Popen(
        [sys.executable, "-m", "launch.processes", str(grace_seconds)],
        stdin=subprocess.PIPE, start_new_session=True,
        env=_with_project_on_path(os.environ))
    self._listening = True

  def _tell(self, line: str) -> None:
    if not self._listening:
      return
    try:
      self._process.stdin.write(line.encode() + b"\n")
      self._process.stdin.flush()
    except BrokenPipeError:  # someone killed it; our own stops still work
      self._listening = False
      say("launch: the watchdog process died; if this launcher is killed "
          "now, its workers may outlive it")

  def watch(self, pgid: int) -> None:
    self._tell(f"+{pgid}")

  def forget(self, pgid: int) -> None:
    self._tell(f"-{pgid}")

  def close(self, stop_watched: bool = False) -> None:
    """Normal exit: every group was stopped already, so nothing to kill.

    stop_watched: leaving on an exception (a Ctrl-C between starting a child
    and the code that would stop it): the watchdog stops the groups still
    listed, as if this process had died.
    """
    if not stop_watched:
      self._tell("done")
    try:
      self._process.stdin.close()
    except BrokenPipeError:
      pass
    self._process.wait()


def _with_project_on_path(environ) -> dict:
  """The watchdog imports this module, whatever the launcher's cwd was."""
  project_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [project_root] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def start(command: list, *, name: str, env: dict, watchdog: Watchdog,
          log_path: str | None = None) -> Child:
  """Starts `command` in a new session; its output is prefixed `[name] `."""
  popen = subprocess.Popen(
      command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, start_new_session=True)
  watchdog.watch(popen.pid)  # the session leader's pid is its group id
  log_thread = threading.Thread(
      target=_copy_lines, args=(popen.stdout, f"[{name}] ".encode(), log_path),
      daemon=True)
  log_thread.start()
  return Child(name, popen, log_thread)


def _signal_group(child: Child, signum: int) -> None:
  try:
    os.killpg(child.pid, signum)
  except (ProcessLookupError, PermissionError):
    pass  # the group is gone already


def wait_all(children: list, deadline: float,
             stop_early=lambda: False) -> None:
  """Waits until every child has exited, the deadline passes or stop_early()."""
  while time.monotonic() < deadline and not stop_early():
    if all(child.popen.poll() is not None for child in children):
      return
    time.sleep(POLL_SECONDS)


def stop(children: list, watchdog: Watchdog, grace_seconds: float,
         send_sigterm: bool = True, hurry=lambda: False) -> None:
  """SIGTERM every group, SIGKILL what is left after grace_seconds, reap.

  hurry(): a callable that turns true (a second Ctrl-C) to skip the grace.
  """
  if send_sigterm:
    for child in children:
      if child.popen.poll() is None:
        _signal_group(child, signal.SIGTERM)
  wait_all(children, time.monotonic() + grace_seconds, hurry)
  for child in children:
    # Also after the leader exited: its group may hold grandchildren. The pid
    # is not reused before we reap it below... unless poll() reaped it
    # already, a window of seconds on a machine with 32k pids: accepted.
    _signal_group(child, signal.SIGKILL)
  for child in children:
    child.popen.wait()
    child.log_thread.join(timeout=5)
    watchdog.forget(child.pid)


def _watch(grace_seconds: float) -> None:
  """Watchdog main: on EOF without "done", stop the groups still listed."""
  groups = set()
  for line in sys.stdin:
    line = line.strip()
    if line == "done":
      return
    if line.startswith("+"):
      groups.add(int(line[1:]))
    elif line.startswith("-"):
      groups.discard(int(line[1:]))
  # The launcher died without cleaning up: SIGTERM (trainers checkpoint and
  # exit 42), then SIGKILL whatever is left.
  for signum in (signal.SIGTERM, signal.SIGKILL):
    for pgid in groups:
      try:
        os.killpg(pgid, signum)
      except (ProcessLookupError, PermissionError):
        pass
    if signum == signal.SIGTERM:
      deadline = time.monotonic() + grace_seconds
      while time.monotonic() < deadline and any(map(_group_alive, groups)):
        time.sleep(POLL_SECONDS)


def _group_alive(pgid: int) -> bool:
  try:
    os.killpg(pgid, 0)
    return True
  except (ProcessLookupError, PermissionError):
    return False


if __name__ == "__main__":
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's job
  _watch(float(sys.argv[1]))
