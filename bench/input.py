"""Input throughput: our reader against the pipelines one would write by hand.

  python -m bench.input                      # 20k 32x32 JPEGs, batch 128
  python -m bench.input --num_examples=50000 --image_format=png

Writes (once, cached under --data_dir) a dataset dir of small images in our
shard format, then measures examples/s, side by side in one run, for:

  raw records     TFRecordDataset, batched, no parsing: the ceiling
  textbook        the tf.data guide's recipe: interleaved read, shuffle,
                  per-record parse + decode in a parallel map, batch, prefetch
  batch-parse     hand-written: shuffle, batch first, parse_example + decode
                  (map_fn over the batch) in a parallel map, prefetch
  unrolled        batch-parse decoding a static batch with one op per image
  best by hand    unrolled, reading each file in blocks of records (fewer,
                  bigger elements through the interleave) and checking the
                  image shape once per batch: every speed idea in load(),
                  none of its checks; the best hand-written pipeline found
  load()          pipeline.dataset.load(training=True), what the trainers use
  load(augment)   the same with random crop + flip
  load(eval)      load(training=False): in order, padded, repeated
  load(cache)     load(cache=True): parsed examples kept in memory (the
                  first run fills the cache; later runs read memory)
  in-memory       from_tensor_slices over the decoded arrays, shuffle, batch

Each figure is the median over --repeats rounds of --measure_batches batches
after --warmup_batches (a fresh iterator per run). Every round runs each
pipeline once, in a fresh random order, so load on the shared machine and
leftovers of the previous pipeline hit all of them alike. Ratios are paired:
each round's rate over load()'s rate in the same round, median over rounds
(with the quartiles for the headline ratio). Same-pipeline pairs on this
machine spread by about +-5% per round: read ratios within that as parity.
"""

import gc
import io
import os
import random
import statistics
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from pipeline import dataset
from pipeline import metadata
from pipeline import records

_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 20_000,
                                     "Examples in the benchmark dataset.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Image height = width.")
_IMAGE_FORMAT = flags.DEFINE_enum("image_format", "jpeg", ["jpeg", "png"],
                                  "Encoding of the images.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 16, "Shards to write.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per pipeline.")
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 20,
                                       "Batches read before timing.")
_MEASURE_BATCHES = flags.DEFINE_integer("measure_batches", 300,
                                        "Batches timed per run.")
_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/bench_input",
                                "Where the benchmark dataset is cached.")
_TRAINER_RATE = flags.DEFINE_float(
    "trainer_examples_per_second", 3000.0,
    "How fast the CNN trainer consumes examples on this machine, for the "
    "headroom ratio.")

SHUFFLE_BUFFER = 10_000


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=image_format.upper(),
                               **({"quality": 90} if image_format == "jpeg"
                                  else {}))
  return buffer.getvalue()


