"""Shared fixtures: small dataset dirs in the converter's format.

`write_dataset` writes shards with `pipeline.records` and metadata with
`pipeline.metadata`, exactly as the converter lays them out, so reader and
trainer tests do not need to run the Beam job.
"""

import io
import os

# Keep test logs readable and TF on the CPU we have.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from pipeline import metadata
from pipeline import records


def png_bytes(array: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  image = array[..., 0] if array.shape[-1] == 1 else array
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def write_dataset(data_dir, schema, examples, num_shards=4, name="toy",
                  compression=None):
  """examples: split -> list of (key, inputs, label). Round-robin shards."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  os.makedirs(data_dir, exist_ok=True)
  options = tf.io.TFRecordOptions(compression_type=compression or "")
  splits = {}
  for split, split_examples in examples.items():
    lengths, num_bytes = [], 0
    for shard in range(num_shards):
      path = metadata.shard_path(data_dir, name, split, shard, num_shards)
      with tf.io.TFRecordWriter(path, options) as writer:
        count = 0
        for key, inputs, label in split_examples[shard::num_shards]:
          writer.write(records.make_example(schema, key, inputs, label))
          count += 1
      lengths.append(count)
      num_bytes += os.path.getsize(path)
    splits[split] = (lengths, num_bytes)
  metadata.write(str(data_dir), schema, splits, compression=compression)
  return str(data_dir)


def make_image_examples(count, height=8, width=8, channels=3, num_classes=3,
                        seed=0, prefix="img"):
  """Random PNGs whose label is readable from the pixels (mean brightness)."""
  rng = np.random.default_rng(seed)
  examples = []
  for index in range(count):
    label = index % num_classes
    base = 40 + 80 * label
    pixels = rng.integers(base, base + 40, size=(height, width, channels),
                          dtype=np.uint8)
    examples.append((f"{prefix}{index:05d}", png_bytes(pixels), label))
  return examples


@pytest.fixture(scope="session")
def image_dataset_dir(tmp_path_factory):
  """3-class 8x8 RGB PNGs: 100 train, 30 validation, 4 shards each."""
  schema = records.Schema(kind="image", shape=(8, 8, 3),
                          class_names=("dark", "mid", "bright"),
                          image_format="png")
  return write_dataset(
      tmp_path_factory.mktemp("images"), schema, {
          "train": make_image_examples(100, prefix="train"),
          "validation": make_image_examples(30, seed=1, prefix="val"),
      })


@pytest.fixture(scope="session")
def vector_dataset_dir(tmp_path_factory):
  """Regression: y = 2*x0 - x1 + 0.5 over 3 float columns; 200/50 split."""
  rng = np.random.default_rng(0)
  schema = records.Schema(kind="vector", shape=(3,),
                          feature_names=("x0", "x1", "x2"))

  def rows(count, prefix):
    values = rng.normal(size=(count, 3)).astype(np.float32)
    target = 2 * values[:, 0] - values[:, 1] + 0.5
    return [(f"{prefix}{i}", values[i].tolist(), float(target[i]))
            for i in range(count)]

  return write_dataset(tmp_path_factory.mktemp("vectors"), schema, {
      "train": rows(200, "train"), "validation": rows(50, "val")})
