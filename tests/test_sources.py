"""Each raw format, converted for real (Beam, in-process) from files written here.

Every test writes a few raw files in the real format, runs the converter and
reads the result back with TFDS: the examples, labels, class names and shapes
must be what was written, and bad records must land in the dead-letter file.
"""

import contextlib
import csv
import gzip
import io
import json
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from pipeline import convert as convert_lib
from pipeline import metadata
from pipeline import shard_writer
from pipeline.sources import common
from pipeline.sources import image_folder


def convert(input_path, output_dir, **kwargs):
  config = convert_lib.ConvertConfig(
      source=kwargs.pop("source"), input=str(input_path),
      output_dir=str(output_dir), name="toy", **kwargs)
  return {s.name: s for s in convert_lib.convert(config)}


def read_back(output_dir, split, decode=True):
  """All examples of a split via TFDS, as a list of numpy dicts."""
  builder = tfds.builder_from_directory(str(output_dir))
  decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
  return list(builder.as_dataset(split=split, decoders=decoders)
              .as_numpy_iterator())


def dead_letter(output_dir):
  path = os.path.join(output_dir, convert_lib.DEAD_LETTER_FILE)
  with open(path) as f:
    return [json.loads(line) for line in f]


def encode(pixels, image_format, **options):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=image_format, **options)
  return buffer.getvalue()


# --- image headers -----------------------------------------------------------


@pytest.mark.parametrize("image_format,mode,channels", [
    ("JPEG", "RGB", 3), ("JPEG", "L", 1), ("PNG", "RGBA", 4), ("PNG", "L", 1),
    ("GIF", "P", 1), ("BMP", "RGB", 3)])
def test_inspect_image_reads_size_and_channels(image_format, mode, channels):
  pixels = np.random.default_rng(0).integers(0, 255, (7, 5, 4), np.uint8)
  image = Image.fromarray(pixels, "RGBA").convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format=image_format)
  height, width, found_channels, found_format = image_folder.inspect_image(
      buffer.getvalue())
  assert (height, width) == (7, 5)
  assert found_format == image_format.lower()
  if image_format in ("JPEG", "PNG"):
    assert found_channels == channels


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"hello, not an image", "not an image"),
    ("jpeg_truncated", "truncated JPEG"),
    ("png_truncated", "truncated PNG"),
])
def test_inspect_image_rejects_bad_bytes(data, reason):
  pixels = np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)
  if data == "jpeg_truncated":
    data = encode(pixels, "JPEG")[:-200]
  elif data == "png_truncated":
    data = encode(pixels, "PNG")[:-30]
  with pytest.raises(ValueError, match=reason):
    image_folder.inspect_image(data)


def test_tfrecord_frame_is_read_by_tf_data(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = tmp_path / "records"
  payloads = [b"", b"x", os.urandom(10_000)]
  path.write_bytes(b"".join(shard_writer.tfrecord_frame(p) for p in payloads))
  assert list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator()) == payloads


def test_split_assignment_is_stable_and_near_the_fractions():
  splits = (("train", 0.8), ("validation", 0.2))
  keys = [f"class/{i}.jpg" for i in range(5000)]
  first = [shard_writer.assign_split(k, splits) for k in keys]
  assert first == [shard_writer.assign_split(k, splits) for k in keys]
  assert 0.17 < first.count("validation") / len(keys) < 0.23


def test_plan_shards_ignores_input_order_and_mixes_classes():
  items = [common.Item(f"c{i // 100}/{i}", None) for i in range(1000)]
  shards = shard_writer.plan_shards(items, 4, seed=0)
  reversed_shards = shard_writer.plan_shards(items[::-1], 4, seed=0)
  assert shards == reversed_shards
  assert sorted(i.key for s in shards for i in s) == sorted(i.key for i in items)
  first_keys = [item.key.split("/")[0] for item in shards[0][:20]]
  assert len(set(first_keys)) > 3  # not sorted by class
  assert shard_writer.plan_shards(items, 4, seed=1) != shards


