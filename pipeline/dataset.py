"""The reader: a dataset dir's shards -> batches for training or evaluation.

`load()` turns a dir written by `pipeline.make_tfrecords` (or any TFDS dataset
dir with image/features + label) into a `tf.data.Dataset` of full, statically
shaped batches, for one machine or for one input pipeline of a
`tf.distribute` strategy (`distribute_datasets_from_function`).

Everything the reader needs comes from the metadata (`pipeline.metadata`):
feature kind and shape, class count, the shard files and how many records
each holds. Parsing is `pipeline.records`' spec and image decoder.

The training stream is a pure function of (seed, epoch, input pipeline):

  epoch e:  shuffle this pipeline's file order with seed (seed, e)
            -> interleave the files, READ_BLOCK_SIZE records at a time
            (deterministic) -> shuffle buffer seeded with (seed, e)
            -> records of epoch e
  stream:   epochs start_epoch, start_epoch + 1, ... concatenated, then
            batched (batches run across epoch boundaries, none are dropped)

so resuming at global step k needs no iterator state: the examples this
pipeline consumed in k steps are arithmetic (per-replica batch x replicas fed
by this pipeline x k), whole epochs are skipped by numbering, and the rest of
the epoch is skipped as raw records before anything is parsed. That matters
because iterators of distributed datasets cannot be checkpointed under
Mirrored/MultiWorkerMirrored strategies (TF 2.21), while a step can.

Pipelines get whole files (`files[pipeline_id::num_pipelines]`) when there
are at least as many files as pipelines, else every pipeline reads every file
and keeps every num_pipelines-th record (logged as a warning: each pipeline
then reads all the bytes).

Shards are read with the compression the metadata names (None or GZIP).
A shard that yields other than its listed record count (CRC mismatch,
truncation, a file gone since) stops the stream with an error naming the file,
unless skip_bad_records=True: then readable records are counted per file up
front, losses logged per file, and the counts used for the resume arithmetic.

Speed (bench/input.py measures it): shards are read and interleaved in
blocks of records, which the shuffle buffer takes apart; records are batched
before parsing (`parse_example` on a batch is several times cheaper than per
record), images are decoded inside the batched map, maps run in parallel,
prefetch is last.
"""

from __future__ import annotations

import dataclasses
import math
import re

from absl import logging
import tensorflow as tf

from pipeline import metadata
from pipeline import records

AUTOTUNE = tf.data.AUTOTUNE
# Files read at once by the training interleave: enough to mix shards and to
# hide per-file latency on remote storage, few enough to bound read buffers.
INTERLEAVE_CYCLE_LENGTH = 16
# Records per block read from a shard: the unit of the record-count check and
# of the interleave (see _read_shard). The shuffle buffer mixes the blocks;
# the converter already shuffled records across shards.
READ_BLOCK_SIZE = 256
# The error a shard with the wrong record count stops with, after
# "PATH: read N records, expected M".
_BAD_SHARD = (" (corrupt, truncated or missing shard, or one that disagrees "
              "with the metadata")
_SKIP_HINT = "; {skip} skips and counts unreadable records"
_SKIP_OPTION = "load(skip_bad_records=True)"
# Padding a random crop adds on each side of the image (CIFAR-style).
CROP_PADDING = 4


def info(data_dir: str) -> metadata.DatasetInfo:
  """The dataset's metadata (schema, splits, shard lengths); see metadata.read."""
  return metadata.read(data_dir)


@dataclasses.dataclass(frozen=True)
class _PipelineShare:
  """What one input pipeline reads of a split.

  files, lengths: the files it opens and their record counts.
  record_sharded: it keeps every num_pipelines-th record of what it reads
    (fewer files than pipelines) instead of whole files.
  num_examples: records it yields per pass over the split.
  """
  files: tuple
  lengths: tuple
  record_sharded: bool
  num_pipelines: int
  pipeline_id: int
  num_examples: int


def _share(split: metadata.Split, num_pipelines: int, pipeline_id: int,
           lengths: tuple) -> _PipelineShare:
  files = split.files
  if len(files) >= num_pipelines:
    mine = slice(pipeline_id, None, num_pipelines)
    return _PipelineShare(files[mine], lengths[mine], False, num_pipelines,
                          pipeline_id, sum(lengths[mine]))
  total = sum(lengths)
  mine = len(range(pipeline_id, total, num_pipelines))
  return _PipelineShare(files, lengths, True, num_pipelines, pipeline_id, mine)


