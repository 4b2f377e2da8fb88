"""Image folders: ROOT/<class>/<file> or ROOT/<split>/<class>/<file>.

The layout ImageNet and Keras' `image_dataset_from_directory` use. Encoded
bytes are stored as they are (no decode, no re-encode) unless a resize or
another format is asked for; each file is still checked: its header is parsed
for size and channels and its end marker looked for, which catches zero-byte,
non-image and truncated files at a fraction of a decode's cost.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import struct

from apache_beam.io.filesystems import FileSystems
from PIL import Image

from pipeline import records
from pipeline.sources import common

SPLIT_NAME = re.compile(r"^\w+$")
# JPEG start-of-frame markers (they hold the size); C4, C8 and CC share the
# range but are other segments.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_MARKERS_WITHOUT_LENGTH = frozenset(range(0xD0, 0xDA)) | {0x01}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # colour type -> channels
_PNG_END = b"IEND\xaeB`\x82"
_TAIL_BYTES = 1024  # where end markers are looked for: some writers pad
_SIZE_SAMPLE = 1000  # files stat-ed to estimate a local folder's size
_READ_BYTES = 1 << 16  # per read call: most images fit in one


def _jpeg_header(data: bytes) -> tuple:
  """(height, width, channels) from the start-of-frame segment."""
  position = 2
  while position + 4 <= len(data):
    if data[position] != 0xFF:
      raise ValueError(f"corrupt JPEG: no marker at byte {position}")
    marker = data[position + 1]
    if marker == 0xFF:  # fill byte
      position += 1
      continue
    if marker in _JPEG_MARKERS_WITHOUT_LENGTH:
      position += 2
      continue
    if marker in _JPEG_FRAME_MARKERS:
      if position + 10 > len(data):
        break
      height, width = struct.unpack_from(">HH", data, position + 5)
      return height, width, data[position + 9]
    (length,) = struct.unpack_from(">H", data, position + 2)
    position += 2 + length
  raise ValueError("truncated JPEG: no frame header")


def inspect_image(data: bytes) -> tuple:
  """(height, width, channels, format) of encoded bytes; ValueError if bad.

  JPEG and PNG are parsed by hand (a few microseconds); other formats go
  through PIL's verify.
  """
  if not data:
    raise ValueError("empty file")
  if data[:2] == b"\xff\xd8":
    height, width, channels = _jpeg_header(data)
    if data.rfind(b"\xff\xd9", max(0, len(data) - _TAIL_BYTES)) < 0:
      raise ValueError("truncated JPEG: no end-of-image marker")
    return height, width, channels, "jpeg"
  if data[:8] == _PNG_SIGNATURE:
    if len(data) < 33 or data[12:16] != b"IHDR":
      raise ValueError("truncated PNG: no IHDR chunk")
    width, height = struct.unpack_from(">II", data, 16)
    channels = _PNG_CHANNELS.get(data[25])
    if channels is None:
      raise ValueError(f"corrupt PNG: colour type {data[25]}")
    if data.rfind(_PNG_END, max(0, len(data) - _TAIL_BYTES)) < 0:
      raise ValueError("truncated PNG: no IEND chunk")
    return height, width, channels, "png"
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.verify()
      channels = len(image.getbands())
      return image.height, image.width, channels, image.format.lower()
  except Exception as error:  # PIL raises many types for bad bytes.
    raise ValueError(f"not an image: {common.pil_reason(error)}") from error


def _read_local(path: str) -> bytes:
  """A whole local file: os.open/os.read take ~4 us on a small file where
  open().read() takes ~6 and FileSystems ~8 (it is the converter's biggest
  per-example cost). Reads until end of file, so short reads lose nothing."""
  descriptor = os.open(path, os.O_RDONLY)
  try:
    chunks = [os.read(descriptor, _READ_BYTES)]
    while chunks[-1]:
      chunks.append(os.read(descriptor, _READ_BYTES))
  finally:
    os.close(descriptor)
  return chunks[0] if len(chunks) == 2 else b"".join(chunks)


def _read_remote(path: str) -> bytes:
  with FileSystems.open(path, compression_type="uncompressed") as stream:
    return stream.read()


@dataclasses.dataclass(frozen=True)
class ImageFolderReader:
  """Reads and checks image files under `root`; keys are relative paths."""
  root: str

  def read(self, items):
    read_file = _read_remote if "://" in self.root else _read_local
    prefix = self.root.rstrip("/") + "/"
    for key, location, label, _ in items:
      path = prefix + location
      try:
        data = read_file(path)
        image = inspect_image(data)
      except (OSError, ValueError) as error:
        yield common.Rejected(key, path, str(error))
        continue
      yield common.Record(key, data, label, image)


def _list_files(root: str) -> tuple:
  """([(path parts, relative path)], total bytes) of the non-hidden files.

  Local folders are walked with os.scandir, and only a sample of the files
  is stat-ed for the total size (it only sets the default shard count): a
  stat per file was half of the driver's listing time on 100k files, and
  FileSystems.match makes two.
  """
  files = []
  if "://" in root:
    num_bytes = 0
    for metadata in FileSystems.match([root + "/**"])[0].metadata_list:
      relative = metadata.path[len(root) + 1:]
      parts = relative.split("/")
      if not any(part.startswith(".") for part in parts):
        files.append((parts, relative))
        num_bytes += metadata.size_in_bytes
    return files, num_bytes
  pending = [()]
  while pending:
    prefix = pending.pop()
    with os.scandir(os.path.join(root, *prefix)) as entries:
      for entry in entries:
        if entry.name.startswith("."):
          continue
        parts = prefix + (entry.name,)
        if entry.is_dir():
          pending.append(parts)
        else:
          files.append((parts, "/".join(parts)))
  step = max(1, len(files) // _SIZE_SAMPLE)
  sample = files[::step]
  sampled_bytes = sum(os.path.getsize(os.path.join(root, relative))
                      for _, relative in sample)
  return files, sampled_bytes * len(files) // max(1, len(sample))


def list_examples(root: str) -> common.Listing:
  """Lists ROOT/<class>/* or ROOT/<split>/<class>/*; hidden files are skipped.

  Class names are the sorted class directory names (the union over splits).
  Raises ValueError when the layout is neither, or holds no files.
  """
  root = root.rstrip("/")
  files, num_bytes = _list_files(root)
  depths = {len(parts) for parts, _ in files}
  if not files:
    raise ValueError(f"{root}: no files under it")
  if depths == {1}:
    raise ValueError(f"{root}: files but no class folders; expected "
                     "ROOT/<class>/<image> or ROOT/<split>/<class>/<image>")
  if len(depths) > 1 or depths - {2, 3}:
    raise ValueError(
        f"{root}: files {min(depths) - 1} to {max(depths) - 1} folders down; "
        "expected ROOT/<class>/<image> or ROOT/<split>/<class>/<image>")
  with_splits = depths == {3}
  class_names = tuple(sorted({parts[-2] for parts, _ in files}))
  class_ids = {name: index for index, name in enumerate(class_names)}
  items = []
  for parts, relative in sorted(files, key=lambda f: f[1]):
    split = parts[0] if with_splits else None
    if split is not None and not SPLIT_NAME.match(split):
      raise ValueError(f"{root}: split folder {split!r} is not a valid split "
                       "name (letters, digits, _)")
    items.append(common.Item(key=relative, location=relative,
                             label=class_ids[parts[-2]], split=split))
  # The shape is settled from what the readers see (see make_tfrecords).
  schema = records.Schema(kind="image", shape=(None, None, 3),
                          class_names=class_names)
  return common.Listing(
      items=items, schema=schema, reader=ImageFolderReader(root),
      num_bytes=num_bytes)
