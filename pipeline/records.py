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
#
# The converter encodes every example here, so this is its inner loop: each
# feature map entry is built as a short header plus its payload (an image's
# bytes) and the record is joined once, so an image is copied once rather
# than once per level of nesting (2x faster than nesting whole messages).


_SMALL_VARINTS = tuple(bytes((value,)) for value in range(128))


def _varint(value: int) -> bytes:
  if 0 <= value < 128:  # tags, short lengths, most labels: the common case
    return _SMALL_VARINTS[value]
  if 0 < value < 16384:  # the lengths of small images
    return bytes(((value & 0x7F) | 0x80, value >> 7))
  if value < 0:
    value += 1 << 64  # int64 negatives are 10-byte two's complement varints
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


# Tags of length-delimited fields 1, 2, 3 (field << 3 | wire type 2): in a
# Feature, bytes_list / float_list / int64_list; elsewhere the first fields.
_FIELD_1, _FIELD_2, _FIELD_3 = b"\x0a", b"\x12", b"\x1a"


@functools.lru_cache(maxsize=1024)
def _map_key(name: str) -> bytes:
  """A feature map entry's key field; the same few names in every record."""
  encoded = name.encode()
  return _FIELD_1 + _varint(len(encoded)) + encoded


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
  return tag + _varint(len(payload)) + payload


def _list_feature(value) -> bytes:
  """A whole `tf.train.Feature` of a list (or a float): bytes/str, int or
  float values, all of one kind."""
  values = value if isinstance(value, (list, tuple)) else [value]
  if not values:  # TF writes no packed field at all for an empty list
    return _length_delimited(_FIELD_2, b"")
  first = values[0]
  if isinstance(first, (bytes, str)):
    items = b"".join(
        _length_delimited(_FIELD_1, v.encode() if isinstance(v, str) else v)
        for v in values)
    return _length_delimited(_FIELD_1, items)  # BytesList
  if isinstance(first, int) and not isinstance(first, bool):
    packed = b"".join(_varint(int(v)) for v in values)
    return _length_delimited(_FIELD_3, _length_delimited(_FIELD_1, packed))
  packed = struct.pack(f"<{len(values)}f", *values)
  return _length_delimited(_FIELD_2, _length_delimited(_FIELD_1, packed))


def _bytes_entry(key_field: bytes, payload: bytes) -> bytes:
  """The header of a feature map entry holding one bytes value; the value
  itself follows it in the record."""
  size = len(payload)
  values = _FIELD_1 + _varint(size)  # BytesList.value
  feature = _FIELD_1 + _varint(len(values) + size) + values  # Feature.bytes_list
  entry = key_field + _FIELD_2 + _varint(len(feature) + size) + feature
  return _FIELD_1 + _varint(len(entry) + size) + entry


@functools.lru_cache(maxsize=4096)
def _list_entry(name: str, value) -> bytes:
  """A whole feature map entry; cached for the ints (labels) that repeat."""
  entry = _map_key(name) + _length_delimited(_FIELD_2, _list_feature(value))
  return _length_delimited(_FIELD_1, entry)


def _entry(name: str, value) -> tuple:
  """A feature map entry as (header, payload): the payload is a lone bytes
  value (an image), left uncopied until the record is joined."""
  if isinstance(value, bytes):
    return _bytes_entry(_map_key(name), value), value
  if isinstance(value, str):
    payload = value.encode()
    return _bytes_entry(_map_key(name), payload), payload
  if type(value) is int:  # pylint: disable=unidiomatic-typecheck (not bool)
    return _list_entry(name, value), b""
  return _list_entry.__wrapped__(name, value), b""  # lists: not cached


def _join(entries) -> bytes:
  """An Example from its feature map entries, (header, payload) each."""
  parts = [part for entry in entries for part in entry]
  return b"".join((_FIELD_1, _varint(sum(map(len, parts))), *parts))


def encode_example(features: dict) -> bytes:
  """Serialises {name: bytes | str | int | float | list} as a tf.train.Example.

  Keys are written in sorted order, so equal inputs give equal bytes (the
  converter's determinism rests on this), the bytes TF's own deterministic
  serialisation gives. Python ints become int64, floats float32, bytes/str a
  BytesList.
  """
  return _join(_entry(name, features[name]) for name in sorted(features))


def make_example(schema: Schema, key: str, inputs, label) -> bytes:
  """One record of `schema`: `inputs` is encoded image bytes or a float list.

  The converter's per-example call: the same bytes as encode_example, with
  the keys in their sorted order written out.
  """
  label = _entry(LABEL_KEY, float(label) if schema.class_names is None
                 else int(label))
  if schema.kind == "image":  # "id" < "image" < "label"
    return _join((_entry(ID_KEY, key), _entry(IMAGE_KEY, inputs), label))
  # "features" < "id" < "label"
  return _join((_entry(FEATURES_KEY, list(inputs)), _entry(ID_KEY, key), label))


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
  image, shape = _decode_unshaped(encoded, schema, image_size)
  return tf.ensure_shape(image, shape)


def decode_pixels(encoded, schema: Schema):
  """Encoded bytes -> uint8 [h, w, C] as stored: the decode that can fail on
  bad bytes, before any resize or shape check."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.decode_image(encoded, channels=schema.shape[-1],
                            expand_animations=False)


def _decode_unshaped(encoded, schema: Schema, image_size=None):
  """(image of unknown static shape, the shape it must have)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  height, width, channels = schema.shape
  image = decode_pixels(encoded, schema)
  if image_size is not None and tuple(image_size) != (height, width):
    image = tf.image.resize(image, image_size, antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    height, width = image_size
  if height is None or width is None:
    raise ValueError("images differ in size: pass image_size=(height, width)")
  return image, (height, width, channels)


# Largest static batch whose images are decoded by one op each (see
# parse_batch); bigger ones use a loop, which keeps graphs small.
UNROLL_MAX_BATCH = 1024


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
    images = parsed[IMAGE_KEY]
    batch_size = images.shape[0]
    if batch_size is not None and 0 < batch_size <= UNROLL_MAX_BATCH:
      # A static batch (training, drop_remainder) is decoded by one op per
      # image, which tf.data runs in parallel, not by map_fn's sequential
      # loop: 1.45x the examples/s on 32x32 JPEGs (bench/input.py). The
      # shape is checked once for the batch: an op per image costs ~5%.
      decoded = [_decode_unshaped(encoded, schema, image_size) for encoded in
                 tf.unstack(images, num=batch_size)]
      inputs = tf.ensure_shape(tf.stack([image for image, _ in decoded]),
                               (batch_size,) + decoded[0][1])
    else:
      height, width, channels = schema.shape
      if image_size is not None:
        height, width = image_size
      inputs = tf.map_fn(
          lambda encoded: decode_image(encoded, schema, image_size), images,
          fn_output_signature=tf.TensorSpec((height, width, channels),
                                            tf.uint8))
  else:
    inputs = parsed[FEATURES_KEY]
  return (inputs, parsed[LABEL_KEY]) if with_label else inputs
