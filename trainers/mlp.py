"""Trains an MLP on a tabular (CSV-sourced) dataset dir: classification when
the dataset has classes, regression (squared error) when it has none.

    python -m trainers.mlp --data_dir=data/housing --model_dir=runs/housing
    python -m trainers.mlp --data_dir=... --model_dir=... --hidden_units=
        (no hidden layers: linear / logistic regression)

Run it again with the same flags after any stop and it continues where the
last checkpoint left it. Exit codes: 0 done, 42 preempted, 1 bad input.
"""

from absl import flags

from trainers import flags as trainer_flags
from trainers import train_loop
from trainers.config import UserError
from trainers.models import mlp

flags.DEFINE_list("hidden_units", ["64", "64"], "Units of each hidden layer; "
                  "empty for a linear model.")
flags.DEFINE_bool("normalize", True, "Scale each feature by its train-split "
                  "mean and variance (inside the model, so the export too).")
FLAGS = flags.FLAGS


def feature_moments(data_dir: str) -> tuple:
  """(mean, variance) of each feature over the train split, one pass."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pipeline import dataset  # pylint: disable=g-import-not-at-top
  total = total_squares = count = 0.0
  for rows, _, weights in dataset.load(data_dir, "train", 1024,
                                       training=False):
    rows, weights = rows.numpy().astype(np.float64), weights.numpy()[:, None]
    total = total + (rows * weights).sum(axis=0)
    total_squares = total_squares + (rows * rows * weights).sum(axis=0)
    count += float(weights.sum())
  mean = total / max(count, 1.0)
  return mean, np.maximum(total_squares / max(count, 1.0) - mean * mean, 0.0)


def make_model_builder(hidden_units, data_dir=None):
  """-> build_model(schema, dtype) for the loop, checking the dataset fits.

  data_dir: normalise each feature with its train-split mean and variance
  (computed on first build, inside the strategy the loop set up); None: raw.
  """
  moments = []

  def build_model(schema, dtype):
    if schema.kind != "vector":
      raise UserError("trainers.mlp needs a tabular dataset (kind=vector), "
                      f"got kind={schema.kind}")
    if data_dir and not moments:
      moments.extend(feature_moments(data_dir))
    num_outputs = 1 if schema.class_names is None else len(schema.class_names)
    return mlp.build_mlp(schema.shape[0], num_outputs,
                         hidden_units=hidden_units, dtype=dtype,
                         moments=tuple(moments) or None)

  return build_model


def main(argv):
  del argv
  try:
    hidden_units = tuple(int(value) for value in FLAGS.hidden_units if value)
  except ValueError as error:
    raise UserError(f"--hidden_units: {error}") from error
  config = trainer_flags.config_from_flags()
  train_loop.train_and_evaluate(config, make_model_builder(
      hidden_units, config.data_dir if FLAGS.normalize else None))


if __name__ == "__main__":
  trainer_flags.run(main)
