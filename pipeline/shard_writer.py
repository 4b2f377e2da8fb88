"""Splits, shards and the Beam stage that writes one shard.

The driver decides everything that must be deterministic before any Beam
work: which split each key goes to (a hash of the key alone, so a re-run, a
new --seed or more data never moves an example between splits), which shard
and which position in it (a hash of seed and key: a global shuffle, since raw
folders come sorted by class). Each shard becomes one task file; a Beam
element is a task, not an example, because per-element overhead in Beam
(~5k elements/s measured here) would cost more than the conversion itself.

`write_shard` streams its task's items through the source's reader into the
TFRecord framing (length, masked CRC32C, data, masked CRC32C), written to a
temporary name and renamed into place, so a retried or killed task never
leaves a partial shard under a final name. It needs no TensorFlow: importing
it costs a worker ~3 s and ~0.5 GB.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import posixpath
import struct
import uuid

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
import google_crc32c

from pipeline import metadata
from pipeline import records
from pipeline.sources import common

STAGING_DIR = ".staging"  # tasks, results and temporary shards of a run
TARGET_SHARD_BYTES = 128 << 20  # the size TFDS aims for
# At least this many shards per split (when it has the examples): readers
# shard by file across workers, and converter tasks are shards too.
MIN_SHARDS = 16
MIN_EXAMPLES_PER_SHARD = 100
COUNTER_NAMESPACE = "make_tfrecords"


@dataclasses.dataclass(frozen=True)
class ShardConfig:
  """What every shard task needs besides its items.

  image_size: (height, width) to resize images to, or None to keep them.
  image_format: "jpeg"/"png" to re-encode images to, or None to keep them.
  """
  output_dir: str
  name: str
  schema: records.Schema
  compression: str | None = None
  image_size: tuple | None = None
  image_format: str | None = None

  def reencodes(self, image_format: str) -> bool:
    return self.image_size is not None or (
        self.image_format is not None and self.image_format != image_format)


# --- planning (driver) -------------------------------------------------------


_SPLIT_HASH = hashlib.blake2b(digest_size=8, salt=b"split")


def _hash64(text: str, base) -> int:
  """64-bit hash of `text` from a salted blake2b; copying the salted state
  is twice as fast as building it (it matters at 100k+ keys)."""
  hasher = base.copy()
  hasher.update(text.encode())
  return int.from_bytes(hasher.digest(), "big")


def assign_split(key: str, splits: tuple) -> str:
  """The split of `key` for splits ((name, fraction), ...) summing to 1."""
  position = _hash64(key, _SPLIT_HASH) / 2.0**64
  total = 0.0
  for name, fraction in splits:
    total += fraction
    if position < total:
      return name
  return splits[-1][0]  # float rounding at the top end


def default_num_shards(num_examples: int, num_bytes: int) -> int:
  """ceil(bytes / 128 MiB), but at least 16 when there are 1600+ examples."""
  by_size = math.ceil(num_bytes / TARGET_SHARD_BYTES)
  by_count = min(MIN_SHARDS, math.ceil(num_examples / MIN_EXAMPLES_PER_SHARD))
  return max(1, by_size, by_count)


def plan_shards(items: list, num_shards: int, seed: int) -> list:
  """Deals `items` of one split into `num_shards` lists, each in write order.

  An item's shard and its place in it both come from one seeded hash of its
  key, so the order is a global shuffle that does not depend on input order.
  """
  base = hashlib.blake2b(digest_size=8,
                         salt=seed.to_bytes(8, "big", signed=True))
  ordered = sorted(items, key=lambda item: (_hash64(item.key, base), item.key))
  shards = [[] for _ in range(num_shards)]
  for position, item in enumerate(ordered):
    shards[position % num_shards].append(item)
  return shards


def staging_path(output_dir: str, *parts: str) -> str:
  return posixpath.join(output_dir, STAGING_DIR, *parts)


def delete_staging(output_dir: str) -> None:
  path = staging_path(output_dir)
  # GCS deletes a whole prefix only when given a trailing slash; the local
  # filesystem reads one as "the files in it".
  FileSystems.delete([path + "/" if "://" in path else path])


def task_file_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}.json"


def write_task(output_dir: str, split: str, index: int, num_shards: int,
               items: list) -> str:
  """Writes a shard's items to a task file; returns its path (the Beam element)."""
  path = staging_path(output_dir, "tasks", task_file_name(split, index))
  task = {"split": split, "index": index, "num_shards": num_shards,
          "items": [[i.key, i.location, i.label] for i in items]}
  with FileSystems.create(path, compression_type="uncompressed") as stream:
    stream.write(json.dumps(task).encode())
  return path


