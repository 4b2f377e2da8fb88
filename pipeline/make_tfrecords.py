r"""Raw datasets -> sharded TFRecords of tf.train.Example, readable by TFDS.

  python -m pipeline.make_tfrecords            # the demo: draws ./data/shapes_raw,
                                               # converts it to ./data/shapes
  python -m pipeline.make_tfrecords --input=RAW_DIR --output_dir=OUT_DIR
  python -m pipeline.make_tfrecords --source=csv --input=table.csv \
      --label_column=species --output_dir=OUT_DIR
  python -m pipeline.make_tfrecords --source=tfds --input=mnist \
      --tfds_data_dir=~/tensorflow_datasets --output_dir=OUT_DIR
  # the same job on Dataflow: add Beam's own options as Beam users type them
  ... --output_dir=gs://BUCKET/out --runner=DataflowRunner --project=P \
      --region=R --temp_location=gs://BUCKET/tmp

The output dir is a TFDS dataset dir: tfds.builder_from_directory(OUT_DIR)
reads it, and so do pipeline.dataset and the trainers.

The work is `pipeline.convert.convert()`; this module reads the flags.
"""

from __future__ import annotations

import posixpath
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging

from pipeline import demo_data
from pipeline import shard_writer
from pipeline.convert import (DEMO_OUTPUT_DIR, DEMO_RAW_DIR, SOURCES,
                              ConvertConfig, UserError, path_exists, convert,
                              detect_source, format_summary)


_SOURCE = flags.DEFINE_enum("source", None, SOURCES,
                            "Raw format; guessed from --input when unset.")
_INPUT = flags.DEFINE_string(
    "input", None, "Raw data: a folder, a CSV file, or a TFDS name "
    "(--source=tfds). Unset with no --source: the embedded shapes demo.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Where the dataset goes (local or gs://).")
_NAME = flags.DEFINE_string("name", None, "Dataset name in shard file names; "
                            "default: the output dir's name.")
_SPLITS = flags.DEFINE_string(
    "splits", None, "NAME:FRACTION,... for data without its own splits; "
    "default train:0.9,validation:0.1.")
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", None, "Shards per split; default: ~128 MiB each, at least "
    f"{shard_writer.MIN_SHARDS} when there are enough examples.", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_string("image_size", None,
                                  "Resize images: SIZE or HEIGHTxWIDTH.")
_IMAGE_FORMAT = flags.DEFINE_enum("image_format", None, ["jpeg", "png"],
                                  "Re-encode images; default: keep the bytes.")
_COMPRESSION = flags.DEFINE_enum("compression", None, ["GZIP"],
                                 "Compress the shards.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace a dataset already in --output_dir.")
_MAX_BAD_FRACTION = flags.DEFINE_float(
    "max_bad_fraction", 0.01, "Fail when more records than this are bad.",
    lower_bound=0.0, upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the shuffle into shards.")
_LABEL_COLUMN = flags.DEFINE_string("label_column", "label", "CSV label column.")
_TASK = flags.DEFINE_enum("task", None, ["classification", "regression"],
                          "CSV label kind; default: regression for non-integer "
                          "numbers, else classification.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None,
                                     "data_dir of a prepared TFDS dataset.")
_TFDS_SPLITS = flags.DEFINE_list("tfds_splits", [],
                                 "TFDS splits to convert; default: all.")


def parse_splits(text: str) -> tuple:
  splits = []
  for part in text.split(","):
    name, _, fraction = part.partition(":")
    try:
      value = float(fraction)
    except ValueError:
      value = -1.0
    if not re.fullmatch(r"[A-Za-z]\w*", name) or not 0 < value <= 1:
      raise UserError(f"--splits={text}: expected NAME:FRACTION,... with "
                      "fractions in (0, 1], e.g. train:0.9,validation:0.1")
    splits.append((name, value))
  if abs(sum(v for _, v in splits) - 1.0) > 1e-6 or \
      len({n for n, _ in splits}) != len(splits):
    raise UserError(f"--splits={text}: fractions must sum to 1 and names differ")
  return tuple(splits)


def parse_image_size(text: str | None) -> tuple | None:
  if text is None:
    return None
  match = re.fullmatch(r"(\d+)(?:[x,](\d+))?", text)
  if not match or int(match.group(1)) == 0 or match.group(2) == "0":
    raise UserError(f"--image_size={text}: expected SIZE or HEIGHTxWIDTH, e.g. "
                    "64 or 64x48")
  height = int(match.group(1))
  return height, int(match.group(2) or height)


def config_from_flags() -> ConvertConfig:
  """The flags, checked, as a ConvertConfig; writes the demo data if asked."""
  source, input_path, output_dir = _SOURCE.value, _INPUT.value, _OUTPUT_DIR.value
  overwrite = _OVERWRITE.value
  if input_path is None and source is None:
    _, written = demo_data.ensure_shapes(DEMO_RAW_DIR)
    print(f"demo: {'wrote' if written else 'using'} the shapes image folder "
          f"{DEMO_RAW_DIR}")
    input_path, source = DEMO_RAW_DIR, "image_folder"
    if output_dir is None:
      output_dir, overwrite = DEMO_OUTPUT_DIR, True  # our own, regenerable
  if input_path is None:
    raise UserError("--input is required with --source")
  if output_dir is None:
    raise UserError("--output_dir is required with --input")
  if source is None:
    if not path_exists(input_path):
      raise UserError(f"{input_path}: no such file or directory (a TFDS "
                      "dataset name needs --source=tfds)")
    source = detect_source(input_path)
  name = _NAME.value or re.sub(r"\W+", "_", posixpath.basename(
      output_dir.rstrip("/"))).strip("_").lower()
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
    raise UserError(f"--name={name!r}: use lower-case letters, digits and _ "
                    "(it is part of every shard's file name)")
  return ConvertConfig(
      source=source, input=input_path, output_dir=output_dir.rstrip("/"),
      name=name, splits=parse_splits(_SPLITS.value) if _SPLITS.value else None,
      num_shards=_NUM_SHARDS.value,
      image_size=parse_image_size(_IMAGE_SIZE.value),
      image_format=_IMAGE_FORMAT.value, compression=_COMPRESSION.value,
      overwrite=overwrite, max_bad_fraction=_MAX_BAD_FRACTION.value,
      seed=_SEED.value, label_column=_LABEL_COLUMN.value, task=_TASK.value,
      tfds_data_dir=_TFDS_DATA_DIR.value, tfds_splits=tuple(_TFDS_SPLITS.value))


def parse_flags(argv: list) -> list:
  """Our flags via absl; the rest (Beam's) are returned for PipelineOptions."""
  try:
    return flags.FLAGS(argv, known_only=True)
  except flags.Error as error:
    print(f"make_tfrecords: error: {error}", file=sys.stderr)
    sys.exit(2)


def main(argv: list) -> None:
  started = time.monotonic()
  if not flags.FLAGS["verbosity"].present:  # Beam and TFDS log a lot at INFO
    logging.set_verbosity(logging.ERROR)
  try:
    config = config_from_flags()
    summaries = convert(config, beam_args=argv[1:])
  except UserError as error:
    print(f"make_tfrecords: error: {error}", file=sys.stderr)
    sys.exit(1)
  print(format_summary(summaries, time.monotonic() - started, config.output_dir))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
