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
FLAGS = flags.FLAGS


def make_model_builder(hidden_units):
  """-> build_model(schema, dtype) for the loop, checking the dataset fits."""

  def build_model(schema, dtype):
    if schema.kind != "vector":
      raise UserError("trainers.mlp needs a tabular dataset (kind=vector), "
                      f"got kind={schema.kind}")
    num_outputs = 1 if schema.class_names is None else len(schema.class_names)
    return mlp.build_mlp(schema.shape[0], num_outputs,
                         hidden_units=hidden_units, dtype=dtype)

  return build_model


def main(argv):
  del argv
  try:
    hidden_units = tuple(int(value) for value in FLAGS.hidden_units if value)
  except ValueError as error:
    raise UserError(f"--hidden_units: {error}") from error
  config = trainer_flags.config_from_flags()
  train_loop.train_and_evaluate(config, make_model_builder(hidden_units))


if __name__ == "__main__":
  trainer_flags.run(main)
