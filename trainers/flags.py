"""The flags every trainer shares, defined once, and the entry-point plumbing.

Only entry points import this module (it defines absl flags on import). They
call `run(train)`: absl parses argv (including `--flagfile`), `config_from_flags`
builds one frozen `TrainConfig`, and `train(config)` runs. Outcomes map to the
exit codes in WORKSPACE.md: 0 done, 42 preempted (checkpoint saved), 1 a user
error printed as one line on stderr, no traceback.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import traceback

from absl import app
from absl import flags

from trainers import config as config_lib

flags.DEFINE_string("data_dir", None, "Dataset dir written by "
                    "pipeline.make_tfrecords (shards + dataset_info.json).")
flags.DEFINE_string("model_dir", None, "Where checkpoints, TensorBoard events, "
                    "metrics.json and export/ go; gs:// works.")
flags.DEFINE_enum("strategy", "auto", ["auto", "default", "one_device",
                                       "mirrored", "multi_worker", "tpu"],
                  "auto: TPU if --tpu, MultiWorkerMirrored if TF_CONFIG has "
                  ">1 worker, Mirrored if >1 GPU, else the default strategy.")
flags.DEFINE_string("tpu", None, "Cloud TPU name or grpc:// address; 'local' "
                    "on a TPU VM.")
flags.DEFINE_float("tpu_timeout", 60.0, "Seconds to wait for the TPU before "
                   "failing.", lower_bound=1.0)
flags.DEFINE_integer("num_cpu_devices", 0, "Split the CPU into this many "
                     "logical devices (to test Mirrored without GPUs).",
                     lower_bound=0)
flags.DEFINE_integer("batch_size", 128, "Global batch size (all replicas).",
                     lower_bound=1)
flags.DEFINE_integer("train_steps", 1000, "Total global steps to train.",
                     lower_bound=1)
flags.DEFINE_integer("steps_per_loop", 50, "Steps run inside one tf.function "
                     "call (the host loop TPUs need).", lower_bound=1)
flags.DEFINE_integer("checkpoint_every", 500, "Save every N steps (0: only at "
                     "the end).", lower_bound=0)
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints to keep.",
                     lower_bound=1)
flags.DEFINE_integer("eval_every", 0, "Evaluate every N steps (0: only at the "
                     "end).", lower_bound=0)
flags.DEFINE_integer("log_every", 100, "Progress line and TensorBoard train "
                     "scalars every N steps (checked after each "
                     "--steps_per_loop steps, so at least that far apart).",
                     lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.",
                   lower_bound=0.0)
flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine"],
                  "cosine: decays to 0 over --train_steps after warmup.")
flags.DEFINE_integer("warmup_steps", 0, "Linear warmup steps (cosine only).",
                     lower_bound=0)
flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd"], "Optimizer.")
flags.DEFINE_integer("seed", 0, "Seed for weights and the input order.")
flags.DEFINE_bool("deterministic", False, "Deterministic ops: a restarted run "
                  "ends with the same weights as an uninterrupted one.")
flags.DEFINE_enum("mixed_precision", "none",
                  ["none", "mixed_bfloat16", "mixed_float16"],
                  "Keras dtype policy (bfloat16 for TPUs).")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step (slower "
                  "on CPU; TPUs always compile).")
flags.DEFINE_bool("augment", False, "Reader's training augmentation.")
flags.DEFINE_bool("cache", None, "Keep decoded examples in memory after the "
                  "first epoch; default: when the decoded train split takes "
                  "at most 256 MiB.")
flags.DEFINE_bool("skip_bad_records", False, "Skip corrupt records (counted "
                  "and logged) instead of stopping.")
flags.DEFINE_bool("export", True, "Write MODEL_DIR/export/ at the end.")
flags.DEFINE_bool("export_tflite", False, "Also write export/model.tflite.")
flags.DEFINE_enum("tflite_quantization", "none", ["none", "dynamic", "float16"],
                  "Post-training quantisation of the TFLite model.")
flags.DEFINE_enum("preset", None, ["smoke"], "smoke: a few small steps, so the "
                  "whole path runs in seconds; explicit flags still win.")
flags.mark_flags_as_required(["data_dir", "model_dir"])
flags.register_multi_flags_validator(
    ["lr_schedule", "warmup_steps"],
    lambda values: values["warmup_steps"] == 0 or
    values["lr_schedule"] == "cosine",
    message="--warmup_steps needs --lr_schedule=cosine")

FLAGS = flags.FLAGS

# Values --preset=smoke gives to flags the user did not set.
SMOKE_PRESET = dict(batch_size=32, train_steps=40, steps_per_loop=5,
                    checkpoint_every=20, eval_every=20, log_every=10)


def flag_value(name: str):
  """The flag's value, or the preset's when the flag was not given."""
  if FLAGS.preset == "smoke" and not FLAGS[name].present \
      and name in SMOKE_PRESET:
    return SMOKE_PRESET[name]
  return FLAGS[name].value


def parse_image_size(text: str | None) -> tuple | None:
  """'32' or '32,48' -> (32, 32) or (32, 48); None or '' -> None."""
  if not text:
    return None
  parts = re.split(r"[x,]", text)  # 64,48 or 64x48, as the converter takes
  try:
    size = tuple(int(part) for part in parts)
  except ValueError:
    size = ()
  if len(size) == 1:
    size = size * 2
  if len(size) != 2 or min(size) < 1:
    raise config_lib.UserError(
        f"--image_size={text}: expected SIZE or HEIGHTxWIDTH, positive ints")
  return size


def config_from_flags(**overrides) -> config_lib.TrainConfig:
  """The one place flags are read; entry points add their own via overrides."""
  names = [field.name for field in dataclasses.fields(config_lib.TrainConfig)]
  values = {name: flag_value(name) for name in names if name in FLAGS}
  if values["mixed_precision"] == "none":
    values["mixed_precision"] = None
  values.update(overrides)
  return config_lib.TrainConfig(**values)


def _parse_flags(argv):
  """absl's parse, with a bad flag reported as one line and exit code 1."""
  try:
    return FLAGS(argv)
  except flags.Error as error:
    sys.stderr.write(f"{os.path.basename(argv[0])}: error: {error}\n")
    sys.exit(1)


