"""The training loop every trainer shares: strategy-agnostic, resumable.

    train_and_evaluate(config, build_model)
      strategy      trainers.strategy.make_strategy (TPU, MWMS, Mirrored, ...)
      model, optimizer, step   built under strategy.scope()
      restore       latest readable checkpoint; its step is the input position
      loop          train_steps(iterator, n): n steps inside one tf.function
                    checkpoint / eval / progress + TensorBoard when it is time
      end           checkpoint, eval -> metrics.json, export/ (chief only)

Why a custom loop and not `model.fit`: Keras 3's fit fails under
MultiWorkerMirroredStrategy in TF 2.21 (keras-team/keras#20585); the loop below
runs unchanged on one CPU, several GPUs, several workers and TPUs, and running
`steps_per_loop` steps per call is what keeps a TPU (and a CPU) busy.

Resume: the step counter is a variable in the checkpoint, and the reader's
`start_step` continues the input stream exactly there (iterators of
distributed datasets cannot be checkpointed under Mirrored/MWMS).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Callable

from absl import logging
import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from trainers import export as export_lib
from trainers import strategy as strategy_lib
from trainers.config import Interrupted, Preempted, TrainConfig, UserError

SUM = tf.distribute.ReduceOp.SUM


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Where the loop's batches come from: `reader_source` for the trainers;
  anything with these two functions (e.g. tensors in memory) otherwise.

  train(input_context, start_step) -> endless (inputs, labels) batches of
    input_context.get_per_replica_batch_size(global batch), continuing after
    `start_step` global steps.
  evaluate(input_context) -> (inputs, labels, weights) batches that hold each
    held-out example once (weight 0 on padding); None when there is no split.
  """
  schema: object  # pipeline.records.Schema
  train: Callable
  evaluate: Callable | None = None
  eval_split: str | None = None


# Decoding small images costs as much CPU as the CNN's step on 2 cores
# (bench/train.py: streaming 0.85x in-memory, cached 1.00x); a split this
# small is cached by default, as TFDS auto-caches small datasets.
AUTO_CACHE_BYTES = 256 << 20


def decoded_bytes(schema, num_examples: int, image_size=None) -> float:
  """Memory the decoded split would take (uint8 pixels, float32 features);
  infinite when image sizes vary and no resize fixes them."""
  if schema.kind != "image":
    return num_examples * 4.0 * schema.shape[0]
  height, width, channels = schema.shape
  if image_size:
    height, width = image_size
  if height is None or width is None:
    return float("inf")
  return float(num_examples) * height * width * channels


def reader_source(config: TrainConfig) -> DataSource:
  """Training and held-out batches from `pipeline.dataset` for config.data_dir."""
  from pipeline import dataset  # pylint: disable=g-import-not-at-top
  try:
    info = dataset.info(config.data_dir)
  except (FileNotFoundError, ValueError) as error:
    raise UserError(f"--data_dir: {error}") from error
  if "train" not in info.splits:
    raise UserError(f"--data_dir={config.data_dir} has no train split "
                    f"(splits: {sorted(info.splits)})")
  eval_split = next((name for name in ("validation", "test")
                     if name in info.splits), None)
  if eval_split is None:
    logging.warning("%s has no validation or test split: training without "
                    "evaluation", config.data_dir)
  cache = config.cache
  if cache is None:
    cache = decoded_bytes(info.schema, info.splits["train"].num_examples,
                          config.image_size) <= AUTO_CACHE_BYTES
  common = dict(image_size=config.image_size, cache=cache,
                skip_bad_records=config.skip_bad_records)

  def train(input_context, start_step):
    return dataset.load(config.data_dir, "train", config.batch_size,
                        training=True, seed=config.seed, start_step=start_step,
                        input_context=input_context, augment=config.augment,
                        **common)

  def evaluate(input_context):
    return dataset.load(config.data_dir, eval_split, config.batch_size,
                        training=False, input_context=input_context, **common)

  return DataSource(schema=info.schema, train=train,
                    evaluate=evaluate if eval_split else None,
                    eval_split=eval_split)


# --- the step ----------------------------------------------------------------


def per_example_loss(labels, outputs, is_regression: bool):
  if is_regression:
    return tf.square(outputs[:, 0] - labels)
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, outputs)