def _smooth_image(rng, size: int) -> np.ndarray:
  """A photo-like image (smooth blobs + a little noise), so JPEG sizes are
  realistic; pure noise would compress unlike any real dataset."""
  coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
  image = np.kron(coarse, np.ones((size // 4, size // 4, 1), np.float32))
  image += rng.normal(0, 8, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def write_bench_dataset(data_dir: str, num_examples: int, image_size: int,
                        image_format: str, num_shards: int) -> str:
  """A 10-class image dataset dir in our format, reused when already there."""
  if tf.io.gfile.exists(os.path.join(data_dir, metadata.INFO_FILE)):
    return data_dir
  os.makedirs(data_dir, exist_ok=True)
  schema = records.Schema(kind="image", shape=(image_size, image_size, 3),
                          class_names=tuple(f"c{i}" for i in range(10)),
                          image_format=image_format)
  rng = np.random.default_rng(0)
  lengths, num_bytes = [], 0
  for shard in range(num_shards):
    path = metadata.shard_path(data_dir, "bench", "train", shard, num_shards)
    indices = range(shard, num_examples, num_shards)
    with tf.io.TFRecordWriter(path) as writer:
      for index in indices:
        writer.write(records.make_example(
            schema, f"bench:{index}",
            _encode(_smooth_image(rng, image_size), image_format),
            index % 10))
    lengths.append(len(indices))
    num_bytes += os.path.getsize(path)
  metadata.write(data_dir, schema, {"train": (lengths, num_bytes)})
  return data_dir


# --- the pipelines -----------------------------------------------------------


def raw_records(info, batch_size):
  """The files read endlessly, 16 at a time, in any order: nothing is
  re-opened at an epoch boundary (a repeat() after the read would be)."""
  files = info.splits["train"].files
  ds = tf.data.Dataset.from_tensor_slices(list(files)).repeat()
  ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=len(files),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def shuffled_records(info):
  """Shuffled files, read interleaved, through a shuffle buffer, repeated."""
  files = info.splits["train"].files
  ds = tf.data.Dataset.from_tensor_slices(list(files)).shuffle(len(files))
  ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=len(files),
                     num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.shuffle(SHUFFLE_BUFFER).repeat()
  return ds


def textbook(info, batch_size):
  """tf.data guide, 'Better performance': parallel map per record, then batch."""
  spec = records.parse_spec(info.schema)

  def parse_one(serialized):
    parsed = tf.io.parse_single_example(serialized, spec)
    image = records.decode_image(parsed[records.IMAGE_KEY], info.schema)
    return image, parsed[records.LABEL_KEY]

  ds = shuffled_records(info)
  ds = ds.map(parse_one, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def batch_parse(info, batch_size):
  """Hand-written fast recipe: batch first, parse_example, decode the batch."""
  spec = records.parse_spec(info.schema)
  image_spec = tf.TensorSpec(info.schema.shape, tf.uint8)

  def parse_batch(serialized):
    parsed = tf.io.parse_example(serialized, spec)
    images = tf.map_fn(
        lambda encoded: records.decode_image(encoded, info.schema),
        parsed[records.IMAGE_KEY], fn_output_signature=image_spec)
    return images, parsed[records.LABEL_KEY]

  ds = shuffled_records(info)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(parse_batch, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


def batch_parse_unrolled(info, batch_size):
  """The best hand-written pipeline found: batch-parse, with the static batch
  decoded by one op per image (tf.data runs them in parallel) instead of
  map_fn's sequential loop; the decode load() does, written by hand."""
  spec = records.parse_spec(info.schema)

  def parse_batch(serialized):
    parsed = tf.io.parse_example(serialized, spec)
    images = tf.stack([
        records.decode_image(encoded, info.schema)
        for encoded in tf.unstack(parsed[records.IMAGE_KEY], num=batch_size)])
    return images, parsed[records.LABEL_KEY]

  ds = shuffled_records(info)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(parse_batch, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


def best_by_hand(info, batch_size):
  """unrolled, with each file read as blocks of READ_BLOCK_SIZE records
  through the interleave, and one shape check per batch, not per image."""
  spec = records.parse_spec(info.schema)
  files = info.splits["train"].files

  def parse_batch(serialized):
    parsed = tf.io.parse_example(serialized, spec)
    images = tf.stack([
        tf.io.decode_image(encoded, channels=info.schema.shape[-1],
                           expand_animations=False)
        for encoded in tf.unstack(parsed[records.IMAGE_KEY], num=batch_size)])
    images = tf.ensure_shape(images, (batch_size,) + info.schema.shape)
    return images, parsed[records.LABEL_KEY]

  ds = tf.data.Dataset.from_tensor_slices(list(files)).shuffle(len(files))
  ds = ds.interleave(
      lambda path: tf.data.TFRecordDataset(path).batch(
          dataset.READ_BLOCK_SIZE),
      cycle_length=len(files), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.unbatch().shuffle(SHUFFLE_BUFFER).repeat()
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(parse_batch, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


def reader(info, batch_size, augment=False, cache=False):
  return dataset.load(info.data_dir, "train", batch_size, training=True,
                      augment=augment, cache=cache)


def reader_evaluation(info, batch_size):
  ds = dataset.load(info.data_dir, "train", batch_size, training=False)
  return ds.repeat()  # passes in order, padded batches included


def in_memory(info, batch_size):
  """The decoded arrays in memory: what no file format can beat."""
  images, labels = [], []
  ds = dataset.load(info.data_dir, "train", batch_size, training=False)
  for batch_images, batch_labels, weights in ds.as_numpy_iterator():
    real = weights == 1
    images.append(batch_images[real])
    labels.append(batch_labels[real])
  ds = tf.data.Dataset.from_tensor_slices((np.concatenate(images),
                                           np.concatenate(labels)))
  ds = ds.shuffle(SHUFFLE_BUFFER).repeat()
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


# --- measuring ---------------------------------------------------------------


def measure(ds, batch_size, warmup_batches, measure_batches):
  """(examples per wall second, examples per CPU second of this process).

  CPU seconds count the work whoever else loads the machine; wall seconds
  are what training feels. Both come from the same timed batches.
  """
  iterator = iter(ds)
  for _ in range(warmup_batches):
    next(iterator)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(measure_batches):
    next(iterator)
  examples = measure_batches * batch_size
  return (examples / (time.perf_counter() - wall),
          examples / (time.process_time() - cpu))


def main(argv):
  del argv
  data_dir = write_bench_dataset(
      os.path.join(_DATA_DIR.value,
                   f"{_NUM_EXAMPLES.value}x{_IMAGE_SIZE.value}"
                   f"_{_IMAGE_FORMAT.value}_{_NUM_SHARDS.value}"),
      _NUM_EXAMPLES.value, _IMAGE_SIZE.value, _IMAGE_FORMAT.value,
      _NUM_SHARDS.value)
  info = dataset.info(data_dir)
  batch_size = _BATCH_SIZE.value
  pipelines = {
      "raw records": raw_records(info, batch_size),
      "textbook": textbook(info, batch_size),
      "batch-parse": batch_parse(info, batch_size),
      "unrolled": batch_parse_unrolled(info, batch_size),
      "best by hand": best_by_hand(info, batch_size),
      "load()": reader(info, batch_size),
      "load(augment)": reader(info, batch_size, augment=True),
      "load(eval)": reader_evaluation(info, batch_size),
      "load(cache)": reader(info, batch_size, cache=True),
      "in-memory": in_memory(info, batch_size),
  }
  wall_rates = {name: [] for name in pipelines}
  cpu_rates = {name: [] for name in pipelines}
  load_before = os.getloadavg()[0]
  order = list(pipelines)
  shuffler = random.Random(0)
  for _ in range(_REPEATS.value):
    shuffler.shuffle(order)
    for name in order:
      gc.collect()  # the previous pipeline's iterator and its threads go
      wall_rate, cpu_rate = measure(pipelines[name], batch_size,
                                    _WARMUP_BATCHES.value,
                                    _MEASURE_BATCHES.value)
      wall_rates[name].append(wall_rate)
      cpu_rates[name].append(cpu_rate)

  def paired(rates, name, base="load()"):
    return [mine / theirs for mine, theirs in zip(rates[name], rates[base])]

  wall = {name: statistics.median(rates) for name, rates in wall_rates.items()}
  print(f"{info.splits['train'].num_examples} {_IMAGE_SIZE.value}x"
        f"{_IMAGE_SIZE.value} {_IMAGE_FORMAT.value} examples, "
        f"{len(info.splits['train'].files)} shards, batch {batch_size}, "
        f"{os.cpu_count()} cores, load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after; medians of {_REPEATS.value} rounds")
  print(f"{'pipeline':<15}{'examples/s':>11}{'min':>9}{'max':>9}"
        f"{'vs load()':>10}{'ex/CPU-s':>11}{'vs load()':>10}")
  for name in pipelines:
    print(f"{name:<15}{wall[name]:>11,.0f}{min(wall_rates[name]):>9,.0f}"
          f"{max(wall_rates[name]):>9,.0f}"
          f"{statistics.median(paired(wall_rates, name)):>9.2f}x"
          f"{statistics.median(cpu_rates[name]):>11,.0f}"
          f"{statistics.median(paired(cpu_rates, name)):>9.2f}x")
  for metric, rates in (("wall", wall_rates), ("CPU", cpu_rates)):
    common = max(("textbook", "batch-parse"),
                 key=lambda name: statistics.median(rates[name]))
    over_common = statistics.median(paired(rates, "load()", common))
    over_best = paired(rates, "load()", "best by hand")
    quartiles = statistics.quantiles(over_best, n=4)
    print(f"load() / best common recipe ({common}), {metric}: "
          f"{over_common:.2f}x; / best by hand: "
          f"{statistics.median(over_best):.2f}x "
          f"(quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f})")
  print(f"load() / trainer consumption ({_TRAINER_RATE.value:,.0f} ex/s): "
        f"{wall['load()'] / _TRAINER_RATE.value:.1f}x")


if __name__ == "__main__":
  app.run(main)