# --- image folders -----------------------------------------------------------


def write_image_folder(root, classes=("cat", "dog"), per_class=6, size=(12, 10),
                       image_format="JPEG", split=None):
  rng = np.random.default_rng(len(str(root)))
  for class_name in classes:
    directory = os.path.join(root, *(split,) if split else (), class_name)
    os.makedirs(directory, exist_ok=True)
    for index in range(per_class):
      pixels = rng.integers(0, 255, (*size, 3), np.uint8)
      with open(os.path.join(directory, f"{index}.{image_format.lower()}"),
                "wb") as f:
        f.write(encode(pixels, image_format))


def test_image_folder_keeps_bytes_and_class_names(tmp_path):
  write_image_folder(tmp_path / "raw", classes=("cat", "dog", "emu"))
  summaries = convert(tmp_path / "raw", tmp_path / "out", source="image_folder",
                      splits=(("train", 0.5), ("validation", 0.5)), num_shards=2)
  examples = (read_back(tmp_path / "out", "train", decode=False) +
              read_back(tmp_path / "out", "validation", decode=False))
  assert len(examples) == 18
  assert summaries["train"].num_examples + summaries["validation"].num_examples == 18
  builder = tfds.builder_from_directory(str(tmp_path / "out"))
  assert builder.info.features["label"].names == ["cat", "dog", "emu"]
  assert builder.info.features["image"].shape == (12, 10, 3)
  for example in examples:
    key = example["id"].decode()
    assert (tmp_path / "raw" / key).read_bytes() == example["image"]
    assert example["label"] == ["cat", "dog", "emu"].index(key.split("/")[0])


def test_image_folder_with_split_folders_keeps_them(tmp_path):
  write_image_folder(tmp_path / "raw", split="train", per_class=5)
  write_image_folder(tmp_path / "raw", split="test", per_class=2)
  summaries = convert(tmp_path / "raw", tmp_path / "out", source="image_folder")
  assert {k: v.num_examples for k, v in summaries.items()} == {"test": 4,
                                                                 "train": 10}
  assert all(e["id"].startswith(b"test/")
             for e in read_back(tmp_path / "out", "test"))


def test_image_folder_of_mixed_sizes_has_unknown_height_and_width(tmp_path):
  write_image_folder(tmp_path / "raw", classes=("a",), size=(8, 8), per_class=3,
                     image_format="PNG")
  write_image_folder(tmp_path / "raw", classes=("b",), size=(9, 7), per_class=3,
                     image_format="PNG")
  convert(tmp_path / "raw", tmp_path / "out", source="image_folder",
          splits=(("train", 1.0),))
  builder = tfds.builder_from_directory(str(tmp_path / "out"))
  assert builder.info.features["image"].shape == (None, None, 3)
  shapes = {e["image"].shape for e in read_back(tmp_path / "out", "train")}
  assert shapes == {(8, 8, 3), (9, 7, 3)}


def test_image_folder_keeps_large_files_whole_and_mixed_formats_apart(
    tmp_path):
  # A noise PNG of ~270 KB takes several read calls; the JPEG after it in
  # the same shard differs in size, format and channels.
  rng = np.random.default_rng(1)
  (tmp_path / "raw" / "a").mkdir(parents=True)
  big = encode(rng.integers(0, 255, (300, 300, 3), np.uint8), "PNG")
  assert len(big) > 4 * image_folder._READ_BYTES
  (tmp_path / "raw" / "a" / "big.png").write_bytes(big)
  (tmp_path / "raw" / "a" / "small.jpg").write_bytes(
      encode(rng.integers(0, 255, (8, 8), np.uint8), "JPEG"))
  (tmp_path / "raw" / ".DS_Store").write_bytes(b"not a dataset file")
  assert convert_lib.detect_source(str(tmp_path / "raw")) == "image_folder"
  convert(tmp_path / "raw", tmp_path / "out", source="image_folder",
          splits=(("train", 1.0),), num_shards=1)
  by_key = {e["id"].decode(): e["image"]
            for e in read_back(tmp_path / "out", "train", decode=False)}
  assert by_key["a/big.png"] == big
  assert by_key["a/small.jpg"] == (tmp_path / "raw/a/small.jpg").read_bytes()
  schema = metadata.read(str(tmp_path / "out")).schema
  assert schema.image_format is None and schema.shape == (None, None, 3)