def batch_sums(labels, outputs, losses, weights, is_regression: bool) -> dict:
  """Weighted sums over one replica's batch; summed over replicas, then
  divided once at the end, they give exact means over every example."""
  sums = {"loss": tf.reduce_sum(losses * weights),
          "examples": tf.reduce_sum(weights)}
  if is_regression:
    errors = tf.abs(outputs[:, 0] - labels)
    sums["abs_error"] = tf.reduce_sum(errors * weights)
  else:
    hits = tf.cast(tf.equal(tf.argmax(outputs, axis=-1), labels), tf.float32)
    sums["correct"] = tf.reduce_sum(hits * weights)
  return sums


def zero_sums(is_regression: bool) -> dict:
  names = ("loss", "examples", "abs_error" if is_regression else "correct")
  return {name: tf.constant(0.0) for name in names}


def add_replica_sums(strategy, totals: dict, per_replica: dict) -> dict:
  return {name: totals[name] + strategy.reduce(SUM, per_replica[name], None)
          for name in totals}


def metrics_from_sums(sums: dict, is_regression: bool) -> dict:
  count = max(float(sums["examples"]), 1.0)
  metrics = {"loss": float(sums["loss"]) / count}
  if is_regression:
    metrics["mean_absolute_error"] = float(sums["abs_error"]) / count
    metrics["root_mean_squared_error"] = metrics["loss"] ** 0.5
  else:
    metrics["accuracy"] = float(sums["correct"]) / count
  return metrics


def make_train_function(strategy, model, optimizer, is_regression: bool,
                        global_batch_size: int, jit_compile: bool):
  """-> train_steps(iterator, num_steps): that many steps in one call.

  Returns the sums of `batch_sums` over all steps and replicas.
  """

  def replica_step(inputs, labels):
    with tf.GradientTape() as tape:
      outputs = tf.cast(model(inputs, training=True), tf.float32)
      losses = per_example_loss(labels, outputs, is_regression)
      # Divide by the global batch: the optimizer sums replicas' gradients.
      loss = tf.nn.compute_average_loss(losses,
                                        global_batch_size=global_batch_size)
      if model.losses:
        loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
      scaled_loss = optimizer.scale_loss(loss)  # identity unless float16
    gradients = tape.gradient(scaled_loss, model.trainable_variables)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return batch_sums(labels, outputs, losses, tf.ones_like(losses),
                      is_regression)

  if jit_compile:
    replica_step = tf.function(replica_step, jit_compile=True)

  @tf.function
  def train_steps(iterator, num_steps):
    totals = zero_sums(is_regression)
    for _ in tf.range(num_steps):
      inputs, labels = next(iterator)
      per_replica = strategy.run(replica_step, args=(inputs, labels))
      totals = add_replica_sums(strategy, totals, per_replica)
    return totals

  return train_steps


def make_eval_function(strategy, model, is_regression: bool):
  """-> evaluate(distributed_dataset): `batch_sums` over the whole split."""

  def replica_step(inputs, labels, weights):
    outputs = tf.cast(model(inputs, training=False), tf.float32)
    losses = per_example_loss(labels, outputs, is_regression)
    return batch_sums(labels, outputs, losses, weights, is_regression)

  @tf.function
  def evaluate(distributed_dataset):
    totals = zero_sums(is_regression)
    for inputs, labels, weights in distributed_dataset:
      per_replica = strategy.run(replica_step, args=(inputs, labels, weights))
      totals = add_replica_sums(strategy, totals, per_replica)
    return totals

  return evaluate


def make_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
  learning_rate = config.learning_rate
  if config.lr_schedule == "cosine":
    learning_rate = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if config.warmup_steps else learning_rate,
        decay_steps=max(1, config.train_steps - config.warmup_steps),
        warmup_target=learning_rate if config.warmup_steps else None,
        warmup_steps=config.warmup_steps)
  if config.optimizer == "sgd":
    optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9)
  else:
    optimizer = keras.optimizers.Adam(learning_rate)
  if config.mixed_precision == "mixed_float16":
    # float16 gradients underflow without loss scaling; bfloat16 needs none.
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


# --- checkpoints and preemption ----------------------------------------------


