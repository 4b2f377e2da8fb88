"""The trainer's settings as one frozen dataclass.

The entry points (`trainers/cnn.py`, `trainers/mlp.py`) turn their absl flags
into a `TrainConfig` once (`trainers/flags.py`); everything below them takes
this plain object, so the library can be driven from tests and benchmarks
without flags.
"""

from __future__ import annotations

import dataclasses


class UserError(Exception):
  """A bad input the user can fix; the entry points print it as one line
  and exit with code 1."""


PREEMPTED_EXIT_CODE = 42  # WORKSPACE.md: SIGTERM -> saved, run again
CRASH_EXIT_CODE = 3  # anything unexpected: launchers restart it


class Preempted(Exception):
  """SIGTERM arrived and a checkpoint was saved at the current step."""


INTERRUPTED_EXIT_CODE = 130  # the shell's code for a Ctrl-C


class Interrupted(Exception):
  """Ctrl-C arrived and a checkpoint was saved at the current step."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What one training run does. Steps are global steps (one global batch)."""
  data_dir: str
  model_dir: str
  strategy: str = "auto"  # auto|default|one_device|mirrored|multi_worker|tpu
  tpu: str | None = None  # Cloud TPU name, grpc:// address, or "local"
  tpu_timeout: float = 60.0  # seconds to reach the TPU before failing
  num_cpu_devices: int = 0  # >1 splits the CPU into logical devices (tests)
  batch_size: int = 128  # global: summed over all replicas
  train_steps: int = 1000
  steps_per_loop: int = 50  # steps inside one tf.function call
  checkpoint_every: int = 500  # 0: only at the end
  keep_checkpoints: int = 3
  eval_every: int = 0  # 0: only at the end
  log_every: int = 100
  learning_rate: float = 1e-3
  lr_schedule: str = "constant"  # constant|cosine
  warmup_steps: int = 0
  optimizer: str = "adam"  # adam|sgd
  seed: int = 0
  deterministic: bool = False
  mixed_precision: str | None = None  # None, "mixed_bfloat16", "mixed_float16"
  jit_compile: bool = False
  image_size: tuple | None = None  # (height, width) to resize images to
  augment: bool = False
  cache: bool | None = None  # None: when the decoded train split is small
  skip_bad_records: bool = False
  export: bool = True
  export_tflite: bool = False
  tflite_quantization: str = "none"  # none|dynamic|float16
