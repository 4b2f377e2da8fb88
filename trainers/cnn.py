"""Trains an image classifier on a dataset dir from `pipeline.make_tfrecords`.

    python -m trainers.cnn --data_dir=data/shapes --model_dir=runs/shapes
    python -m trainers.cnn --data_dir=... --model_dir=... --preset=smoke
    python -m trainers.cnn --flagfile=cnn.flags --tpu=local

Run it again with the same flags after any stop and it continues where the
last checkpoint left it. Exit codes: 0 done, 42 preempted, 1 bad input.
"""

from absl import flags

from trainers import flags as trainer_flags
from trainers import train_loop
from trainers.config import UserError
from trainers.models import cnn

flags.DEFINE_list("filters", ["32", "64", "128"], "Filters of each "
                  "ConvBlock; each halves the image size.")
flags.DEFINE_integer("dense_units", 128, "Units of the dense layer.",
                     lower_bound=1)
flags.DEFINE_string("image_size", None, "Resize images to HEIGHTxWIDTH (or "
                    "SIZE); required when the dataset's images differ in size.")
FLAGS = flags.FLAGS


def make_model_builder(filters, dense_units, image_size):
  """-> build_model(schema, dtype) for the loop, checking the dataset fits."""

  def build_model(schema, dtype):
    if schema.kind != "image" or schema.class_names is None:
      raise UserError("trainers.cnn needs an image classification dataset "
                      f"(got kind={schema.kind}, classes={schema.class_names})")
    height, width, channels = schema.shape
    if image_size:
      height, width = image_size
    if height is None or width is None:
      raise UserError("the dataset's images differ in size: pass "
                      "--image_size=HEIGHTxWIDTH")
    return cnn.build_cnn((height, width, channels), len(schema.class_names),
                         filters=filters, dense_units=dense_units, dtype=dtype)

  return build_model


def main(argv):
  del argv
  try:
    filters = tuple(int(value) for value in FLAGS.filters)
  except ValueError as error:
    raise UserError(f"--filters={','.join(FLAGS.filters)}: {error}") from error
  image_size = trainer_flags.parse_image_size(FLAGS.image_size)
  config = trainer_flags.config_from_flags(image_size=image_size)
  train_loop.train_and_evaluate(
      config, make_model_builder(filters, FLAGS.dense_units, image_size))


if __name__ == "__main__":
  trainer_flags.run(main)
