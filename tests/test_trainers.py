"""The trainers' library in-process: models, strategy choice, the loop under
XLA, a ram:// model dir, regression, TFLite quantisation.

End-to-end runs of the entry points (strategies, resume after SIGKILL and
SIGTERM, the export in a fresh process, flags) are in test_train_runs.py.
"""

import dataclasses
import json
import logging
import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainers import cnn as cnn_entry
from trainers import export as export_lib
from trainers import mlp as mlp_entry
from trainers import strategy as strategy_lib
from trainers import train_loop
from trainers.config import TrainConfig, UserError
from trainers.models import cnn
from trainers.models import mlp


def tiny_config(data_dir, model_dir, **overrides):
  values = dict(data_dir=str(data_dir), model_dir=str(model_dir),
                strategy="default", batch_size=16, train_steps=12,
                steps_per_loop=4, checkpoint_every=6, log_every=6)
  values.update(overrides)
  return TrainConfig(**values)


def cnn_builder():
  return cnn_entry.make_model_builder(filters=(8,), dense_units=16,
                                      image_size=None)


# --- models ------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda: cnn.build_cnn((8, 8, 3), 3, filters=(4, 8), dense_units=8),
    lambda: mlp.build_mlp(5, 1, hidden_units=(7, 3)),
])
def test_model_round_trips_through_keras_serialisation(build, tmp_path):
  model = build()
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  shape = (2, *model.inputs[0].shape[1:])
  inputs = np.random.default_rng(0).integers(0, 255, shape).astype(
      model.inputs[0].dtype)
  np.testing.assert_allclose(loaded(inputs), model(inputs), rtol=1e-6)
  # The blocks come back as our layer class, with their config.
  block = loaded.get_layer("block1")
  assert type(block).__name__ in ("ConvBlock", "DenseBlock")
  assert block.get_config() == model.get_layer("block1").get_config()


def test_cnn_sizes_itself_from_the_schema():
  from pipeline import records  # pylint: disable=g-import-not-at-top
  schema = records.Schema(kind="image", shape=(12, 10, 1),
                          class_names=("a", "b", "c", "d"))
  model = cnn_builder()(schema, None)
  assert model.inputs[0].shape[1:] == (12, 10, 1)
  assert model.outputs[0].shape[-1] == 4
  with pytest.raises(UserError, match="image_size"):
    cnn_builder()(records.Schema(kind="image", shape=(None, None, 3),
                                 class_names=("a",)), None)
  with pytest.raises(UserError, match="tabular"):
    mlp_entry.make_model_builder(())(schema, None)


# --- strategy ----------------------------------------------------------------


@pytest.mark.parametrize("tpu, workers, gpus, expected", [
    ("local", 2, 4, "tpu"),
    (None, 2, 4, "multi_worker"),
    (None, 1, 4, "mirrored"),
    (None, 0, 1, "default"),
    (None, 0, 0, "default"),
])
def test_auto_strategy_choice(tpu, workers, gpus, expected):
  assert strategy_lib.resolve_auto(tpu, workers, gpus) == expected


def test_tf_config_worker_count():
  cluster = {"worker": ["a:1", "b:2"], "chief": ["c:3"]}
  text = json.dumps({"cluster": cluster, "task": {"type": "worker",
                                                  "index": 0}})
  assert strategy_lib.tf_config_workers({"TF_CONFIG": text}) == 3
  assert strategy_lib.tf_config_workers({}) == 0
  with pytest.raises(UserError, match="TF_CONFIG"):
    strategy_lib.tf_config_workers({"TF_CONFIG": "{not json"})


# --- the loop ----------------------------------------------------------------


def test_loop_helpers():
  assert train_loop.crossed(8, 12, 10) and not train_loop.crossed(10, 12, 10)
  assert not train_loop.crossed(0, 100, 0)
  config = TrainConfig(data_dir="d", model_dir="m", train_steps=95,
                       steps_per_loop=50, checkpoint_every=30, eval_every=40)
  stops, step = [], 0
  while step < config.train_steps:
    step = train_loop.next_stop(step, config)
    stops.append(step)
  assert stops == [30, 40, 60, 80, 90, 95]


def test_train_step_compiles_under_xla(image_dataset_dir, tmp_path):
  config = tiny_config(image_dataset_dir, tmp_path, jit_compile=True,
                       learning_rate=0.01)
  metrics = train_loop.train_and_evaluate(config, cnn_builder())
  assert metrics["step"] == 12 and metrics["examples"] == 30
  assert np.isfinite(metrics["loss"])


def test_ram_model_dir_and_resume(image_dataset_dir):
  model_dir = "ram://trainers_test/model"
  config = tiny_config(image_dataset_dir, model_dir)
  first = train_loop.train_and_evaluate(config, cnn_builder())
  for name in ("metrics.json", "config.json", "checkpoints/ckpt-12.index",
               "export/saved_model.pb", "export/labels.txt"):
    assert tf.io.gfile.exists(f"{model_dir}/{name}"), name
  assert tf.io.gfile.glob(f"{model_dir}/train/events.out.tfevents.*")
  # Longer run on the same dir: continues from step 12.
  longer = dataclasses.replace(config, train_steps=18)
  second = train_loop.train_and_evaluate(longer, cnn_builder())
  assert first["step"] == 12 and second["step"] == 18
  assert tf.io.gfile.exists(f"{model_dir}/checkpoints/ckpt-18.index")


