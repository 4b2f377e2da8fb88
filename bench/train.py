"""Trainer throughput: our loop from TFRecords, from memory, and Keras `fit`.

  python -m bench.train                  # demo shapes, 32x32, batch 128
  python -m bench.train --filters=32,64 --repeats=7

Writes (once, cached under --data_dir) the demo shapes through the real
converter, then measures training examples/s of the same CNN, side by side in
one run, round-robin so that load on the shared machine hits all rows alike:

  loop, load()          the trainers' loop (steps_per_loop steps per
                        tf.function call) fed by pipeline.dataset.load
  loop, load(cache)     the same with the reader's in-memory cache
  loop, in-memory       the same loop fed by from_tensor_slices over the
                        decoded arrays (shuffle, repeat, batch, prefetch)
  loop, XLA             loop, in-memory with jit_compile=True
  Keras fit             model.fit on the in-memory numpy arrays, the
                        baseline a user would write (Keras' own loop)

Each figure is the median of --repeats timed runs of --measure_steps steps
after one warm-up run, as examples per wall second and per CPU second of
this process (all threads). The machine is shared: wall rates swing with
the neighbours' load, CPU-second rates much less, so the ratios are given for
both. The checkpoint cost is the median time of a save (model + optimizer,
the trainers' CheckpointManager) over the time of --checkpoint_every steps.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import keras
import numpy as np
import tensorflow as tf

from pipeline import dataset
from trainers import train_loop
from trainers.config import TrainConfig
from trainers.models import cnn

_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/bench_train",
                                "Where the converted demo shapes are cached.")
_EXAMPLES_PER_CLASS = flags.DEFINE_integer("examples_per_class", 500,
                                           "Demo images per class.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_FILTERS = flags.DEFINE_list("filters", ["32"], "ConvBlock widths (each "
                             "block is two conv layers).")
_DENSE_UNITS = flags.DEFINE_integer("dense_units", 128, "Dense layer units.")
_STEPS_PER_LOOP = flags.DEFINE_integer("steps_per_loop", 50,
                                       "Steps per tf.function call.")
_MEASURE_STEPS = flags.DEFINE_integer("measure_steps", 100,
                                      "Steps per timed run.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed runs per row.")
_CHECKPOINT_EVERY = flags.DEFINE_list(
    "checkpoint_every", ["100", "500"], "Save intervals to cost (500 is the "
    "trainers' default).")


def converted_shapes(data_dir: str, examples_per_class: int) -> str:
  """The demo shapes as a dataset dir, converted by the real Beam job once."""
  from pipeline import demo_data  # pylint: disable=g-import-not-at-top
  output = os.path.join(data_dir, f"shapes_{examples_per_class}")
  if os.path.exists(os.path.join(output, "dataset_info.json")):
    return output
  raw = os.path.join(data_dir, f"raw_{examples_per_class}")
  demo_data.ensure_shapes(raw, examples_per_class=examples_per_class,
                          image_size=32, seed=0)
  subprocess.run([sys.executable, "-m", "pipeline.make_tfrecords",
                  "--source=image_folder", f"--input={raw}",
                  f"--output_dir={output}"], check=True)
  return output


def train_arrays(data_dir: str):
  """The train split decoded into numpy arrays (padding rows dropped)."""
  images, labels = [], []
  for inputs, batch_labels, weights in dataset.load(
      data_dir, "train", 256, training=False):
    keep = weights.numpy() > 0
    images.append(inputs.numpy()[keep])
    labels.append(batch_labels.numpy()[keep])
  return np.concatenate(images), np.concatenate(labels)


def in_memory_dataset(images, labels, batch_size):
  ds = tf.data.Dataset.from_tensor_slices((images, labels))
  ds = ds.shuffle(len(labels), seed=0)  # a full shuffle each epoch
  ds = ds.repeat()
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def build_model(num_classes):
  train_loop.set_seeds(0, deterministic=False)
  return cnn.build_cnn((32, 32, 3), num_classes,
                       filters=tuple(int(width) for width in _FILTERS.value),
                       dense_units=_DENSE_UNITS.value)


class LoopRow:
  """Our loop on one input pipeline: a model, an iterator, a compiled step."""

  def __init__(self, ds, num_classes, jit_compile=False):
    strategy = tf.distribute.get_strategy()
    self.model = build_model(num_classes)
    self.optimizer = train_loop.make_optimizer(
        TrainConfig(data_dir="", model_dir=""))
    self.optimizer.build(self.model.trainable_variables)
    self.train_steps = train_loop.make_train_function(
        strategy, self.model, self.optimizer, is_regression=False,
        global_batch_size=_BATCH_SIZE.value, jit_compile=jit_compile)
    self.iterator = iter(ds)

  def run(self, steps: int) -> None:
    """Trains `steps` steps as the trainer does, one host call per
    steps_per_loop, reading the metrics after each call."""
    done = 0
    while done < steps:
      count = min(_STEPS_PER_LOOP.value, steps - done)
      float(self.train_steps(self.iterator, tf.constant(count))["loss"])
      done += count


class FitRow:
  """Keras' own loop: compile + fit on numpy arrays, timed per epoch."""

  def __init__(self, images, labels, num_classes):
    self.images, self.labels = images, labels
    self.model = build_model(num_classes)
    self.model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])

  def steps(self, steps: int) -> int:
    """Steps actually run for a request: whole epochs (one fit call)."""
    steps_per_epoch = len(self.labels) // _BATCH_SIZE.value
    return max(1, round(steps / steps_per_epoch)) * steps_per_epoch

  def run(self, steps: int) -> None:
    steps_per_epoch = len(self.labels) // _BATCH_SIZE.value
    self.model.fit(self.images[:steps_per_epoch * _BATCH_SIZE.value],
                   self.labels[:steps_per_epoch * _BATCH_SIZE.value],
                   batch_size=_BATCH_SIZE.value,
                   epochs=self.steps(steps) // steps_per_epoch, verbose=0)


def timed(row, steps: int):
  """(examples per wall second, examples per CPU second) of row.run(steps)."""
  steps = row.steps(steps) if hasattr(row, "steps") else steps
  wall, cpu = time.perf_counter(), time.process_time()
  row.run(steps)
  examples = steps * _BATCH_SIZE.value
  return (examples / (time.perf_counter() - wall),
          examples / (time.process_time() - cpu))


def save_seconds(row: LoopRow, directory: str, count: int = 7) -> float:
  """Median seconds of one checkpoint save of `row`'s model and optimizer."""
  manager = tf.train.CheckpointManager(
      tf.train.Checkpoint(model=row.model, optimizer=row.optimizer),
      directory, max_to_keep=3)
  durations = []
  for number in range(count):
    start = time.perf_counter()
    manager.save(checkpoint_number=number)
    durations.append(time.perf_counter() - start)
  return statistics.median(durations)


def main(argv):
  del argv
  data_dir = converted_shapes(_DATA_DIR.value, _EXAMPLES_PER_CLASS.value)
  num_classes = len(dataset.info(data_dir).schema.class_names)
  images, labels = train_arrays(data_dir)
  batch_size = _BATCH_SIZE.value
  rows = {
      "loop, load()": LoopRow(dataset.load(data_dir, "train", batch_size,
                                           training=True), num_classes),
      "loop, load(cache)": LoopRow(dataset.load(
          data_dir, "train", batch_size, training=True, cache=True),
                                   num_classes),
      "loop, in-memory": LoopRow(in_memory_dataset(images, labels,
                                                   batch_size), num_classes),
      "loop, XLA": LoopRow(in_memory_dataset(images, labels, batch_size),
                           num_classes, jit_compile=True),
      "Keras fit": FitRow(images, labels, num_classes),
  }
  print(f"{len(labels)} train examples, batch {batch_size}, filters "
        f"{','.join(_FILTERS.value)}, {_MEASURE_STEPS.value} steps x "
        f"{_REPEATS.value} repeats, steps_per_loop {_STEPS_PER_LOOP.value}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True)
  for row in rows.values():
    timed(row, _STEPS_PER_LOOP.value)  # warm-up: tracing, caches, an epoch
  runs = {name: [] for name in rows}
  for _ in range(_REPEATS.value):
    for name, row in rows.items():  # round-robin: drifting load hits all
      runs[name].append(timed(row, _MEASURE_STEPS.value))
  wall = {name: statistics.median(r[0] for r in values)
          for name, values in runs.items()}
  cpu = {name: statistics.median(r[1] for r in values)
         for name, values in runs.items()}
  print(f"{'':20s} {'examples/s':>11s} {'per CPU-s':>10s}   wall runs")
  for name in rows:
    print(f"{name:20s} {wall[name]:11.0f} {cpu[name]:10.0f}   " +
          " ".join(f"{value:.0f}" for value, _ in runs[name]))

  def ratio(label, numerator, denominator, target=""):
    print(f"{label:32s} wall {wall[numerator] / wall[denominator]:5.2f}   "
          f"CPU {cpu[numerator] / cpu[denominator]:5.2f}   {target}")

  print()
  ratio("streaming / in-memory", "loop, load()", "loop, in-memory",
        "(target >= 0.97)")
  ratio("load(cache) / in-memory", "loop, load(cache)", "loop, in-memory")
  ratio("our loop (in-memory) / fit", "loop, in-memory", "Keras fit",
        "(target >= 1.5)")
  ratio("XLA / no XLA (in-memory)", "loop, XLA", "loop, in-memory")
  directory = tempfile.mkdtemp(prefix="bench_train_ckpt_")
  seconds = save_seconds(rows["loop, load()"], directory)
  tf.io.gfile.rmtree(directory)
  step_seconds = batch_size / wall["loop, load()"]
  for every in _CHECKPOINT_EVERY.value:
    overhead = seconds / (int(every) * step_seconds)
    print(f"checkpoint every {every:>4s} steps     {overhead:6.2%} of "
          f"training time (a save: {seconds * 1000:.0f} ms)  (target < 3%)")
  print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main)
