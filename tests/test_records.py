"""The record format round-trips: our encoder, TF's parser, TFDS's reader."""

import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from pipeline import metadata
from pipeline import records


@pytest.mark.parametrize("features", [
    {"a": b"bytes", "b": 3, "c": 1.5},
    {"ints": [0, -1, 2**40, -(2**63)], "floats": [0.25, -2.0, 1e30],
     "strings": ["x", "", "long" * 100]},
    {"empty_floats": []},
])
def test_encode_example_parses_like_tf_train_example(features):
  ours = tf.train.Example.FromString(records.encode_example(features))
  for name, value in features.items():
    feature = ours.features.feature[name]
    values = value if isinstance(value, list) else [value]
    kind = feature.WhichOneof("kind")
    if kind == "bytes_list":
      assert list(feature.bytes_list.value) == [
          v.encode() if isinstance(v, str) else v for v in values]
    elif kind == "int64_list":
      assert list(feature.int64_list.value) == values
    else:
      np.testing.assert_allclose(feature.float_list.value,
                                 np.float32(values), rtol=1e-7)


@pytest.mark.parametrize("schema,inputs,label", [
    (records.Schema("image", (8, 8, 3), ("a", "b")), b"\xff\xd8" * 900, 1),
    (records.Schema("image", (8, 8, 3), tuple("abc")), b"png", 2),
    (records.Schema("vector", (3,), ("a", "b")), [0.5, -1.0, 3.0], 0),
    (records.Schema("vector", (2,)), (1e-3, 7.0), -2.5),
])
def test_make_example_is_tfs_own_deterministic_serialisation(schema, inputs,
                                                              label):
  key = "class/é" * 30  # a non-ASCII key over 127 bytes: two-byte varints
  if schema.kind == "image":
    input_feature = tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[inputs]))
  else:
    input_feature = tf.train.Feature(float_list=tf.train.FloatList(
        value=inputs))
  label_feature = (tf.train.Feature(float_list=tf.train.FloatList(
      value=[label])) if schema.is_regression else
                   tf.train.Feature(int64_list=tf.train.Int64List(
                       value=[label])))
  theirs = tf.train.Example(features=tf.train.Features(feature={
      schema.input_key: input_feature, records.LABEL_KEY: label_feature,
      records.ID_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[key.encode()]))}))
  assert (records.make_example(schema, key, inputs, label) ==
          theirs.SerializeToString(deterministic=True))


def test_encode_example_is_deterministic_whatever_the_key_order():
  one = records.encode_example({"a": 1, "b": b"x"})
  two = records.encode_example({"b": b"x", "a": 1})
  assert one == two


def test_parse_spec_eagerly_and_in_dataset_map(image_dataset_dir):
  info = metadata.read(image_dataset_dir)
  spec = records.parse_spec(info.schema, with_id=True)
  serialized = list(tf.data.TFRecordDataset(
      info.splits["train"].files[0]).take(4).as_numpy_iterator())
  eager = tf.io.parse_example(serialized, spec)

  def parse_and_decode(batch):
    parsed = tf.io.parse_example(batch, spec)
    images = tf.map_fn(lambda x: records.decode_image(x, info.schema),
                       parsed["image"], fn_output_signature=tf.uint8)
    return images, parsed["label"], parsed["id"]

  images, labels, ids = next(iter(
      tf.data.Dataset.from_tensor_slices(serialized).batch(4)
      .map(parse_and_decode)))
  assert images.shape == (4, 8, 8, 3) and images.dtype == tf.uint8
  np.testing.assert_array_equal(labels, eager["label"])
  np.testing.assert_array_equal(ids, eager["id"])
  eager_image = records.decode_image(eager["image"][0], info.schema)
  np.testing.assert_array_equal(images[0], eager_image)


def test_tfds_reads_every_example_we_wrote(image_dataset_dir):
  builder = tfds.builder_from_directory(image_dataset_dir)
  assert builder.info.features["label"].names == ["dark", "mid", "bright"]
  examples = list(builder.as_dataset(split="validation").as_numpy_iterator())
  assert len(examples) == 30
  assert sorted(e["id"].decode() for e in examples) == [
      f"val{i:05d}" for i in range(30)]
  # Brightness encodes the label in the fixture: decoded pixels agree.
  for example in examples:
    assert example["image"].shape == (8, 8, 3)
    assert 40 + 80 * example["label"] <= example["image"].mean() < (
        80 + 80 * example["label"])


def test_metadata_read_back(image_dataset_dir, vector_dataset_dir):
  info = metadata.read(image_dataset_dir)
  assert info.name == "toy"
  assert info.schema == records.Schema(
      kind="image", shape=(8, 8, 3), class_names=("dark", "mid", "bright"),
      image_format="png")
  assert info.splits["train"].num_examples == 100
  assert len(info.splits["train"].files) == 4
  vectors = metadata.read(vector_dataset_dir)
  assert vectors.schema.is_regression
  assert vectors.schema.feature_names == ("x0", "x1", "x2")
  assert vectors.schema.shape == (3,)


def test_metadata_read_errors_name_the_path(tmp_path, image_dataset_dir):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    metadata.read(str(tmp_path))


def test_parse_batch_is_the_same_static_dynamic_and_without_labels(
    image_dataset_dir):
  info = metadata.read(image_dataset_dir)
  serialized = tf.constant(list(tf.data.TFRecordDataset(
      info.splits["train"].files[0]).take(5).as_numpy_iterator()))
  # A static batch decodes image by image, a dynamic one in a loop.
  images, labels = records.parse_batch(serialized, info.schema)
  assert serialized.shape[0] is not None
  dynamic = tf.data.Dataset.from_tensor_slices(serialized).batch(5)
  assert dynamic.element_spec.shape[0] is None
  mapped_images, mapped_labels = next(iter(dynamic.map(
      lambda batch: records.parse_batch(batch, info.schema))))
  np.testing.assert_array_equal(images, mapped_images)
  np.testing.assert_array_equal(labels, mapped_labels)
  assert images.shape == (5, 8, 8, 3) and images.dtype == tf.uint8
  resized = records.parse_batch(serialized, info.schema, image_size=(4, 6),
                                with_label=False)
  assert resized.shape == (5, 4, 6, 3)


def test_metadata_read_keeps_tfds_info_logs_out_and_restores_the_level(
    image_dataset_dir, caplog):
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  with caplog.at_level(logging.INFO, logger="absl"):
    metadata.read(image_dataset_dir)
    absl_logging.info("ours, after the read")
  messages = [record.getMessage() for record in caplog.records]
  assert not [m for m in messages if "dataset info" in m], messages
  assert "ours, after the read" in messages
