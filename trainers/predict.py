"""Classifies records with an exported model, as a server would.

    python -m trainers.predict --export_dir=runs/shapes/export --data_dir=data/shapes

Feeds raw serialised `tf.Example`s from a split's shards to the export's
`serving_default` (the export parses and decodes them itself) and prints the
accuracy over them and a few predictions. The point is to show the export is
self-contained: the model is loaded with `tf.saved_model.load` alone.
"""

import os
import re
import sys

from absl import app
from absl import flags

flags.DEFINE_string("export_dir", None, "A SavedModel written by a trainer.")
flags.DEFINE_string("data_dir", None, "Dataset dir whose records to classify.")
flags.DEFINE_string("split", None, "Split to read (default: validation, "
                    "else test, else train).")
flags.DEFINE_integer("num_examples", 512, "How many records to classify.",
                     lower_bound=1)
flags.mark_flags_as_required(["export_dir", "data_dir"])
FLAGS = flags.FLAGS


def _reason(error) -> str:
  """TF's own sentence from an op error, without graph and node framing."""
  lines = [line.strip() for line in error.message.splitlines()]
  lines = [line for line in lines if line and not line.startswith(
      ("[[", "Detected at node", "<stack traces", "Graph execution error"))]
  reason = lines[-1] if lines else error.message
  return re.sub(r"\s*(\[\[|\[Op:).*$", "", reason)[:300]


def main(argv):
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pipeline import dataset  # pylint: disable=g-import-not-at-top

  try:
    info = dataset.info(FLAGS.data_dir)
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"error: {error}")
  split = FLAGS.split or next(
      (name for name in ("validation", "test", "train") if name in info.splits),
      None)
  if split not in info.splits:
    sys.exit(f"error: --split={split}: {FLAGS.data_dir} has splits "
             f"{sorted(info.splits)}")
  if not tf.io.gfile.exists(os.path.join(FLAGS.export_dir, "saved_model.pb")):
    sys.exit(f"error: --export_dir={FLAGS.export_dir}: no saved_model.pb")

  serve = tf.saved_model.load(FLAGS.export_dir).signatures["serving_default"]
  examples = dataset.serialized_records(FLAGS.data_dir, split)
  try:
    serialized = tf.stack(list(examples.take(FLAGS.num_examples)))
  except tf.errors.OpError as error:
    bad_data = dataset.describe_data_error(error, skip_option=None,
                                           data_dir=FLAGS.data_dir)
    if not bad_data:
      raise
    sys.exit(f"error: bad data: {bad_data}")
  labels = tf.io.parse_example(serialized, {
      "label": tf.io.FixedLenFeature(
          [], tf.float32 if info.schema.is_regression else tf.int64)})["label"]
  try:
    outputs = serve(examples=serialized)
  except tf.errors.InvalidArgumentError as error:
    sys.exit(f"error: --export_dir={FLAGS.export_dir} does not read the "
             f"records of --data_dir={FLAGS.data_dir} (a model trained on "
             f"other data?): {_reason(error)}")
  if info.schema.is_regression:
    values = outputs["values"]
    mae = float(tf.reduce_mean(tf.abs(values - labels)))
    print(f"{split}: {len(labels)} records, mean absolute error {mae:.4f}")
    return
  predicted = tf.argmax(outputs["probabilities"], axis=-1)
  accuracy = float(tf.reduce_mean(tf.cast(predicted == labels, tf.float32)))
  print(f"{split}: {len(labels)} records through serving_default, "
        f"accuracy {accuracy:.3f}")
  names = info.schema.class_names
  for index in range(min(5, len(labels))):
    print(f"  record {index}: predicted {names[int(predicted[index])]!r} "
          f"(p={float(tf.reduce_max(outputs['probabilities'][index])):.2f}), "
          f"label {names[int(labels[index])]!r}")


if __name__ == "__main__":
  app.run(main)