def plan_tasks(items: list, output_dir: str, splits: tuple | None,
               num_shards: int | None, seed: int, bytes_per_item: float) -> dict:
  """Assigns splits and shards and writes the task files.

  splits: ((name, fraction), ...), or None when the items carry raw splits.
  num_shards: per split; None for default_num_shards. Returns
  {split: [task file paths, in shard order]}.
  """
  by_split = {}
  for item in items:
    split = item.split if splits is None else assign_split(item.key, splits)
    by_split.setdefault(split, []).append(item)
  tasks = {}
  for split, split_items in sorted(by_split.items()):
    count = min(len(split_items), num_shards or default_num_shards(
        len(split_items), int(bytes_per_item * len(split_items))))
    tasks[split] = [
        write_task(output_dir, split, index, count, shard_items)
        for index, shard_items in enumerate(
            plan_shards(split_items, count, seed))]
  return tasks


def read_results(output_dir: str, tasks: dict) -> dict:
  """{(split, shard index): statistics} written by every task's write_shard."""
  results = {}
  for split, paths in tasks.items():
    for index in range(len(paths)):
      path = staging_path(output_dir, "results", task_file_name(split, index))
      with FileSystems.open(path, compression_type="uncompressed") as stream:
        results[(split, index)] = json.loads(stream.read())
  return results


# --- writing (Beam worker) ---------------------------------------------------


_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def _masked_crc(data: bytes) -> bytes:
  crc = google_crc32c.value(data)
  return _CRC.pack((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord_frame(record: bytes) -> bytes:
  """One record in the TFRecord file format."""
  length = _LENGTH.pack(len(record))
  return b"".join((length, _masked_crc(length), record, _masked_crc(record)))


def write_shard(task_path: str, reader, config: ShardConfig) -> dict:
  """Converts one task into one shard; returns (and stores) its statistics.

  The statistics go to a result file next to the task, because the driver
  cannot collect a PCollection from every runner.
  """
  with FileSystems.open(task_path, compression_type="uncompressed") as stream:
    task = json.loads(stream.read())
  split = task["split"]
  items = [common.Item(key, location, label, split)
           for key, location, label in task["items"]]
  final_path = metadata.shard_path(config.output_dir, config.name, split,
                                   task["index"], task["num_shards"])
  temporary_path = staging_path(config.output_dir, "tmp",
                                f"{posixpath.basename(final_path)}.{uuid.uuid4().hex}")
  compression = "gzip" if config.compression == "GZIP" else "uncompressed"
  rejected, sizes, kinds = [], set(), set()
  reencode = config.image_size is not None or config.image_format is not None
  last_image, count = None, 0
  # The converter's inner loop: keep it lean (see WORKSPACE.md, Converter).
  with FileSystems.create(temporary_path, compression_type=compression) as out:
    for result in reader.read(items):
      if isinstance(result, common.Rejected):
        rejected.append([result.key, result.source, result.reason])
        continue
      key, inputs, label, image = result
      if reencode and image is not None and config.reencodes(image[3]):
        try:
          inputs, image = common.reencode_image(
              inputs, config.image_size, config.image_format, image[3])
        except ValueError as error:
          rejected.append([key, key, str(error)])
          continue
      out.write(tfrecord_frame(records.make_example(
          config.schema, key, inputs, label)))
      count += 1
      # Images of a shard mostly share a shape: look only at changes.
      if image != last_image and image is not None:
        last_image = image
        kinds.add(image[2:])  # (channels, format)
        if len(sizes) < 2:  # one size, or "they differ": enough
          sizes.add(image[:2])
  FileSystems.rename([temporary_path], [final_path])
  # Counted once per shard: a counter update per example costs ~1 us.
  Metrics.counter(COUNTER_NAMESPACE, f"{split}_read").inc(count + len(rejected))
  Metrics.counter(COUNTER_NAMESPACE, f"{split}_written").inc(count)
  Metrics.counter(COUNTER_NAMESPACE, f"{split}_rejected").inc(len(rejected))
  stats = {
      "split": split, "index": task["index"], "path": final_path,
      "num_examples": count,
      "num_bytes": FileSystems.match([final_path])[0].metadata_list[0]
                   .size_in_bytes,
      "rejected": rejected,
      "image_sizes": sorted(sizes),
      "image_channels": sorted({channels for channels, _ in kinds}),
      "image_formats": sorted({image_format for _, image_format in kinds}),
  }
  result_path = staging_path(config.output_dir, "results",
                             task_file_name(split, task["index"]))
  with FileSystems.create(result_path, compression_type="uncompressed") as out:
    out.write(json.dumps(stats).encode())
  return stats