def restore_latest(checkpoint: tf.train.Checkpoint, directory: str,
                   is_chief: bool) -> str | None:
  """Restores the newest readable checkpoint in `directory`; returns its path.

  An unreadable newest checkpoint (truncated upload, disk full) is skipped
  with a warning for the one before it; the chief then rewrites the
  checkpoint list without it, so later restores (and the preemption handler's
  own) agree. None when there is no checkpoint yet.
  """
  state = tf.train.get_checkpoint_state(directory)
  if state is None:
    return None
  paths = list(state.all_model_checkpoint_paths) or [
      state.model_checkpoint_path]
  for index in range(len(paths) - 1, -1, -1):
    try:
      checkpoint.restore(paths[index]).assert_existing_objects_matched()
    # Damage shows as OpError, IndexError (short read), ValueError or
    # AssertionError (a different model): all mean "not this one".
    except Exception as error:  # pylint: disable=broad-except
      first_line = (str(error).strip().splitlines() or [""])[0][:200]
      problem = f"{type(error).__name__}: {first_line}"
      logging.warning("checkpoint %s is unreadable (%s); trying the one "
                      "before it", paths[index], problem)
      continue
    if index < len(paths) - 1 and is_chief:
      tf.compat.v1.train.update_checkpoint_state(
          directory, paths[index], all_model_checkpoint_paths=paths[:index + 1])
    return paths[index]
  raise UserError(f"no readable checkpoint in {directory} (tried "
                  f"{len(paths)}, last: {problem}); different model flags? "
                  "Move the directory away to start afresh")


class Checkpoints:
  """Saves to MODEL_DIR/checkpoints. Under MultiWorkerMirrored every worker
  must take part in a save; non-chief workers write to a temporary dir of
  their own and delete it (the chief's copy is the one that counts)."""

  def __init__(self, checkpoint, model_dir: str, keep: int, chief: bool,
               task_id: int):
    self.directory = os.path.join(model_dir, "checkpoints")
    self.chief = chief
    self.write_dir = self.directory if chief else os.path.join(
        model_dir, f"tmp_worker_{task_id}")
    self.checkpoint = checkpoint
    self.manager = tf.train.CheckpointManager(
        checkpoint, self.write_dir, max_to_keep=keep, checkpoint_name="ckpt")
    self.last_saved_step = None

  def save(self, step: int) -> None:
    self.manager.save(checkpoint_number=step)
    self.last_saved_step = step
    self.remove_worker_copy()

  def remove_worker_copy(self) -> None:
    if not self.chief and tf.io.gfile.exists(self.write_dir):
      tf.io.gfile.rmtree(self.write_dir)


class SigtermWatch:
  """Single-process preemption: SIGTERM sets a flag that the loop checks after
  each host-loop call; it then saves at that step and raises Preempted (exit
  code 42). PreemptionCheckpointHandler does nothing on a TPU VM or a GCE CPU
  VM, so every single-process run, TPU included, uses this. Ctrl-C (SIGINT)
  saves the same way and raises Interrupted (exit code 130); a second Ctrl-C
  stops at once.
  """

  def __init__(self, checkpoints: Checkpoints):
    self.checkpoints = checkpoints
    self.received = []
    self.previous_handlers = {
        signum: signal.signal(signum, self._handle)
        for signum in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if signum == signal.SIGINT and signal.SIGINT in self.received:
      raise KeyboardInterrupt  # the second Ctrl-C: no waiting for a save
    self.received.append(signum)

  def check(self, step: int) -> None:
    if not self.received:
      return
    self.checkpoints.save(step)
    if self.received[0] == signal.SIGINT:
      raise Interrupted(f"Ctrl-C: checkpoint saved at step {step}; the same "
                        "command continues from it")
    raise Preempted(f"SIGTERM: checkpoint saved at step {step}")

  def close(self) -> None:
    for signum, handler in self.previous_handlers.items():
      signal.signal(signum, handler)


class MultiWorkerWatch:
  """MultiWorkerMirrored preemption: PreemptionCheckpointHandler makes every
  worker save at the same step after a SIGTERM on any of them, then exit_fn
  raises Preempted (exit code 42) on each."""

  def __init__(self, strategy, checkpoints: Checkpoints):

    def exit_fn():
      checkpoints.remove_worker_copy()
      raise Preempted("SIGTERM in the cluster: checkpoint saved")

    self.handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver, checkpoints.manager,
        termination_config=tf.distribute.experimental.TerminationConfig(
            exit_fn=exit_fn))

  def check(self, step: int) -> None:
    self.handler.save_checkpoint_if_preempted(checkpoint_number=step)

  def close(self) -> None:
    pass


# --- progress ----------------------------------------------------------------

# TensorBoard's scalar plugin tag. tf.summary.scalar needs the tensorboard
# package, which TF 2.21 no longer installs; tf.summary.write with this
# metadata writes the same event, and TensorBoard shows it.
SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


def write_scalars(writer, step: int, values: dict) -> None:
  with writer.as_default(step=step):
    for name, value in values.items():
      tf.summary.write(name, tf.constant(value, tf.float32),
                       metadata=SCALAR_METADATA)