def test_signal_handlers_are_restored(image_dataset_dir, tmp_path):
  before = [signal.getsignal(signum) for signum in (signal.SIGTERM,
                                                     signal.SIGINT)]
  train_loop.train_and_evaluate(
      tiny_config(image_dataset_dir, tmp_path, train_steps=2, export=False),
      cnn_builder())
  assert [signal.getsignal(signum) for signum in (signal.SIGTERM,
                                                  signal.SIGINT)] == before


def test_linear_regression_fits(vector_dataset_dir, tmp_path):
  """No hidden layers = linear regression; the data is y = 2 x0 - x1 + 0.5."""
  config = tiny_config(vector_dataset_dir, tmp_path, batch_size=50,
                       train_steps=300, steps_per_loop=50,
                       checkpoint_every=0, learning_rate=0.1)
  metrics = train_loop.train_and_evaluate(
      config, mlp_entry.make_model_builder(hidden_units=(),
                                           data_dir=vector_dataset_dir))
  assert set(metrics) >= {"loss", "mean_absolute_error",
                          "root_mean_squared_error"}
  assert metrics["root_mean_squared_error"] < 0.05, metrics
  with tf.io.gfile.GFile(os.path.join(tmp_path, "metrics.json")) as f:
    assert json.load(f)["step"] == 300


def test_feature_moments_over_the_train_split(tmp_path):
  from conftest import write_dataset  # pylint: disable=g-import-not-at-top
  from pipeline import records  # pylint: disable=g-import-not-at-top
  schema = records.Schema(kind="vector", shape=(2,))
  rows = [("a", [1.0, 10.0], 0.0), ("b", [3.0, 30.0], 0.0),
          ("c", [2.0, 20.0], 0.0)]
  data_dir = write_dataset(tmp_path, schema, {"train": rows}, num_shards=2)
  mean, variance = mlp_entry.feature_moments(data_dir)
  np.testing.assert_allclose(mean, [2.0, 20.0], rtol=1e-6)
  np.testing.assert_allclose(variance, [2 / 3, 200 / 3], rtol=1e-6)


def test_corrupt_latest_checkpoint_falls_back(image_dataset_dir, tmp_path,
                                              caplog):
  caplog.set_level(logging.INFO, logger="absl")
  config = tiny_config(image_dataset_dir, tmp_path, export=False)
  train_loop.train_and_evaluate(config, cnn_builder())
  latest = tmp_path / "checkpoints" / "ckpt-12.data-00000-of-00001"
  latest.write_bytes(latest.read_bytes()[:100])  # a truncated upload
  longer = dataclasses.replace(config, train_steps=14)
  metrics = train_loop.train_and_evaluate(longer, cnn_builder())
  assert metrics["step"] == 14
  assert "ckpt-12 is unreadable" in caplog.text
  assert "continuing at step 6" in caplog.text
  state = tf.train.get_checkpoint_state(str(tmp_path / "checkpoints"))
  assert state.model_checkpoint_path.endswith("ckpt-14")


def test_resuming_with_other_settings_says_which(image_dataset_dir, tmp_path,
                                                 caplog):
  caplog.set_level(logging.INFO, logger="absl")
  config = tiny_config(image_dataset_dir, tmp_path, export=False)
  train_loop.train_and_evaluate(config, cnn_builder())
  longer = dataclasses.replace(config, train_steps=14)  # same run, longer
  train_loop.train_and_evaluate(longer, cnn_builder())
  assert "resuming with settings" not in caplog.text
  other = dataclasses.replace(longer, train_steps=16, batch_size=32, seed=3)
  train_loop.train_and_evaluate(other, cnn_builder())
  assert ("resuming with settings other than the checkpoint's (--batch_size "
          "16 -> 32, --seed 0 -> 3)") in caplog.text
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["batch_size"] == 32  # the newest run's settings


# --- export ------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["dynamic", "float16"])
def test_tflite_quantised_export_runs(quantization, tmp_path):
  from pipeline import records  # pylint: disable=g-import-not-at-top
  schema = records.Schema(kind="vector", shape=(3,), class_names=("a", "b"))
  model = mlp.build_mlp(3, 2, hidden_units=(16,))
  export_lib.export(model, schema, str(tmp_path), tflite=True,
                    quantization=quantization)
  interpreter = tf.lite.Interpreter(str(tmp_path / "model.tflite"))
  interpreter.allocate_tensors()
  rows = np.array([[0.5, -1.0, 2.0]], np.float32)
  interpreter.set_tensor(interpreter.get_input_details()[0]["index"], rows)
  interpreter.invoke()
  output = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
  expected = tf.nn.softmax(model(rows)).numpy()
  np.testing.assert_allclose(output, expected, atol=0.02)


def test_small_train_splits_are_cached_unless_told(image_dataset_dir,
                                                    monkeypatch):
  from pipeline import dataset  # pylint: disable=g-import-not-at-top
  from pipeline import records  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(dataset, "load", lambda *args, **kwargs: calls.append(
      kwargs))
  for cache, expected in [(None, True), (False, False), (True, True)]:
    source = train_loop.reader_source(TrainConfig(
        data_dir=image_dataset_dir, model_dir="unused", cache=cache))
    source.train(None, 0)
    assert calls[-1]["cache"] is expected
  imagenet_like = records.Schema(kind="image", shape=(224, 224, 3),
                                 class_names=("a", "b"))
  assert train_loop.decoded_bytes(imagenet_like, 10_000) > \
      train_loop.AUTO_CACHE_BYTES
  varying = records.Schema(kind="image", shape=(None, None, 3),
                           class_names=("a", "b"))
  assert train_loop.decoded_bytes(varying, 10) == float("inf")
  assert train_loop.decoded_bytes(varying, 10, (8, 8)) == 10 * 8 * 8 * 3
