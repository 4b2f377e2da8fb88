"""MNIST-style IDX files: MNIST, Fashion-MNIST, EMNIST.

The four files `[PREFIX-]{train,t10k,test}-{images-idx3,labels-idx1}-ubyte[.gz]`:
a big-endian header (magic 0x00000803 for uint8 images of 3 dimensions,
0x00000801 for labels), then raw bytes. Images are stored as PNG, like TFDS's
mnist. The labels file is a byte per example, so the driver reads it whole;
the image bytes are read by the shard tasks.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import struct

from apache_beam.io.filesystems import FileSystems
import numpy as np

from pipeline import records
from pipeline.sources import common

IDX_FILE = re.compile(r"^(?P<prefix>.*?)(?P<kind>images|labels)[-.]idx(?P<dims>[13])"
                      r"-ubyte(?P<gz>\.gz)?$")
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def _open(path: str):
  return FileSystems.open(path, compression_type="gzip" if path.endswith(".gz")
                          else "uncompressed")


def _split_of(prefix: str) -> str:
  return "test" if re.search(r"(t10k|test)", prefix) else "train"


@dataclasses.dataclass(frozen=True)
class IdxReader:
  """Reads images by index from IDX image files; stores them as PNG."""
  height: int
  width: int

  def read(self, items):
    pixels = common.read_fixed_size_records(items, 16,
                                            self.height * self.width)
    for item in items:
      data = pixels[tuple(item.location)]
      path, index = item.location
      if data is None:
        yield common.Rejected(item.key, f"{path}:{index}",
                              "file ends before this image")
        continue
      image = np.frombuffer(data, np.uint8).reshape(self.height, self.width)
      yield common.Record(item.key, common.png_bytes(image), item.label,
                          (self.height, self.width, 1, "png"))


def list_examples(input_dir: str) -> common.Listing:
  """Pairs images and labels files by prefix; t10k/test files are 'test'."""
  matches = FileSystems.match([input_dir.rstrip("/") + "/*"])[0].metadata_list
  pairs = {}
  for metadata in matches:
    found = IDX_FILE.match(posixpath.basename(metadata.path))
    if found:
      pairs.setdefault(found["prefix"], {})[found["kind"]] = metadata
  if not pairs:
    raise ValueError(f"{input_dir}: no *-idx3-ubyte / *-idx1-ubyte files")
  items, rejected, shapes, labels_seen, num_bytes = [], [], set(), [], 0
  for prefix, files in sorted(pairs.items()):
    split = _split_of(prefix)
    if set(files) != {"images", "labels"}:
      missing = ({"images", "labels"} - set(files)).pop()
      raise ValueError(f"{input_dir}: {prefix}* has no {missing} file")
    images_path, labels_path = files["images"].path, files["labels"].path
    with _open(images_path) as stream:
      header = stream.read(16)
    with _open(labels_path) as stream:
      labels_header = stream.read(8)
      labels = np.frombuffer(stream.read(), np.uint8)
    images_ok = (len(header) == 16 and
                 struct.unpack(">I", header[:4])[0] == IMAGES_MAGIC)
    labels_ok = (len(labels_header) == 8 and
                 struct.unpack(">I", labels_header[:4])[0] == LABELS_MAGIC)
    if not (images_ok and labels_ok):
      bad_path, what, magic, expected = (
          (labels_path, "label", labels_header, "00000801") if images_ok else
          (images_path, "image", header, "00000803"))
      reason = (f"{posixpath.basename(bad_path)} is not an IDX uint8 {what} "
                f"file (magic {magic[:4].hex() or 'missing'}, expected "
                f"{expected})")
      # Every example the readable file lists is lost, and counted: one
      # rejection for the file would let a whole split pass as 1 bad record.
      readable = header if images_ok else labels_header if labels_ok else None
      lost = struct.unpack(">I", readable[4:8])[0] if readable else 1
      name = posixpath.basename(images_path)
      rejected += [common.Rejected(f"{name}:{index}", f"{bad_path}:{index}",
                                   reason, split) for index in range(lost)]
      continue
    count, height, width = struct.unpack(">III", header[4:16])
    (label_count,) = struct.unpack(">I", labels_header[4:8])
    shapes.add((height, width))
    image_name = posixpath.basename(images_path)
    usable = min(count, label_count, len(labels))
    for index in range(usable):
      items.append(common.Item(f"{image_name}:{index}", (images_path, index),
                               int(labels[index]), split))
    for index in range(usable, max(count, label_count)):
      rejected.append(common.Rejected(
          f"{image_name}:{index}", f"{labels_path}:{index}",
          "no label for this image" if index < count else
          "label without an image", split))
    labels_seen.append(labels[:usable])
    num_bytes += files["images"].size_in_bytes
  if len(shapes) > 1:
    raise ValueError(f"{input_dir}: image files of different sizes {sorted(shapes)}")
  if not shapes:
    return common.Listing([], records.Schema("image", (None, None, 1)), None,
                          0, rejected)
  height, width = shapes.pop()
  num_classes = int(max(int(l.max()) for l in labels_seen if len(l)) + 1) \
      if any(len(l) for l in labels_seen) else 1
  schema = records.Schema(kind="image", shape=(height, width, 1),
                          class_names=tuple(str(c) for c in range(num_classes)),
                          image_format="png")
  return common.Listing(items, schema, IdxReader(height, width), num_bytes,
                        rejected)