def format_metrics(metrics: dict) -> str:
  return "  ".join(f"{name} {value:.4g}" for name, value in metrics.items())


def format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Sums the train metrics between log points; logs a progress line and
  writes TensorBoard scalars when a `log_every` boundary is crossed."""

  def __init__(self, config: TrainConfig, writer, is_regression: bool):
    self.config, self.writer = config, writer
    self.is_regression = is_regression
    self.reset()

  def reset(self):
    self.sums, self.start = {}, time.perf_counter()

  def add(self, previous_step: int, step: int, sums: dict, learning_rate):
    for name, value in sums.items():
      self.sums[name] = self.sums.get(name, 0.0) + float(value)
    total = self.config.train_steps
    if not (crossed(previous_step, step, self.config.log_every) or
            step == total):
      return
    examples_per_second = self.sums["examples"] / max(
        time.perf_counter() - self.start, 1e-9)
    eta = (total - step) * self.config.batch_size / max(examples_per_second,
                                                        1e-9)
    metrics = metrics_from_sums(self.sums, self.is_regression)
    logging.info("step %d/%d  %s  %.0f examples/s  ETA %s", step, total,
                 format_metrics(metrics), examples_per_second,
                 format_seconds(eta))
    write_scalars(self.writer, step, {
        **metrics, "learning_rate": float(tf.convert_to_tensor(learning_rate)),
        "examples_per_second": examples_per_second})
    self.reset()


# --- the loop ----------------------------------------------------------------


def crossed(previous_step: int, step: int, every: int) -> bool:
  """Whether a multiple of `every` lies in (previous_step, step]."""
  return every > 0 and previous_step // every < step // every


def next_stop(step: int, config: TrainConfig) -> int:
  """Where the next host-loop call must end: a checkpoint, eval or the end."""
  stop = min(config.train_steps, step + config.steps_per_loop)
  for every in (config.checkpoint_every, config.eval_every):
    if every > 0:
      stop = min(stop, (step // every + 1) * every)
  return stop


# Settings a resumed run may change without changing what it computes.
RUN_LENGTH_SETTINGS = frozenset({
    "train_steps", "checkpoint_every", "keep_checkpoints", "eval_every",
    "log_every", "export", "export_tflite", "tflite_quantization",
    "tpu_timeout"})


def warn_about_changed_settings(config_path: str, config: TrainConfig) -> None:
  """Exact resume needs the settings the checkpoint was trained with: say
  which ones differ (the run goes on; the user may mean it)."""
  if not tf.io.gfile.exists(config_path):
    return
  with tf.io.gfile.GFile(config_path) as f:
    before = json.load(f)
  now = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists
  changed = [f"--{name} {before[name]} -> {now[name]}" for name in sorted(now)
             if name in before and before[name] != now[name]
             and name not in RUN_LENGTH_SETTINGS]
  if changed:
    logging.warning("resuming with settings other than the checkpoint's "
                    "(%s): the run continues, but not as the uninterrupted "
                    "run would have", ", ".join(changed))


def write_json(path: str, values: dict) -> None:
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(json.dumps(values, indent=2, sort_keys=True) + "\n")


def set_seeds(seed: int, deterministic: bool) -> None:
  keras.utils.set_random_seed(seed)  # weights init
  # Unset TF's global seed again: the input order is then a function of the
  # reader's (seed, epoch) alone, and TF 2.21 fails on a global seed of 0 with
  # Dataset.shuffle(seed=<tensor>) inside the reader's flat_map.
  tf.random.set_seed(None)
  if deterministic:
    tf.config.experimental.enable_op_determinism()


def train_and_evaluate(config: TrainConfig, build_model: Callable,
                       source: DataSource | None = None,
                       strategy: tf.distribute.Strategy | None = None) -> dict:
  """Trains to config.train_steps (resuming if MODEL_DIR has a checkpoint),
  evaluates, writes metrics.json and export/. Returns the final metrics.

  build_model(schema, dtype) -> keras.Model mapping reader inputs to logits
  (or one value for regression); dtype is a Keras dtype policy or None.
  source: defaults to `pipeline.dataset` on config.data_dir.
  Raises UserError for bad input, Preempted after a SIGTERM checkpoint.
  """
  # The strategy comes first: MWMS and logical CPUs must be set up before
  # anything (the reader's metadata included) initialises TensorFlow.
  strategy = strategy or strategy_lib.make_strategy(
      config.strategy, config.tpu, config.tpu_timeout, config.num_cpu_devices)
  replicas = strategy.num_replicas_in_sync
  logging.info("strategy %s, %d replicas", type(strategy).__name__, replicas)
  if config.batch_size % replicas:
    raise UserError(f"--batch_size={config.batch_size} is not divisible by "
                    f"the {replicas} replicas of the strategy")
  source = source or reader_source(config)
  is_regression = source.schema.class_names is None
  set_seeds(config.seed, config.deterministic)
  chief = strategy_lib.is_chief(strategy)
  try:
    tf.io.gfile.makedirs(config.model_dir)
  except tf.errors.OpError as error:  # a file in the way, no permission
    raise UserError(f"--model_dir={config.model_dir}: cannot create it "
                    f"({error.message})") from error

  with strategy.scope():
    model = build_model(source.schema, config.mixed_precision)
    optimizer = make_optimizer(config)
    optimizer.build(model.trainable_variables)  # slots exist before restore
    step_variable = tf.Variable(0, dtype=tf.int64, trainable=False)
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                   step=step_variable)
  checkpoints = Checkpoints(checkpoint, config.model_dir,
                            config.keep_checkpoints, chief,
                            strategy_lib.task_id(strategy))
  restored = restore_latest(checkpoint, checkpoints.directory, chief)
  step = int(step_variable.numpy())
  if restored:
    checkpoints.last_saved_step = step
    logging.info("restored %s: continuing at step %d", restored, step)
  config_path = os.path.join(config.model_dir, "config.json")
  if restored:
    warn_about_changed_settings(config_path, config)
  if chief:  # after the restore: a run that cannot restore changes nothing
    write_json(config_path, dataclasses.asdict(config))
  # Resume: the reader skips the `step` global batches already trained on.
  start_step = step
  iterator = iter(strategy.distribute_datasets_from_function(
      lambda input_context: source.train(input_context, start_step)))
  eval_dataset = source.evaluate and strategy.distribute_datasets_from_function(
      source.evaluate)
  train_steps = make_train_function(strategy, model, optimizer, is_regression,
                                    config.batch_size, config.jit_compile)
  evaluate = make_eval_function(strategy, model, is_regression)
  writers = {name: tf.summary.create_file_writer(
      os.path.join(config.model_dir, name)) if chief else
             tf.summary.create_noop_writer() for name in ("train", "eval")}
  progress = Progress(config, writers["train"], is_regression)

  def run_eval() -> dict:
    if eval_dataset is None:
      return {}
    sums = evaluate(eval_dataset)
    metrics = metrics_from_sums(sums, is_regression)
    metrics["examples"] = int(round(float(sums["examples"])))
    logging.info("eval on %s at step %d: %s", source.eval_split, step,
                 format_metrics(metrics))
    write_scalars(writers["eval"], step, metrics)
    return metrics

  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    preemption = MultiWorkerWatch(strategy, checkpoints)
  else:
    preemption = SigtermWatch(checkpoints)
  try:
    while step < config.train_steps:
      stop = next_stop(step, config)
      sums = train_steps(iterator, tf.constant(stop - step))
      previous_step, step = step, stop
      step_variable.assign(step)
      progress.add(previous_step, step, sums, optimizer.learning_rate)
      if crossed(previous_step, step, config.checkpoint_every):
        checkpoints.save(step)
      if crossed(previous_step, step, config.eval_every) and \
          step < config.train_steps:
        run_eval()
      preemption.check(step)
    if checkpoints.last_saved_step != step:
      checkpoints.save(step)
  finally:
    preemption.close()

  final = {"step": step, **run_eval()}
  if source.eval_split:
    final["split"] = source.eval_split
  if chief:
    write_json(os.path.join(config.model_dir, "metrics.json"), final)
    for writer in writers.values():
      writer.flush()
  if chief and config.export:
    export_model = build_model(source.schema, None)  # float32, no strategy
    export_model.set_weights(model.get_weights())
    export_lib.export(export_model, source.schema,
                      os.path.join(config.model_dir, "export"),
                      image_size=config.image_size, tflite=config.export_tflite,
                      quantization=config.tflite_quantization)
  logging.info("done at step %d: %s", step, json.dumps(final))
  if chief:
    wrote = ["checkpoints/", "metrics.json", "train/ and eval/ (TensorBoard)"
             ] + (["export/ (SavedModel)"] if config.export else [])
    logging.info("wrote in %s: %s", config.model_dir, ", ".join(wrote))
  return final
