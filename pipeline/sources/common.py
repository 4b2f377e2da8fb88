"""The types every source shares, and the helpers two or more need."""

from __future__ import annotations

import dataclasses
import io
import re
import typing

from apache_beam.io.filesystems import FileSystems
from PIL import Image

from pipeline import records


class Item(typing.NamedTuple):
  """One example as the driver knows it: a key and where to find the rest.

  A NamedTuple, not a frozen dataclass: the driver makes one per example, and
  a frozen dataclass takes ~3x longer to build (0.3 s per 100k).

  key: the example's id (stored in the record), and the input of the split
    and shuffle hashes; unique within the dataset.
  location: what the source's reader needs to fetch it (a path, a
    (path, index) pair, a row number); JSON-serialisable.
  label: the class id or target when known from the listing, else None (the
    reader then reads it with the example).
  split: the split the raw data puts it in, or None to assign it by hash.
  """
  key: str
  location: typing.Any
  label: typing.Any = None
  split: str | None = None


class Record(typing.NamedTuple):
  """A good example, read and ready for `records.make_example`.

  image: (height, width, channels, format) of an image record, for the
  dataset's schema; None for vectors.
  """
  key: str
  inputs: typing.Any
  label: typing.Any
  image: tuple | None = None


class Rejected(typing.NamedTuple):
  """A bad example: it goes to the dead-letter file with its source and why."""
  key: str
  source: str
  reason: str
  split: str | None = None


@dataclasses.dataclass(frozen=True)
class Listing:
  """What the driver learns about a raw dataset before any Beam work.

  schema: an image folder's shape and format are provisional until the
    shards report what they saw (make_tfrecords.settle_schema).
  rejected: bad records found while listing (a file of the wrong size, a CSV
    row of the wrong width); they are counted like the readers' rejections.
  num_bytes: raw size, for the default shard count.
  """
  items: list
  schema: records.Schema
  reader: typing.Any
  num_bytes: int
  rejected: list = dataclasses.field(default_factory=list)


def png_bytes(pixels) -> bytes:
  """uint8 [H, W] or [H, W, C] -> PNG bytes (what TFDS stores for mnist/cifar)."""
  if pixels.ndim == 3 and pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  buffer = io.BytesIO()
  # compress_level 1: ~3x faster than the default for ~10% more bytes on
  # small images, and still deterministic.
  Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def read_fixed_size_records(items: list, header_size: int,
                            record_size: int) -> dict:
  """{(path, index): bytes, or None past the file's end} for items located
  at (path, index) in files of fixed-size records after a header.

  Uncompressed files are read by seeking; gzip files cannot seek cheaply, so
  they are streamed once keeping only the wanted records. Memory: one shard's
  records, never a whole file.
  """
  by_file = {}
  for item in items:
    path, index = item.location
    by_file.setdefault(path, set()).add(index)
  found = {}
  for path, wanted in by_file.items():
    compressed = path.endswith(".gz")
    with FileSystems.open(path, compression_type="gzip" if compressed
                          else "uncompressed") as stream:
      if not compressed:
        for index in sorted(wanted):
          stream.seek(header_size + index * record_size)
          data = stream.read(record_size)
          found[(path, index)] = data if len(data) == record_size else None
        continue
      stream.read(header_size)
      for index in range(max(wanted) + 1):
        data = stream.read(record_size)
        if len(data) < record_size:
          break
        if index in wanted:
          found[(path, index)] = data
  return {(path, index): found.get((path, index))
          for path, wanted in by_file.items() for index in wanted}


JPEG_QUALITY = 95


def pil_reason(error: Exception) -> str:
  """PIL's message without the buffer's address ("cannot identify image file
  <_io.BytesIO object at 0x7f..>"), so dead-letter files repeat exactly."""
  return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))


def reencode_image(data: bytes, image_size: tuple | None,
                   image_format: str | None, source_format: str) -> tuple:
  """Decodes, resizes to (height, width) if given, re-encodes.

  image_format: "jpeg" or "png", or None to keep the source's format (PNG
  for anything but JPEG). Grey stays grey; anything else becomes RGB.
  Returns (bytes, (height, width, channels, format)); ValueError if the bytes
  do not decode.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image = image.convert("L" if image.mode in ("L", "1", "I;16") else "RGB")
  except Exception as error:  # PIL raises many types for bad bytes.
    raise ValueError(f"does not decode: {pil_reason(error)}") from error
  if image_size is not None:
    height, width = image_size
    image = image.resize((width, height), Image.Resampling.BILINEAR)
  output_format = image_format or ("jpeg" if source_format == "jpeg" else "png")
  buffer = io.BytesIO()
  if output_format == "jpeg":
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
  else:
    image.save(buffer, format="PNG")
  channels = 1 if image.mode == "L" else 3
  return buffer.getvalue(), (image.height, image.width, channels, output_format)
