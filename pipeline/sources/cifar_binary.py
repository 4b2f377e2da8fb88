"""CIFAR-10 and CIFAR-100 binary distributions (`*.bin`; never the pickles).

A record is the label byte(s) then 3072 pixel bytes, channel-major
(3 x 32 x 32). CIFAR-10 (`data_batch_N.bin`, `test_batch.bin`) has one label
byte; CIFAR-100 (`train.bin`, `test.bin`) has two, coarse then fine, and we
keep the fine label. Class names come from the `.txt` files shipped with the
data. Images are stored as PNG, like TFDS's cifar10.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re

from apache_beam.io.filesystems import FileSystems
import numpy as np

from pipeline import records
from pipeline.sources import common

IMAGE_BYTES = 3 * 32 * 32
CIFAR10_FILE = re.compile(r"^(data_batch_\d+|test_batch)\.bin$")
CIFAR100_FILE = re.compile(r"^(train|test)\.bin$")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                 "horse", "ship", "truck")


def split_of(file_name: str) -> str | None:
  """'train'/'test' for a CIFAR batch file name, else None."""
  if CIFAR10_FILE.match(file_name):
    return "test" if file_name.startswith("test") else "train"
  if CIFAR100_FILE.match(file_name):
    return file_name[:-len(".bin")]
  return None


@dataclasses.dataclass(frozen=True)
class CifarReader:
  """Reads (file, index) records; the last label byte is the class."""
  label_bytes: int
  num_classes: int

  def read(self, items):
    raw = common.read_fixed_size_records(items, 0,
                                         self.label_bytes + IMAGE_BYTES)
    for item in items:
      path, index = item.location
      data = raw[(path, index)]
      source = f"{path}:{index}"
      if data is None:
        yield common.Rejected(item.key, source, "file ends before this record")
        continue
      label = data[self.label_bytes - 1]
      if label >= self.num_classes:
        yield common.Rejected(item.key, source, f"label {label} is not below "
                              f"{self.num_classes}")
        continue
      image = np.frombuffer(data, np.uint8, offset=self.label_bytes)
      image = image.reshape(3, 32, 32).transpose(1, 2, 0)  # to HWC
      yield common.Record(item.key, common.png_bytes(image), int(label),
                          (32, 32, 3, "png"))


def _class_names(input_dir: str, file_name: str, default: tuple) -> tuple:
  path = posixpath.join(input_dir, file_name)
  if not FileSystems.exists(path):
    return default
  with FileSystems.open(path, compression_type="uncompressed") as stream:
    names = [line.strip() for line in stream.read().decode().splitlines()]
  return tuple(name for name in names if name)


def list_examples(input_dir: str) -> common.Listing:
  """Lists every record of every batch file from the files' sizes.

  A file whose size is not a whole number of records keeps its whole records;
  the partial one at the end is rejected.
  """
  input_dir = input_dir.rstrip("/")
  files = [m for m in FileSystems.match([input_dir + "/*.bin"])[0].metadata_list
           if split_of(posixpath.basename(m.path))]
  kinds = {bool(CIFAR100_FILE.match(posixpath.basename(m.path))) for m in files}
  if not files:
    raise ValueError(f"{input_dir}: no CIFAR binary batches "
                     "(data_batch_N.bin, test_batch.bin, train.bin, test.bin)")
  if len(kinds) > 1:
    raise ValueError(f"{input_dir}: holds both CIFAR-10 and CIFAR-100 batches")
  if kinds.pop():
    label_bytes = 2
    class_names = _class_names(input_dir, "fine_label_names.txt",
                               tuple(str(c) for c in range(100)))
  else:
    label_bytes = 1
    class_names = _class_names(input_dir, "batches.meta.txt", CIFAR10_NAMES)
  record_size = label_bytes + IMAGE_BYTES
  items, rejected = [], []
  for metadata in sorted(files, key=lambda m: m.path):
    file_name = posixpath.basename(metadata.path)
    split = split_of(file_name)
    count, leftover = divmod(metadata.size_in_bytes, record_size)
    items += [common.Item(f"{file_name}:{index}", (metadata.path, index),
                          None, split) for index in range(count)]
    if not count:
      rejected.append(common.Rejected(
          file_name, metadata.path, f"holds no whole record ({leftover} "
          f"bytes; a record is {record_size})", split))
    elif leftover:
      rejected.append(common.Rejected(
          f"{file_name}:{count}", f"{metadata.path}:{count}",
          f"partial record: {leftover} of {record_size} bytes at the end of "
          "the file", split))
  schema = records.Schema(kind="image", shape=(32, 32, 3),
                          class_names=class_names, image_format="png")
  return common.Listing(items, schema, CifarReader(label_bytes, len(class_names)),
                        sum(m.size_in_bytes for m in files), rejected)