def test_image_size_resizes_and_reencodes(tmp_path):
  write_image_folder(tmp_path / "raw", size=(20, 30))
  convert(tmp_path / "raw", tmp_path / "out", source="image_folder",
          splits=(("train", 1.0),), image_size=(8, 6), image_format="png")
  builder = tfds.builder_from_directory(str(tmp_path / "out"))
  assert builder.info.features["image"].shape == (8, 6, 3)
  examples = read_back(tmp_path / "out", "train")
  assert len(examples) == 12
  assert all(e["image"].shape == (8, 6, 3) for e in examples)
  raw = read_back(tmp_path / "out", "train", decode=False)
  assert all(e["image"].startswith(b"\x89PNG") for e in raw)


def test_image_folder_rejects_bad_files_into_the_dead_letter(tmp_path):
  write_image_folder(tmp_path / "raw", per_class=10)
  (tmp_path / "raw" / "cat" / "empty.jpg").write_bytes(b"")
  (tmp_path / "raw" / "cat" / "notes.txt").write_text("not an image")
  good = (tmp_path / "raw" / "dog" / "0.jpeg").read_bytes()
  (tmp_path / "raw" / "dog" / "cut.jpeg").write_bytes(good[:len(good) // 2])
  (tmp_path / "raw" / "dog" / ".DS_Store").write_bytes(b"\0\0")  # hidden: skipped
  summaries = convert(tmp_path / "raw", tmp_path / "out", source="image_folder",
                      splits=(("train", 1.0),), max_bad_fraction=0.2)
  assert summaries["train"].num_examples == 20
  assert summaries["train"].num_rejected == 3
  entries = {e["key"]: e for e in dead_letter(tmp_path / "out")}
  assert set(entries) == {"cat/empty.jpg", "cat/notes.txt", "dog/cut.jpeg"}
  assert entries["cat/empty.jpg"]["reason"] == "empty file"
  assert "truncated" in entries["dog/cut.jpeg"]["reason"]
  assert entries["cat/notes.txt"]["source"].endswith("raw/cat/notes.txt")
  # Reasons repeat exactly from run to run: no object addresses in them.
  assert entries["cat/notes.txt"]["reason"] == (
      "not an image: cannot identify image file")
  assert len(read_back(tmp_path / "out", "train")) == 20


# --- MNIST IDX ---------------------------------------------------------------


def write_idx(directory, prefix, images, labels, compress=True,
              magic=0x00000803):
  os.makedirs(directory, exist_ok=True)
  opener = gzip.open if compress else open
  suffix = ".gz" if compress else ""
  count, height, width = images.shape
  with opener(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"),
              "wb") as f:
    f.write(struct.pack(">IIII", magic, count, height, width) + images.tobytes())
  with opener(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"),
              "wb") as f:
    f.write(struct.pack(">II", 0x00000801, len(labels)) + labels.tobytes())


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_round_trip(tmp_path, compress):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 255, (30, 6, 5), np.uint8)
  test = rng.integers(0, 255, (10, 6, 5), np.uint8)
  write_idx(tmp_path / "raw", "train", train, np.arange(30, dtype=np.uint8) % 10,
            compress)
  write_idx(tmp_path / "raw", "t10k", test, np.arange(10, dtype=np.uint8),
            compress)
  assert convert_lib.detect_source(str(tmp_path / "raw")) == "mnist_idx"
  summaries = convert(tmp_path / "raw", tmp_path / "out", source="mnist_idx",
                      num_shards=3)
  assert {k: v.num_examples for k, v in summaries.items()} == {"train": 30,
                                                                 "test": 10}
  builder = tfds.builder_from_directory(str(tmp_path / "out"))
  assert builder.info.features["image"].shape == (6, 5, 1)
  assert builder.info.features["label"].names == [str(d) for d in range(10)]
  for example in read_back(tmp_path / "out", "train"):
    index = int(example["id"].decode().rsplit(":", 1)[1])
    np.testing.assert_array_equal(example["image"][..., 0], train[index])
    assert example["label"] == index % 10


def test_mnist_idx_truncation_and_an_unreadable_file_are_rejected(tmp_path):
  rng = np.random.default_rng(0)
  write_idx(tmp_path / "raw", "train", rng.integers(0, 255, (20, 4, 4), np.uint8),
            np.zeros(20, np.uint8), compress=False)
  write_idx(tmp_path / "raw", "t10k", rng.integers(0, 255, (5, 4, 4), np.uint8),
            np.zeros(5, np.uint8))
  # A second train pair (as EMNIST has) whose labels file is not IDX: its 6
  # images are lost, and counted as 6, not as one bad file.
  write_idx(tmp_path / "raw", "extra-train",
            rng.integers(0, 255, (6, 4, 4), np.uint8), np.zeros(6, np.uint8))
  (tmp_path / "raw" / "extra-train-labels-idx1-ubyte.gz").write_bytes(b"")
  images = tmp_path / "raw" / "train-images-idx3-ubyte"
  images.write_bytes(images.read_bytes()[:-16 * 2])  # the last two images
  summaries = convert(tmp_path / "raw", tmp_path / "out", source="mnist_idx",
                      max_bad_fraction=0.5)
  assert summaries["train"].num_examples == 18
  assert summaries["train"].num_rejected == 2 + 6
  assert summaries["test"].num_examples == 5
  reasons = {e["key"]: e["reason"] for e in dead_letter(tmp_path / "out")}
  assert "ends before" in reasons["train-images-idx3-ubyte:19"]
  assert "not an IDX uint8 label file" in reasons[
      "extra-train-images-idx3-ubyte.gz:5"]


@pytest.mark.parametrize("broken", ["images", "labels"])
def test_mnist_idx_split_lost_to_an_unreadable_file_fails(tmp_path, broken):
  """A split the raw data has never silently disappears from the dataset."""
  rng = np.random.default_rng(0)
  write_idx(tmp_path / "raw", "train", rng.integers(0, 255, (20, 4, 4), np.uint8),
            np.zeros(20, np.uint8))
  write_idx(tmp_path / "raw", "t10k", rng.integers(0, 255, (5, 4, 4), np.uint8),
            np.zeros(5, np.uint8), magic=0x0803_0000 if broken == "images"
            else 0x00000803)
  if broken == "labels":
    (tmp_path / "raw" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
  with pytest.raises(convert_lib.UserError,
                     match=f"split test: every record was rejected .*"
                     f"t10k-{broken}-idx[13]-ubyte.gz is not an IDX"):
    convert(tmp_path / "raw", tmp_path / "out", source="mnist_idx",
            max_bad_fraction=0.5)
  assert len(dead_letter(tmp_path / "out")) == 5
  assert not (tmp_path / "out" / metadata.INFO_FILE).exists()


# --- CIFAR binary ------------------------------------------------------------


def write_cifar_batch(path, images, labels):
  """images uint8 [N, 32, 32, 3]; labels [N, label_bytes]."""
  records = [label.astype(np.uint8).tobytes() + image.transpose(2, 0, 1).tobytes()
             for image, label in zip(images, labels)]
  path.write_bytes(b"".join(records))


@pytest.mark.parametrize("cifar100", [False, True])
def test_cifar_binary_round_trip(tmp_path, cifar100):
  rng = np.random.default_rng(0)
  raw = tmp_path / "raw"
  raw.mkdir()
  images = rng.integers(0, 255, (12, 32, 32, 3), np.uint8)
  if cifar100:
    labels = np.stack([np.arange(12) % 20, np.arange(12) * 7 % 100], 1)
    write_cifar_batch(raw / "train.bin", images[:8], labels[:8])
    write_cifar_batch(raw / "test.bin", images[8:], labels[8:])
    (raw / "fine_label_names.txt").write_text(
        "\n".join(f"fine{i}" for i in range(100)) + "\n")
  else:
    labels = (np.arange(12) % 10)[:, None]
    write_cifar_batch(raw / "data_batch_1.bin", images[:4], labels[:4])
    write_cifar_batch(raw / "data_batch_2.bin", images[4:8], labels[4:8])
    write_cifar_batch(raw / "test_batch.bin", images[8:], labels[8:])
    (raw / "batches.meta.txt").write_text(
        "\n".join(f"name{i}" for i in range(10)) + "\n\n")
  assert convert_lib.detect_source(str(raw)) == "cifar_binary"
  convert(raw, tmp_path / "out", source="cifar_binary", num_shards=2)
  builder = tfds.builder_from_directory(str(tmp_path / "out"))
  names = builder.info.features["label"].names
  assert len(names) == (100 if cifar100 else 10)
  assert names[3] == ("fine3" if cifar100 else "name3")
  found = read_back(tmp_path / "out", "train") + read_back(tmp_path / "out", "test")
  assert len(found) == 12
  by_pixels = {images[i].tobytes(): labels[i, -1] for i in range(12)}
  for example in found:
    assert by_pixels[example["image"].tobytes()] == example["label"]


def test_cifar_binary_partial_record_is_rejected(tmp_path):
  rng = np.random.default_rng(0)
  raw = tmp_path / "raw"
  raw.mkdir()
  write_cifar_batch(raw / "data_batch_1.bin",
                    rng.integers(0, 255, (10, 32, 32, 3), np.uint8),
                    np.zeros((10, 1), np.uint8))
  batch = raw / "data_batch_1.bin"
  batch.write_bytes(batch.read_bytes()[:-1000])
  summaries = convert(raw, tmp_path / "out", source="cifar_binary",
                      max_bad_fraction=0.2)
  assert summaries["train"].num_examples == 9
  [entry] = dead_letter(tmp_path / "out")
  assert entry["key"] == "data_batch_1.bin:9"
  assert "partial record" in entry["reason"]


def test_cifar_binary_empty_batch_fails_instead_of_dropping_its_split(
    tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  write_cifar_batch(raw / "data_batch_1.bin",
                    np.zeros((4, 32, 32, 3), np.uint8),
                    np.zeros((4, 1), np.uint8))
  (raw / "test_batch.bin").write_bytes(b"")
  with pytest.raises(convert_lib.UserError,
                     match="split test: every record was rejected .*"
                     "test_batch.bin: holds no whole record"):
    convert(raw, tmp_path / "out", source="cifar_binary")


# --- CSV ---------------------------------------------------------------------


def write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def test_csv_string_labels_become_sorted_class_names(tmp_path):
  rows = [[f"{i}.5", str(i), ["setosa", "virginica", "versicolor"][i % 3]]
          for i in range(30)]
  write_csv(tmp_path / "iris.csv", ["sepal", "petal", "species"], rows)
  assert convert_lib.detect_source(str(tmp_path / "iris.csv")) == "csv"
  convert(tmp_path / "iris.csv", tmp_path / "out", source="csv",
          label_column="species", splits=(("train", 1.0),))
  builder = tfds.builder_from_directory(str(tmp_path / "out"))
  names = builder.info.features["label"].names
  assert names == ["setosa", "versicolor", "virginica"]
  for example in read_back(tmp_path / "out", "train"):
    row = rows[int(example["id"].decode().rsplit(":", 1)[1])]
    np.testing.assert_allclose(example["features"], [float(row[0]), float(row[1])])
    assert names[example["label"]] == row[2]


def test_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path):
  rows = [[str(i), str(i % 2)] for i in range(10)]
  write_csv(tmp_path / "excel.csv", ["label", "x"], rows)
  data = (tmp_path / "excel.csv").read_bytes()
  (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + data)
  summaries = convert(tmp_path / "excel.csv", tmp_path / "out", source="csv",
                      label_column="label", splits=(("train", 1.0),))
  assert summaries["train"].num_examples == 10


def test_csv_float_labels_are_a_regression_target(tmp_path):
  rows = [[str(i), str(i * 0.5 + 0.25)] for i in range(20)]
  write_csv(tmp_path / "table.csv", ["x", "label"], rows)
  convert(tmp_path / "table.csv", tmp_path / "out", source="csv",
          splits=(("train", 1.0),))
  from pipeline import metadata  # pylint: disable=g-import-not-at-top
  info = metadata.read(str(tmp_path / "out"))
  assert info.schema.is_regression
  assert info.schema.feature_names == ("x",)
  for example in read_back(tmp_path / "out", "train"):
    assert example["label"] == pytest.approx(example["features"][0] * 0.5 + 0.25)


def test_csv_integer_labels_are_class_ids_and_bad_rows_are_rejected(tmp_path):
  rows = [[str(i), str(i % 4)] for i in range(40)]
  rows[3] = ["1", "2", "3"]  # wrong column count
  rows[7] = ["seven", "1"]  # not a number
  rows[9] = ["nan", "1"]  # not finite
  write_csv(tmp_path / "table.csv", ["x", "label"], rows)
  summaries = convert(tmp_path / "table.csv", tmp_path / "out", source="csv",
                      splits=(("train", 1.0),), max_bad_fraction=0.1)
  assert summaries["train"].num_examples == 37
  builder = tfds.builder_from_directory(str(tmp_path / "out"))
  assert builder.info.features["label"].names == ["0", "1", "2", "3"]
  reasons = {e["key"]: e["reason"] for e in dead_letter(tmp_path / "out")}
  assert reasons == {"table.csv:3": "3 columns, expected 2",
                     "table.csv:7": "column 1: 'seven' is not a number",
                     "table.csv:9": "column 1: 'nan' is not finite"}


# --- TFDS --------------------------------------------------------------------


def test_tfds_source_reshards_a_prepared_dataset(tmp_path, monkeypatch):
  # mock_data fakes every DatasetBuilder, which breaks the check metadata.write
  # makes by reading our output back; that call gets the real builder
  # (mock_data itself does the same for builder_from_files).
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from pipeline import metadata  # pylint: disable=g-import-not-at-top
  builder_classes = tfds.core.dataset_builder
  real = [(builder_classes.DatasetBuilder, name,
           getattr(builder_classes.DatasetBuilder, name))
          for name in ("__init__", "as_dataset")] + [
              (builder_classes.FileReaderBuilder, "_as_dataset",
               builder_classes.FileReaderBuilder._as_dataset)]
  real_write = metadata.write

  def write_with_the_real_builder(*args, **kwargs):
    with contextlib.ExitStack() as stack:
      for owner, name, function in real:
        stack.enter_context(mock.patch.object(owner, name, function))
      return real_write(*args, **kwargs)

  monkeypatch.setattr(metadata, "write", write_with_the_real_builder)
  with tfds.testing.mock_data(num_examples=24):
    summaries = convert("mnist", tmp_path / "out", source="tfds",
                        tfds_splits=("train", "test"), num_shards=3)
  assert {k: v.num_examples for k, v in summaries.items()} == {"train": 24,
                                                                 "test": 24}
  builder = tfds.builder_from_directory(str(tmp_path / "out"))
  assert builder.info.features["image"].shape == (28, 28, 1)
  assert len(builder.info.features["label"].names) == 10
  examples = read_back(tmp_path / "out", "train")
  assert sorted(e["id"].decode() for e in examples) == sorted(
      f"mnist/train:{i}" for i in range(24))
  assert all(e["image"].shape == (28, 28, 1) for e in examples)