def _shard_records(path, compression: str | None) -> tf.data.Dataset:
  """A shard's readable records: read errors end the file, never the run.

  A corrupt record ends TF's reading of its file (the rest of the file is
  lost); callers count what came out. A file that cannot be opened would make
  ignore_errors() retry it forever, so a missing file reads as no files (0
  records, which the count then reports) via matching_files, the path's glob
  characters escaped. (A file that exists but cannot be opened still loops;
  metadata.read checked every file exists and TF has no in-graph "can open".)
  """
  literal = tf.strings.regex_replace(path, r"([*?\[])", r"[\1]")
  shard = tf.data.TFRecordDataset(tf.io.matching_files(literal),
                                  compression or "")
  return shard.ignore_errors()


def _count_readable(path: str, compression: str | None) -> int:
  return int(_shard_records(path, compression).reduce(
      tf.constant(0, tf.int64), lambda count, _: count + 1))


def _readable_lengths(split: metadata.Split, files: tuple,
                      compression: str | None) -> tuple:
  """Counts the readable records of `files` (skip_bad_records=True).

  A CRC mismatch ends TF's reading of a file, so a bad record costs the rest
  of its file; the count is what the stream will really yield, which keeps
  the resume arithmetic exact. Every loss is logged with its file.
  """
  expected = dict(zip(split.files, split.shard_lengths))
  lengths = dict(expected)
  lost_total = 0
  for path in files:
    readable = _count_readable(path, compression)
    if readable > expected[path]:
      raise ValueError(f"{path}: holds {readable} records, the metadata says "
                       f"{expected[path]}; shards and metadata disagree")
    if readable < expected[path]:
      lost = expected[path] - readable
      lost_total += lost
      logging.warning("skip_bad_records: %s: %d of %d records unreadable "
                      "(corrupt or truncated), skipped", path, lost,
                      expected[path])
    lengths[path] = readable
  if lost_total:
    logging.warning("skip_bad_records: split %s: %d bad records skipped in "
                    "total", split.name, lost_total)
  return tuple(lengths[path] for path in split.files)


def _read_shard(path, expected_count, compression: str | None):
  """One shard's records in blocks of READ_BLOCK_SIZE (unbatch them); stops
  with an error naming the file when it does not hold exactly
  `expected_count` records.

  TF's own errors name no file ("corrupted record at 480") and a shard cut
  at a record boundary reads as a shorter one without any error, so read
  errors end the file (_shard_records) and every block is checked against
  where the count says it should be: block i holds
  clip(expected - i * READ_BLOCK_SIZE, 0, READ_BLOCK_SIZE) records, and an
  empty block appended at the end of the file must come exactly after the
  last one. The check is stateless (enumerate, no scan), one call per
  block. Blocks, not records, then travel through the interleave: fewer,
  bigger elements, which more than pays for the check (bench/input.py).
  """
  blocks = _shard_records(path, compression).batch(READ_BLOCK_SIZE)
  end_of_file = tf.data.Dataset.from_tensors(tf.zeros([0], tf.string))
  blocks = blocks.concatenate(end_of_file).enumerate()

  def check(index, block):
    start = index * READ_BLOCK_SIZE
    size = tf.size(block, tf.int64)
    expected_size = tf.clip_by_value(expected_count - start, 0,
                                     READ_BLOCK_SIZE)
    check = tf.debugging.Assert(
        tf.equal(size, expected_size),
        [tf.strings.join([
            path, ": read ", tf.strings.as_string(start + size),
            " records, expected ", tf.strings.as_string(expected_count),
            _BAD_SHARD, _SKIP_HINT.format(skip=_SKIP_OPTION), ")"])])
    with tf.control_dependencies([check]):
      return tf.identity(block)

  return blocks.map(check)


# What TF says when an encoded image does not decode (its JPEG, PNG, GIF and
# BMP decoders, and decode_image's format check).
_DECODE_ERRORS = re.compile(
    r"jpeg::Uncompress failed|Invalid JPEG data|Invalid PNG|"
    r"Unknown image file format|Invalid GIF data|Failed to decode GIF|"
    r"Invalid BMP|Input size should match|Number of channels|Input is empty")