def _describe_data_error(error: Exception) -> str | None:
  from pipeline import dataset  # pylint: disable=g-import-not-at-top (TF)
  return dataset.describe_data_error(error, skip_option="--skip_bad_records",
                                     data_dir=FLAGS.data_dir)


def run(main) -> None:
  """Runs `main(argv)` under absl with the trainers' exit-code contract."""

  def guarded_main(argv):
    if len(argv) > 1:
      sys.stderr.write(f"error: unexpected arguments {argv[1:]}\n")
      sys.exit(1)
    try:
      main(argv)
    except config_lib.UserError as error:
      sys.stderr.write(f"error: {error}\n")
      sys.exit(1)
    except config_lib.Preempted as preempted:
      sys.stderr.write(f"preempted: {preempted}\n")
      sys.exit(config_lib.PREEMPTED_EXIT_CODE)
    except config_lib.Interrupted as interrupted:
      sys.stderr.write(f"interrupted: {interrupted}\n")
      sys.exit(config_lib.INTERRUPTED_EXIT_CODE)
    except Exception as error:  # pylint: disable=broad-except
      bad_data = _describe_data_error(error)
      if bad_data:  # a restart would read the same bytes: exit 1, no retry
        sys.stderr.write(f"error: bad data: {bad_data}\n")
        sys.exit(1)
      # A crash (a lost peer, a full disk): Python would exit 1, which means
      # "user error, do not retry" to the launchers; this one is retryable.
      traceback.print_exc()
      sys.exit(config_lib.CRASH_EXIT_CODE)

  app.run(guarded_main, flags_parser=_parse_flags)
