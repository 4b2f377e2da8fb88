"""The record format: one home for writing and parsing our `tf.train.Example`s.

Every record the converter writes and every record the reader parses goes
through this module, so the two cannot drift apart. The layout is the one
TFDS uses for the same features, which is what lets
`tfds.builder_from_directory(OUTPUT_DIR)` read our shards:

  image datasets   "image": bytes  (encoded JPEG/PNG/GIF/BMP, kept as given)
  tabular datasets "features": float32[n]
  all              "label": int64 class id, or float32 target (regression)
                   "id": bytes, the example's source key ("cat/001.jpg",
                         "train-images-idx3-ubyte:17", "data.csv:42")

Writing is pure Python on purpose: a Beam worker that imports TensorFlow pays
~3 s and ~0.5 GB before it converts anything, and the Example wire format is
small and stable. TensorFlow is imported only by the parsing functions, which
run in the reader and the trainers. `tests/test_records.py` checks that TF
parses what we encode.
"""

from __future__ import annotations

import dataclasses
import functools
import struct

IMAGE_KEY = "image"
FEATURES_KEY = "features"
LABEL_KEY = "label"
ID_KEY = "id"


@dataclasses.dataclass(frozen=True)
class Schema:
  """What one example holds; stored in the dataset metadata.

  kind: "image" or "vector".
  shape: (height, width, channels) for images, height/width None when the
    images differ in size; (num_features,) for vectors.
  class_names: the label's classes, or None for a regression target.
  feature_names: column names of a vector dataset (CSV header), else ().
  image_format: "jpeg", "png", ... when every image has that encoding, else None.
  """
  kind: str
  shape: tuple
  class_names: tuple | None = None
  feature_names: tuple = ()
  image_format: str | None = None

  @property
  def input_key(self) -> str:
    return IMAGE_KEY if self.kind == "image" else FEATURES_KEY

  @property
  def num_classes(self) -> int | None:
    return None if self.class_names is None else len(self.class_names)

  @property
  def is_regression(self) -> bool:
    return self.class_names is None


# --- writing (no TensorFlow) -------------------------------------------------


_SMALL_VARINTS = tuple(bytes((value,)) for value in range(128))


def _varint(value: int) -> bytes:
  if 0 <= value < 128:  # tags, short lengths, most labels: the common case
    return _SMALL_VARINTS[value]
  if value < 0:
    value += 1 << 64  # int64 negatives are 10-byte two's complement varints
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


# Tags of length-delimited fields 1, 2, 3 (field << 3 | wire type 2).
_TAGS = {1: b"\x0a", 2: b"\x12", 3: b"\x1a"}


def _length_delimited(field_number: int, payload: bytes) -> bytes:
  return _TAGS[field_number] + _varint(len(payload)) + payload


@functools.lru_cache(maxsize=1024)
def _map_key(name: str) -> bytes:
  """A feature map entry's key field; the same few names in every record."""
  return _length_delimited(1, name.encode())


def _feature(value) -> bytes:
  """Encodes one `tf.train.Feature`: bytes, int, float, or a list of one kind."""
  values = value if isinstance(value, (list, tuple)) else [value]
  first = values[0] if values else 0.0
  if isinstance(first, (bytes, str)):
    items = b"".join(
        _length_delimited(1, v.encode() if isinstance(v, str) else v)
        for v in values)
    return _length_delimited(1, items)  # BytesList
  if isinstance(first, int) and not isinstance(first, bool):
    packed = b"".join(_varint(int(v)) for v in values)
    return _length_delimited(3, _length_delimited(1, packed))  # Int64List
  packed = struct.pack(f"<{len(values)}f", *values)
  return _length_delimited(2, _length_delimited(1, packed))  # FloatList


def encode_example(features: dict) -> bytes:
  """Serialises {name: bytes | str | int | float | list} as a tf.train.Example.

  Keys are written in sorted order, so equal inputs give equal bytes (the
  converter's determinism rests on this). Python ints become int64, floats
  float32, bytes/str a BytesList.
  """
  entries = b"".join(
      _length_delimited(1, _map_key(name) +
                        _length_delimited(2, _feature(features[name])))
      for name in sorted(features))
  return _length_delimited(1, entries)


def make_example(schema: Schema, key: str, inputs, label) -> bytes:
  """One record of `schema`: `inputs` is encoded image bytes or a float list."""
  label = float(label) if schema.is_regression else int(label)
  return encode_example({
      schema.input_key: inputs if schema.kind == "image" else list(inputs),
      LABEL_KEY: label,
      ID_KEY: key,
  })


# --- parsing (TensorFlow) ----------------------------------------------------


def parse_spec(schema: Schema, with_id: bool = False) -> dict:
  """The `tf.io.parse_example` spec for `schema`'s records."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if schema.kind == "image":
    spec = {IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)}
  else:
    spec = {FEATURES_KEY: tf.io.FixedLenFeature(schema.shape, tf.float32)}
  spec[LABEL_KEY] = tf.io.FixedLenFeature(
      [], tf.float32 if schema.is_regression else tf.int64)
  if with_id:
    spec[ID_KEY] = tf.io.FixedLenFeature([], tf.string)
  return spec


def decode_image(encoded, schema: Schema, image_size=None):
  """Encoded bytes -> uint8 [H, W, C] with a static shape.

  `image_size` (height, width) resizes; it is required when the dataset's
  images differ in size (schema.shape has None), since batches need one shape.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  height, width, channels = schema.shape
  image = tf.io.decode_image(encoded, channels=channels,
                             expand_animations=False)
  if image_size is not None and tuple(image_size) != (height, width):
    image = tf.image.resize(image, image_size, antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    height, width = image_size
  if height is None or width is None:
    raise ValueError("images differ in size: pass image_size=(height, width)")
  return tf.ensure_shape(image, (height, width, channels))


def parse_batch(serialized, schema: Schema, image_size=None,
                with_label: bool = True):
  """Serialized Examples [B] -> (inputs, labels), or inputs alone.

  What the reader feeds the model and what the export's serving signature
  computes, so training and serving see the same pixels. Images are parsed as
  a batch (several times cheaper than per record) and decoded one by one
  into uint8 [B, H, W, C]; vectors are float32 [B, n].
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = parse_spec(schema)
  if not with_label:  # examples sent for prediction need not have one
    spec.pop(LABEL_KEY)
  parsed = tf.io.parse_example(serialized, spec)
  if schema.kind == "image":
    height, width, channels = schema.shape
    if image_size is not None:
      height, width = image_size
    inputs = tf.map_fn(
        lambda encoded: decode_image(encoded, schema, image_size),
        parsed[IMAGE_KEY],
        fn_output_signature=tf.TensorSpec((height, width, channels), tf.uint8))
  else:
    inputs = parsed[FEATURES_KEY]
  return (inputs, parsed[LABEL_KEY]) if with_label else inputs