def describe_data_error(error: Exception,
                        skip_option: str | None = _SKIP_OPTION,
                        data_dir: str | None = None) -> str | None:
  """One line for an error raised while iterating load()'s batches because
  of bad data, or None for any other error.

  A shard that fails its record count (see _read_shard) gives its path and
  counts, naming `skip_option` as the way around (the trainers name their
  flag; None: there is none). An image that does not decode (a JPEG corrupt
  in the middle passes the converter's header and end-marker check) gives
  TF's reason, which names no record; with `data_dir`, find_undecodable()
  then looks for it.
  """
  if not isinstance(error, tf.errors.InvalidArgumentError):
    return None
  message = str(error)
  shard = re.search(r"assertion failed: \[(.*?: read \d+ records, expected "
                    r"\d+)" + re.escape(_BAD_SHARD),
                    message)
  if shard:
    hint = _SKIP_HINT.format(skip=skip_option) if skip_option else ""
    return shard.group(1) + _BAD_SHARD + hint + ")"
  decode = _DECODE_ERRORS.search(message)
  if not decode:
    return None
  reason = message[decode.start():].splitlines()[0].strip()
  found = find_undecodable(data_dir) if data_dir else None
  where = f": {found}" if found else " (the graph cannot say which record)"
  return (f"an image in the dataset does not decode ({reason}){where}; the "
          "converter checks only headers and end markers: re-encode or "
          "remove the file and convert again")


def find_undecodable(data_dir: str, splits=None) -> str | None:
  """"split S, record N (id ...) of PATH" for the first image of `splits`
  (default: all) that does not decode, or None.

  Decodes every image up to that one (in parallel, file by file): meant for
  naming the record after a decode error stopped a run, when the cost (a
  pass over the data) buys an answer nobody else can give.
  """
  dataset_info = metadata.read(data_dir)
  schema = dataset_info.schema
  if schema.kind != "image":
    return None
  image_spec = {records.IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)}
  id_spec = {records.ID_KEY: tf.io.FixedLenFeature([], tf.string, "")}

  def decoded_index(index, serialized):
    encoded = tf.io.parse_single_example(serialized, image_spec)
    pixels = records.decode_pixels(encoded[records.IMAGE_KEY], schema)
    # The decoded shape, not a control dependency, ties the index to the
    # decode: grappler drops control inputs from stateless ops.
    return index, tf.shape(pixels)

  for split in splits or sorted(dataset_info.splits):
    for path in dataset_info.splits[split].files:
      shard = _shard_records(path, dataset_info.compression)
      decoded = shard.enumerate().map(decoded_index,
                                      num_parallel_calls=AUTOTUNE)
      expected = 0
      for index, _ in decoded.ignore_errors().as_numpy_iterator():
        if index != expected:
          break
        expected += 1
      else:
        if expected == _count_readable(path, dataset_info.compression):
          continue
      serialized = next(iter(shard.skip(expected).take(1)))
      key = tf.io.parse_single_example(serialized, id_spec)[records.ID_KEY]
      key = key.numpy().decode(errors="replace")
      return (f"split {split}, record {expected}"
              f"{f' (id {key!r})' if key else ''} of {path}")
  return None


def _augment(seed: int, pipeline_id: int):
  """(batch index, (images, labels)) -> randomly cropped/flipped images.

  Random crop with CROP_PADDING zero pixels per side and a horizontal flip,
  per example, vectorised over the batch as two gathers (rows, then columns;
  a flip is the columns in reverse, 2x cheaper than reversing images).
  Randomness is stateless, keyed by (seed, batch index, pipeline), so a
  resumed stream augments identically.
  """

  def augment(batch_index, batch):
    images, labels = batch
    key = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(seed, tf.int64), batch_index]), pipeline_id)
    crop_key, flip_key = tf.unstack(
        tf.random.experimental.stateless_split(key, num=2))
    batch_size, height, width, _ = images.shape
    padded = tf.pad(images, [[0, 0], [CROP_PADDING] * 2, [CROP_PADDING] * 2,
                             [0, 0]])
    offsets = tf.random.stateless_uniform(
        [2, batch_size], seed=crop_key, maxval=2 * CROP_PADDING + 1,
        dtype=tf.int32)
    flip = tf.random.stateless_uniform([batch_size], seed=flip_key) < 0.5
    rows = offsets[0][:, None] + tf.range(height)[None, :]
    columns = offsets[1][:, None] + tf.range(width)[None, :]
    columns = tf.where(flip[:, None], tf.reverse(columns, [1]), columns)
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    images = tf.gather(images, columns, axis=2, batch_dims=1)
    return images, labels

  return augment


