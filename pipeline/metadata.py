"""Dataset metadata: the TFDS files that make an output dir a dataset.

The converter writes, after every shard is in place, the TFDS metadata
(`dataset_info.json`, `features.json`, `metadata.json`) with
`tfds.folder_dataset.write_metadata`; the reader and the trainers read it back
into a plain `DatasetInfo`. Metadata is written last, so a dir without it is a
run that did not finish, and `read()` refuses it.

Our own facts that TFDS has no field for (CSV column names, compression,
format version) live in TFDS's free-form `metadata.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os

from absl import logging

from pipeline import records

FORMAT_VERSION = 1
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
INFO_FILE = "dataset_info.json"
EXTRA_FILE = "metadata.json"


@dataclasses.dataclass(frozen=True)
class Split:
  name: str
  files: tuple  # full paths, in shard order
  shard_lengths: tuple  # examples per file, same order

  @property
  def num_examples(self) -> int:
    return sum(self.shard_lengths)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  data_dir: str
  schema: records.Schema
  splits: dict  # split name -> Split
  compression: str | None = None  # None or "GZIP"


def shard_path(data_dir: str, name: str, split: str, index: int,
               num_shards: int) -> str:
  """TFDS file naming: NAME-SPLIT.tfrecord-00003-of-00016."""
  return os.path.join(
      data_dir,
      f"{name}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}")


def _tfds_features(schema: records.Schema):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if schema.kind == "image":
    inputs = tfds.features.Image(
        shape=schema.shape,
        encoding_format=schema.image_format
        if schema.image_format in ("png", "jpeg") else None)
  else:
    inputs = tfds.features.Tensor(shape=schema.shape, dtype=np.float32)
  if schema.is_regression:
    label = tfds.features.Scalar(dtype=np.float32)
  else:
    label = tfds.features.ClassLabel(names=list(schema.class_names))
  return tfds.features.FeaturesDict({
      schema.input_key: inputs,
      records.LABEL_KEY: label,
      records.ID_KEY: tfds.features.Text(),
  })


def write(data_dir: str, schema: records.Schema, splits: dict,
          compression: str | None = None, description: str = "") -> None:
  """Writes TFDS metadata for shards already in `data_dir`.

  splits: split name -> (shard_lengths list, num_bytes).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split_infos = [
      tfds.core.SplitInfo(name=name, shard_lengths=list(lengths),
                          num_bytes=int(num_bytes))
      for name, (lengths, num_bytes) in sorted(splits.items())
  ]
  extra = tfds.core.MetadataDict(
      format_version=FORMAT_VERSION,
      compression=compression,
      feature_names=list(schema.feature_names),
  )
  tfds.folder_dataset.write_metadata(
      data_dir=data_dir,
      features=_tfds_features(schema),
      split_infos=split_infos,
      filename_template=FILE_TEMPLATE,
      # TFDS would read one example back to check, importing TensorFlow
      # (~3 s, a third of a 100k-image conversion that needs TF nowhere
      # else). tests/test_records.py and the converter's tests do that round
      # trip instead.
      check_data=False,
      description=description,
      metadata=extra,
  )


def _schema_from_tfds(features, extra: dict) -> records.Schema:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if records.IMAGE_KEY in features:
    image = features[records.IMAGE_KEY]
    kind, shape = "image", tuple(image.shape)
    image_format = getattr(image, "encoding_format", None)
  elif records.FEATURES_KEY in features:
    kind, shape = "vector", tuple(features[records.FEATURES_KEY].shape)
    image_format = None
  else:
    raise ValueError(
        f"features {sorted(features.keys())} have neither "
        f"'{records.IMAGE_KEY}' nor '{records.FEATURES_KEY}'")
  if records.LABEL_KEY not in features:
    raise ValueError(f"features {sorted(features.keys())} have no "
                     f"'{records.LABEL_KEY}'")
  label = features[records.LABEL_KEY]
  class_names = (tuple(label.names)
                 if isinstance(label, tfds.features.ClassLabel) else None)
  return records.Schema(kind=kind, shape=shape, class_names=class_names,
                        feature_names=tuple(extra.get("feature_names") or ()),
                        image_format=image_format)


def read(data_dir: str) -> DatasetInfo:
  """Reads a dataset dir written by the converter (or any TFDS dataset dir).

  Raises FileNotFoundError/ValueError with the path in the message when the
  metadata is missing or incomplete, or when a shard it lists is missing.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(os.path.join(data_dir, INFO_FILE)):
    raise FileNotFoundError(
        f"{data_dir}: no {INFO_FILE}; not a dataset dir, or its conversion "
        "did not finish (metadata is written last)")
  absl_logger = logging.get_absl_logger()
  level = absl_logger.level
  # TFDS logs each load at INFO. A Python level: absl's logging.WARNING is
  # its verbosity -1, which as a logger level would let everything through.
  absl_logger.setLevel(std_logging.WARNING)
  try:
    info = tfds.builder_from_directory(data_dir).info  # read here, quietly
  except Exception as error:  # TFDS raises many types for a bad dir.
    raise ValueError(f"{data_dir}: unreadable dataset metadata: {error}") \
        from error
  finally:
    absl_logger.setLevel(level)
  extra = {}
  extra_path = os.path.join(data_dir, EXTRA_FILE)
  if tf.io.gfile.exists(extra_path):
    with tf.io.gfile.GFile(extra_path) as f:
      extra = json.load(f)
  schema = _schema_from_tfds(info.features, extra)
  splits = {}
  for name, split_info in info.splits.items():
    files = tuple(os.fspath(p) for p in split_info.filepaths)
    lengths = tuple(int(n) for n in split_info.shard_lengths)
    if len(files) != len(lengths):
      raise ValueError(f"{data_dir}: split {name} lists {len(files)} files "
                       f"but {len(lengths)} shard lengths")
    missing = [f for f in files if not tf.io.gfile.exists(f)]
    if missing:
      raise FileNotFoundError(
          f"{data_dir}: split {name} is missing {len(missing)} of "
          f"{len(files)} shards, e.g. {missing[0]}")
    splits[name] = Split(name=name, files=files, shard_lengths=lengths)
  return DatasetInfo(name=info.name, data_dir=data_dir, schema=schema,
                     splits=splits, compression=extra.get("compression"))