def _epoch_seed(seed: int, epoch):
  """Two int64 seeds, for stateless ops, from (seed, epoch)."""
  return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])


def _options(deterministic: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  # We shard ourselves (per InputContext); tf.distribute must not re-shard.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.OFF)
  # One thread per op call, parallelism from the parallel maps (the tf.data
  # guide's advice; neutral on the 2-core bench machine, kept for big hosts).
  options.threading.max_intra_op_parallelism = 1
  return options


def load(data_dir: str, split: str, global_batch_size: int, *,
         training: bool, seed: int = 0, start_step: int = 0,
         input_context: tf.distribute.InputContext | None = None,
         image_size=None, augment: bool = False, cache: bool = False,
         skip_bad_records: bool = False, deterministic: bool = True,
         shuffle_buffer_size: int = 10_000) -> tf.data.Dataset:
  """Batches of `split` of the dataset in `data_dir`, for one input pipeline.

  Args:
    data_dir: a dataset dir (our converter's or TFDS's).
    split: e.g. "train", "validation".
    global_batch_size: examples per step over all replicas; each batch is
      `input_context.get_per_replica_batch_size(global_batch_size)` (the
      global size without a context).
    training: True: endless, shuffled per epoch, `drop_remainder`, yields
      (inputs, labels). False: each example once, in order, yields
      (inputs, labels, weights) padded with weight-0 rows to full batches,
      the same number of batches on every input pipeline.
    seed: the training order and augmentation are a function of
      (seed, epoch, input pipeline) (and of TF's global seed, if set).
    start_step: global steps already taken: the stream starts where an
      uninterrupted run with the same arguments would be after them.
    input_context: from `distribute_datasets_from_function`, or None: one
      pipeline reading everything, in global batches (what
      `experimental_distribute_dataset` wants on a single worker; it does
      not re-shard, auto-sharding is off, so on several workers use
      `distribute_datasets_from_function`).
    image_size: (height, width) to resize to; required when image sizes vary.
    augment: training images get a random crop (zero padding 4) and flip.
    cache: keep parsed examples in memory after the first pass (small
      datasets). Training then shuffles all of a pipeline's examples per epoch
      instead of file order + buffer, so the stream differs from cache=False.
    skip_bad_records: skip corrupt/truncated records (counted and logged
      per file, before training starts) instead of stopping with an error.
    deterministic: False lets parallel stages reorder for speed; exact resume
      and same-seed-same-order then no longer hold. Evaluation is always in
      order.
    shuffle_buffer_size: raw records in the training shuffle buffer.

  Returns:
    A tf.data.Dataset with static shapes.
  """
  dataset_info = metadata.read(data_dir)
  _check_split(dataset_info, data_dir, split)
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be positive, got "
                     f"{global_batch_size}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if not training and start_step:
    raise ValueError("start_step is a training position; evaluation always "
                     "reads the whole split")
  schema = dataset_info.schema
  if augment and schema.kind != "image":
    raise ValueError(f"{data_dir}: augment=True needs images, this dataset "
                     f"holds {schema.kind}s")
  split_info = dataset_info.splits[split]
  if input_context is None:
    input_context = tf.distribute.InputContext()
  batch_size = input_context.get_per_replica_batch_size(global_batch_size)
  # A pipeline feeds this many replicas, one batch each per global step.
  replicas_per_pipeline = max(
      1, input_context.num_replicas_in_sync // input_context.num_input_pipelines)
  compression = dataset_info.compression

  lengths = split_info.shard_lengths
  share = _share(split_info, input_context.num_input_pipelines,
                 input_context.input_pipeline_id, lengths)
  if share.record_sharded and share.num_pipelines > 1:
    logging.warning(
        "%s: split %s has %d files for %d input pipelines: every pipeline "
        "reads every file and keeps 1 record in %d (write more shards to "
        "avoid reading all the bytes on every worker)", data_dir, split,
        len(split_info.files), share.num_pipelines, share.num_pipelines)
  if skip_bad_records:
    lengths = _readable_lengths(split_info, share.files, compression)
    share = _share(split_info, input_context.num_input_pipelines,
                   input_context.input_pipeline_id, lengths)
  if share.num_examples == 0:
    raise ValueError(f"{data_dir}: split {split!r} has no examples for input "
                     f"pipeline {input_context.input_pipeline_id} of "
                     f"{input_context.num_input_pipelines}")

  def parse(serialized):
    return records.parse_batch(serialized, schema, image_size)
  if training:
    ds = _training_stream(share, compression, parse,
                          batch_size=batch_size, seed=seed,
                          start_step=start_step,
                          replicas_per_pipeline=replicas_per_pipeline,
                          augment=augment, cache=cache,
                          shuffle_buffer_size=shuffle_buffer_size)
  else:
    # Every pipeline yields the same number of batches, a multiple of the
    # replicas it feeds, so collectives never wait on a pipeline that ran out.
    num_batches = replicas_per_pipeline * _eval_rounds(
        split_info, input_context, batch_size * replicas_per_pipeline)
    ds = _evaluation_stream(share, compression, parse, batch_size=batch_size,
                            num_batches=num_batches, cache=cache)
    deterministic = True
  ds = ds.with_options(_options(deterministic))
  return ds.prefetch(AUTOTUNE)


def _evaluation_stream(share: _PipelineShare, compression, parse, *,
                       batch_size: int, num_batches: int,
                       cache: bool) -> tf.data.Dataset:
  """This pipeline's examples once, in file order, as `num_batches` full
  batches (inputs, labels, weights); weight 0 marks padding."""
  ds = _records_in_order(share.files, share.lengths, compression)
  if share.record_sharded:
    ds = ds.shard(share.num_pipelines, share.pipeline_id)
  ds = ds.batch(batch_size)  # the last partial batch is padded below

  def parse_full_or_last(serialized):
    # Full batches get a static shape, so their images are decoded one op
    # each (records.parse_batch), not by map_fn's loop: ~1.4x on small JPEGs.
    return tf.cond(
        tf.equal(tf.size(serialized), batch_size),
        lambda: parse(tf.ensure_shape(serialized, [batch_size])),
        lambda: parse(serialized))

  ds = ds.map(parse_full_or_last, num_parallel_calls=AUTOTUNE)
  if cache:
    ds = ds.cache()  # parsed, before padding
  ds = ds.map(_pad_to(batch_size))
  # Padding batches appended, not the stream cut with take(): the real
  # batches must reach their end, or cache() never completes.
  real_batches = math.ceil(share.num_examples / batch_size)
  return ds.concatenate(_padding_batches(ds.element_spec,
                                         num_batches - real_batches))


def _check_split(dataset_info: metadata.DatasetInfo, data_dir: str,
                 split: str) -> None:
  if split not in dataset_info.splits:
    raise ValueError(f"{data_dir}: no split {split!r}; it has "
                     f"{sorted(dataset_info.splits)}")


def _records_in_order(files, lengths, compression) -> tf.data.Dataset:
  """Every record of `files`, file after file, each file's count checked."""
  shards = tf.data.Dataset.from_tensor_slices(
      (tf.constant(files), tf.constant(lengths, tf.int64)))
  ds = shards.flat_map(
      lambda path, count: _read_shard(path, count, compression))
  return ds.unbatch()


def serialized_records(data_dir: str, split: str) -> tf.data.Dataset:
  """The split's serialized tf.Examples in file order, unparsed: what an
  export's serving signature takes. Shards are checked as load() checks
  them; describe_data_error() turns their errors into one line."""
  dataset_info = metadata.read(data_dir)
  _check_split(dataset_info, data_dir, split)
  split_info = dataset_info.splits[split]
  return _records_in_order(split_info.files, split_info.shard_lengths,
                           dataset_info.compression)


def _training_stream(share: _PipelineShare, compression, parse, *,
                     batch_size: int, seed: int, start_step: int,
                     replicas_per_pipeline: int, augment: bool, cache: bool,
                     shuffle_buffer_size: int) -> tf.data.Dataset:
  """Endless batches (inputs, labels) of this pipeline, from `start_step`."""
  files = tf.constant(share.files)
  counts = tf.constant(share.lengths, tf.int64)
  epoch_size = share.num_examples
  # Each global step took one batch per replica this pipeline feeds.
  start_batch = start_step * replicas_per_pipeline
  start_epoch, skip_in_epoch = divmod(start_batch * batch_size, epoch_size)

  def shard_records(order):
    shards = tf.data.Dataset.from_tensor_slices(
        (tf.gather(files, order), tf.gather(counts, order)))
    ds = shards.interleave(
        lambda path, count: _read_shard(path, count, compression),
        cycle_length=min(len(share.files), INTERLEAVE_CYCLE_LENGTH),
        num_parallel_calls=AUTOTUNE)  # in order unless deterministic=False
    ds = ds.unbatch()  # blocks of READ_BLOCK_SIZE records from each file
    if share.record_sharded:
      ds = ds.shard(share.num_pipelines, share.pipeline_id)
    return ds

  if cache:
    # Parsed examples in memory, before augmentation; all of a pipeline's
    # examples are there, so each epoch shuffles all of them.
    examples = shard_records(tf.range(len(share.files)))
    examples = examples.batch(batch_size)
    examples = examples.map(parse, num_parallel_calls=AUTOTUNE)
    examples = examples.unbatch().cache()

    def epoch_stream(epoch):
      return examples.shuffle(epoch_size, seed=_shuffle_seed(seed, epoch))
  else:

    def epoch_stream(epoch):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(len(share.files)), seed=_epoch_seed(seed, epoch))
      return shard_records(order).shuffle(min(shuffle_buffer_size, epoch_size),
                                          seed=_shuffle_seed(seed, epoch))

  ds = tf.data.Dataset.range(start_epoch, tf.int64.max)
  ds = ds.flat_map(epoch_stream)  # epoch by epoch, each from (seed, epoch)
  ds = ds.skip(skip_in_epoch)  # resume: raw records (or cached), unparsed
  # drop_remainder: static batch shape (TPU); batches span epoch boundaries.
  ds = ds.batch(batch_size, drop_remainder=True)
  if not cache:
    ds = ds.map(parse, num_parallel_calls=AUTOTUNE)
  if augment:
    ds = ds.enumerate(start=start_batch)  # the batch index keys augmentation
    ds = ds.map(_augment(seed, share.pipeline_id),
                num_parallel_calls=AUTOTUNE)
  return ds


def _shuffle_seed(seed: int, epoch):
  """One int64 for Dataset.shuffle, drawn statelessly from (seed, epoch)."""
  return tf.random.stateless_uniform(
      [], seed=_epoch_seed(seed, epoch), minval=0, maxval=tf.int64.max,
      dtype=tf.int64)


def _pad_to(batch_size: int):
  """(inputs, labels) of <= batch_size rows -> full (inputs, labels, weights)."""

  def pad(inputs, labels):
    real = tf.shape(labels)[0]
    weights = tf.concat([tf.ones([real]), tf.zeros([batch_size - real])], 0)

    def pad_rows(tensor):
      paddings = [[0, batch_size - real]] + [[0, 0]] * (tensor.shape.rank - 1)
      padded = tf.pad(tensor, paddings)
      return tf.ensure_shape(padded, [batch_size] + tensor.shape[1:])

    return pad_rows(inputs), pad_rows(labels), tf.ensure_shape(weights,
                                                               [batch_size])

  return pad


def _padding_batches(element_spec, count: int) -> tf.data.Dataset:
  """`count` all-zero, weight-0 batches shaped like `element_spec`."""
  zeros = tuple(tf.zeros(spec.shape, spec.dtype) for spec in element_spec)
  return tf.data.Dataset.from_tensors(zeros).repeat(count)


def _eval_rounds(split: metadata.Split,
                  input_context: tf.distribute.InputContext,
                  examples_per_round: int) -> int:
  """Rounds (one batch per replica) every pipeline yields: the largest
  pipeline's need, so all pipelines yield the same count.

  From the metadata's shard lengths, never from skip_bad_records' counts:
  every pipeline must reach the same number without reading others' files.
  """
  largest = max(
      _share(split, input_context.num_input_pipelines, pipeline_id,
             split.shard_lengths).num_examples
      for pipeline_id in range(input_context.num_input_pipelines))
  return max(1, math.ceil(largest / examples_per_round))
