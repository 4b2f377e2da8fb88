"""The reader on tiny dirs: coverage, order, seeds, exact resume, bad data.

Most tests use "numbered" vector datasets whose label is the example's index,
so a stream can be compared example by example.
"""

import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_image_examples
from conftest import write_dataset
from pipeline import dataset
from pipeline import records

NUMBERED_SCHEMA = records.Schema(kind="vector", shape=(2,))


def write_numbered(data_dir, count, num_shards, compression=None):
  """Split "train" and "validation" of `count` examples: label = index."""
  examples = [(f"ex{i}", [float(i), -float(i)], float(i))
              for i in range(count)]
  return write_dataset(data_dir, NUMBERED_SCHEMA,
                       {"train": examples, "validation": examples},
                       num_shards=num_shards, compression=compression)


@pytest.fixture(scope="module")
def numbered_dir(tmp_path_factory):
  """50 examples in 3 shards of 17, 17, 16: uneven on purpose."""
  return write_numbered(tmp_path_factory.mktemp("numbered"), 50, 3)


@pytest.fixture(scope="module")
def one_shard_dir(tmp_path_factory):
  return write_numbered(tmp_path_factory.mktemp("one_shard"), 21, 1)


def labels_of(ds, num_batches=None):
  """The stream's labels (= example indices), flattened, as ints."""
  if num_batches is not None:
    ds = ds.take(num_batches)
  return [int(label) for batch in ds for label in batch[1].numpy()]


def pipelines(count, replicas=None):
  replicas = replicas or count
  return [tf.distribute.InputContext(num_input_pipelines=count,
                                     input_pipeline_id=index,
                                     num_replicas_in_sync=replicas)
          for index in range(count)]


# --- evaluation --------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 7, 16, 64])
def test_eval_yields_every_example_once_in_file_order(numbered_dir,
                                                      batch_size):
  ds = dataset.load(numbered_dir, "validation", batch_size, training=False)
  seen, weights = [], []
  for inputs, labels, batch_weights in ds.as_numpy_iterator():
    assert inputs.shape == (batch_size, 2) and labels.shape == (batch_size,)
    seen += labels[batch_weights == 1].astype(int).tolist()
    weights += batch_weights.tolist()
    # Padding rows are zeros, so a model sees nothing stale.
    assert not inputs[batch_weights == 0].any()
  # conftest deals examples round-robin to 3 shards; files are read in order.
  assert seen == list(range(0, 50, 3)) + list(range(1, 50, 3)) + list(
      range(2, 50, 3))
  assert sum(weights) == 50 and len(weights) % batch_size == 0
  assert len(weights) < 50 + batch_size


@pytest.mark.parametrize("directory,num_pipelines,replicas", [
    ("numbered_dir", 2, 2),  # file sharding, uneven: 33 and 17 examples
    ("numbered_dir", 3, 3),
    ("one_shard_dir", 2, 2),  # record sharding
    ("numbered_dir", 2, 4),  # each pipeline feeds 2 replicas
])
def test_eval_pipelines_are_disjoint_cover_and_align(request, caplog,
                                                     directory, num_pipelines,
                                                     replicas):
  data_dir = request.getfixturevalue(directory)
  split = dataset.info(data_dir).splits["validation"]
  seen, batch_counts = [], []
  for context in pipelines(num_pipelines, replicas):
    with caplog.at_level(logging.WARNING):
      ds = dataset.load(data_dir, "validation", 4 * replicas, training=False,
                        input_context=context)
    batches = list(ds.as_numpy_iterator())
    batch_counts.append(len(batches))
    for _, labels, weights in batches:
      assert labels.shape == (4,)
      seen += labels[weights == 1].astype(int).tolist()
  assert sorted(seen) == list(range(split.num_examples))
  assert len(set(batch_counts)) == 1  # collectives never wait on a pipeline
  record_sharding_warnings = [
      r for r in caplog.records if "keeps 1 record in" in r.getMessage()]
  assert len(record_sharding_warnings) == (
      num_pipelines if len(split.files) < num_pipelines else 0)
  assert batch_counts[0] % (replicas // num_pipelines) == 0


@pytest.mark.parametrize("batch_size", [10, 16])  # no padding; padding
def test_eval_cache_serves_later_passes_from_memory(tmp_path, batch_size):
  data_dir = write_numbered(tmp_path, 50, 3)
  uncached = labels_of(dataset.load(data_dir, "validation", batch_size,
                                    training=False))
  ds = dataset.load(data_dir, "validation", batch_size, training=False,
                    cache=True)
  assert labels_of(ds) == uncached
  for path in dataset.info(data_dir).splits["validation"].files:
    os.remove(path)  # a reader that re-reads the files fails from here on
  assert labels_of(ds) == uncached


# --- training order ----------------------------------------------------------


@pytest.mark.parametrize("batch_size", [10, 16, 64])  # 64: more than an epoch
def test_training_epochs_are_permutations_seeded_by_seed_and_epoch(
    numbered_dir, batch_size):
  stream = labels_of(dataset.load(numbered_dir, "train", batch_size,
                                  training=True, seed=3),
                     num_batches=math.ceil(150 / batch_size))
  epochs = [stream[0:50], stream[50:100], stream[100:150]]
  for epoch in epochs:
    assert sorted(epoch) == list(range(50))
  assert epochs[0] != epochs[1] != epochs[2]
  again = labels_of(dataset.load(numbered_dir, "train", batch_size,
                                 training=True, seed=3),
                    num_batches=math.ceil(150 / batch_size))
  assert again == stream
  other_seed = labels_of(dataset.load(numbered_dir, "train", batch_size,
                                      training=True, seed=4),
                         num_batches=math.ceil(50 / batch_size))
  assert other_seed[:50] != stream[:50]


def test_training_batches_are_static_and_full(numbered_dir):
  ds = dataset.load(numbered_dir, "train", 16, training=True)
  assert ds.element_spec[0].shape == (16, 2)
  assert ds.element_spec[1].shape == (16,)


@pytest.mark.parametrize("directory,num_pipelines", [
    ("numbered_dir", 2), ("numbered_dir", 3), ("one_shard_dir", 2)])
def test_training_pipelines_split_each_epoch_disjointly(request, directory,
                                                        num_pipelines):
  data_dir = request.getfixturevalue(directory)
  split = dataset.info(data_dir).splits["train"]
  files = split.files
  lengths = dict(zip(files, split.shard_lengths))
  epochs = []
  for index, context in enumerate(pipelines(num_pipelines)):
    if len(files) >= num_pipelines:
      epoch_size = sum(lengths[path] for path in files[index::num_pipelines])
    else:
      epoch_size = len(range(index, split.num_examples, num_pipelines))
    ds = dataset.load(data_dir, "train", 2 * num_pipelines, training=True,
                      seed=1, input_context=context)
    stream = labels_of(ds, num_batches=epoch_size)  # batches of 2: 2 epochs
    epochs.append(stream[:epoch_size])
    assert sorted(stream[epoch_size:]) == sorted(epochs[-1])
  assert sorted(sum(epochs, [])) == list(range(split.num_examples))


# --- exact resume ------------------------------------------------------------


@pytest.mark.parametrize("directory,num_pipelines,replicas,start_step", [
    ("numbered_dir", 1, 1, 4),  # 4 steps x 16 = 64: inside epoch 2 of 50
    ("numbered_dir", 1, 1, 7),
    ("numbered_dir", 1, 2, 3),  # one pipeline feeds 2 replicas
    ("numbered_dir", 2, 2, 3),  # pipelines of 33 and 17: unequal epochs
    ("numbered_dir", 2, 2, 10),
    ("one_shard_dir", 2, 2, 4),  # record sharding: 11 and 10 per epoch
])
def test_resume_at_step_k_is_the_tail_of_an_uninterrupted_run(
    request, directory, num_pipelines, replicas, start_step):
  data_dir = request.getfixturevalue(directory)
  global_batch = 16
  batches_per_step = replicas // num_pipelines
  for context in pipelines(num_pipelines, replicas):
    def load(step, context=context):
      return dataset.load(data_dir, "train", global_batch, training=True,
                          seed=7, start_step=step, input_context=context)
    full = labels_of(load(0), num_batches=(start_step + 3) * batches_per_step)
    resumed = labels_of(load(start_step), num_batches=3 * batches_per_step)
    per_replica = global_batch // replicas
    assert resumed == full[start_step * batches_per_step * per_replica:]


def test_resume_with_augmentation_and_cache(tmp_path):
  data_dir = write_dataset(
      tmp_path, records.Schema(kind="image", shape=(8, 8, 3),
                               class_names=("a", "b", "c"),
                               image_format="png"),
      {"train": make_image_examples(20)}, num_shards=2)
  for cache in (False, True):
    def load(step, cache=cache):
      return dataset.load(data_dir, "train", 6, training=True, seed=2,
                          augment=True, cache=cache, start_step=step)
    full = list(load(0).take(8).as_numpy_iterator())
    resumed = list(load(5).take(3).as_numpy_iterator())
    for (images, labels), (expected_images, expected_labels) in zip(
        resumed, full[5:]):
      np.testing.assert_array_equal(images, expected_images)
      np.testing.assert_array_equal(labels, expected_labels)


def test_augmentation_crops_and_flips_but_keeps_labels(image_dataset_dir):
  def first_batch(augment):
    ds = dataset.load(image_dataset_dir, "train", 32, training=True, seed=0,
                      augment=augment)
    return next(iter(ds.as_numpy_iterator()))

  plain_images, plain_labels = first_batch(False)
  images, labels = first_batch(True)
  np.testing.assert_array_equal(labels, plain_labels)
  assert images.shape == plain_images.shape and images.dtype == np.uint8
  pad = dataset.CROP_PADDING
  candidates = [(top, left, flip) for top in range(2 * pad + 1)
                for left in range(2 * pad + 1) for flip in (False, True)]

  def crop(padded, top, left, flip):
    window = padded[top:top + 8, left:left + 8]
    return window[:, ::-1] if flip else window

  transforms = []
  for image, plain in zip(images, plain_images):
    padded = np.pad(plain, [(pad, pad), (pad, pad), (0, 0)])
    matches = [candidate for candidate in candidates
               if np.array_equal(image, crop(padded, *candidate))]
    assert matches, "not a crop (+ flip) of the original"
    transforms.append(matches[0])
  assert len({flip for _, _, flip in transforms}) == 2
  assert len({(top, left) for top, left, _ in transforms}) > 5


def test_training_cache_serves_later_epochs_from_memory(tmp_path):
  data_dir = write_numbered(tmp_path / "cached", 12, 2)
  ds = dataset.load(data_dir, "train", 4, training=True, seed=0, cache=True)
  iterator = iter(ds)
  first_epoch = [int(x) for _ in range(3) for x in next(iterator)[1]]
  for path in dataset.info(data_dir).splits["train"].files:
    os.remove(path)  # a reader that re-reads the files fails from here on
  later = [int(x) for _ in range(6) for x in next(iterator)[1]]
  assert sorted(first_epoch) == sorted(later[:12]) == list(range(12))


# --- formats and bad data ----------------------------------------------------


def test_gzip_shards_read_like_plain_ones(tmp_path, numbered_dir):
  gzip_dir = write_numbered(tmp_path / "gzip", 50, 3, compression="GZIP")
  assert dataset.info(gzip_dir).compression == "GZIP"
  for training in (False, True):
    def load(data_dir, training=training):
      return labels_of(dataset.load(data_dir, "train", 8, training=training),
                       num_batches=10)
    assert load(gzip_dir) == load(numbered_dir)


def test_images_come_out_uint8_with_the_metadata_shape(image_dataset_dir):
  ds = dataset.load(image_dataset_dir, "validation", 8, training=False)
  images, labels, _ = ds.element_spec
  assert images.shape == (8, 8, 8, 3) and images.dtype == tf.uint8
  assert labels.dtype == tf.int64
  resized = dataset.load(image_dataset_dir, "train", 4, training=True,
                         image_size=(5, 6))
  assert resized.element_spec[0].shape == (4, 5, 6, 3)


def test_images_of_varying_size_need_image_size(tmp_path):
  schema = records.Schema(kind="image", shape=(None, None, 3),
                          class_names=("a", "b", "c"))
  examples = (make_image_examples(4, height=6, width=9) +
              make_image_examples(4, height=10, width=7, prefix="big"))
  data_dir = write_dataset(tmp_path, schema, {"train": examples},
                           num_shards=2)
  with pytest.raises(ValueError, match="pass image_size"):
    dataset.load(data_dir, "train", 4, training=False)
  ds = dataset.load(data_dir, "train", 4, training=False, image_size=(8, 8))
  assert [images.shape for images, _, _ in ds.as_numpy_iterator()] == [
      (4, 8, 8, 3)] * 2


def corrupt(path, mode):
  data = bytearray(open(path, "rb").read())
  if mode == "crc":
    data[len(data) // 2] ^= 0xFF
  else:
    data = data[:-10]
  with open(path, "wb") as f:
    f.write(bytes(data))


@pytest.mark.parametrize("mode", ["crc", "truncated"])
@pytest.mark.parametrize("training", [False, True])
def test_a_bad_shard_stops_with_an_error_naming_the_file(tmp_path, mode,
                                                         training):
  data_dir = write_numbered(tmp_path, 30, 3)
  bad_file = dataset.info(data_dir).splits["train"].files[1]
  corrupt(bad_file, mode)
  ds = dataset.load(data_dir, "train", 5, training=training)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=os.path.basename(bad_file)) as raised:
    for _ in ds.take(12):
      pass
  line = dataset.describe_data_error(raised.value, skip_option="--skip")
  assert line.startswith(f"{bad_file}: read ") and "--skip skips" in line
  assert "\n" not in line


@pytest.mark.parametrize("broken", [
    b"\xff\xd8 not really a JPEG",
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # a PNG signature, then junk
])
def test_an_image_that_does_not_decode_is_described_as_bad_data(tmp_path,
                                                                 broken):
  schema = records.Schema(kind="image", shape=(8, 8, 3), class_names=("a",))
  good = make_image_examples(7, num_classes=1)
  # Dealt round-robin to 2 shards: "broken" is record 1 of the second.
  data_dir = write_dataset(tmp_path, schema, {
      "train": good[:3] + [("broken", broken, 0)] + good[3:],
      "validation": good}, num_shards=2)
  with pytest.raises(tf.errors.InvalidArgumentError) as raised:
    for _ in dataset.load(data_dir, "train", 8, training=True).take(1):
      pass
  line = dataset.describe_data_error(raised.value)
  assert line.startswith("an image in the dataset does not decode (")
  assert "cannot say which record" in line
  assert "Iterator::" not in line and "\n" not in line
  shard = dataset.info(data_dir).splits["train"].files[1]
  named = dataset.describe_data_error(raised.value, data_dir=data_dir)
  assert f": split train, record 1 (id 'broken') of {shard};" in named
  assert "\n" not in named
  assert dataset.find_undecodable(data_dir, ["validation"]) is None
  assert dataset.describe_data_error(
      tf.errors.InvalidArgumentError(None, None, "shapes differ")) is None
  assert dataset.describe_data_error(ValueError("x")) is None


@pytest.mark.parametrize("mode", ["crc", "truncated"])
def test_skip_bad_records_counts_reports_and_keeps_resume_exact(
    tmp_path, caplog, mode):
  data_dir = write_numbered(tmp_path, 30, 3)
  bad_file = dataset.info(data_dir).splits["train"].files[1]
  corrupt(bad_file, mode)
  with caplog.at_level(logging.WARNING):
    evaluation = dataset.load(data_dir, "train", 5, training=False,
                              skip_bad_records=True)
  report = [r.getMessage() for r in caplog.records if bad_file in
            r.getMessage()]
  assert len(report) == 1 and "unreadable" in report[0]
  lost = int(report[0].split(": ")[-1].split()[0])
  assert lost >= 1
  seen = [int(x) for _, labels, weights in evaluation.as_numpy_iterator()
          for x in labels[weights == 1]]
  assert len(seen) == 30 - lost and len(set(seen)) == len(seen)

  def load(step):
    return dataset.load(data_dir, "train", 4, training=True, seed=1,
                        start_step=step, skip_bad_records=True)
  full = labels_of(load(0), num_batches=20)
  assert sorted(full[:30 - lost]) == sorted(seen)  # epochs skip them too
  assert labels_of(load(12), num_batches=8) == full[12 * 4:]


def test_incomplete_dirs_and_bad_arguments_fail_with_the_path(tmp_path,
                                                              numbered_dir):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    dataset.load(str(tmp_path), "train", 4, training=True)
  with pytest.raises(ValueError, match="no split 'test'"):
    dataset.load(numbered_dir, "test", 4, training=True)
  with pytest.raises(ValueError, match="augment=True needs images"):
    dataset.load(numbered_dir, "train", 4, training=True, augment=True)
  with pytest.raises(ValueError, match="start_step"):
    dataset.load(numbered_dir, "validation", 4, training=False, start_step=3)
  missing_dir = write_numbered(tmp_path / "missing", 10, 2)
  os.remove(dataset.info(missing_dir).splits["train"].files[0])
  with pytest.raises(FileNotFoundError, match="missing 1 of 2 shards"):
    dataset.load(missing_dir, "train", 4, training=True)


def test_a_shard_that_vanishes_after_load_fails_naming_it(tmp_path):
  data_dir = write_numbered(tmp_path, 20, 2)
  ds = dataset.load(data_dir, "validation", 4, training=False)
  assert len(labels_of(ds)) == 20
  vanished = dataset.info(data_dir).splits["validation"].files[1]
  os.remove(vanished)  # e.g. the converter re-run into the same dir
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=os.path.basename(vanished) + ": read 0 records"):
    labels_of(ds)


def test_glob_characters_in_paths_are_taken_literally(tmp_path):
  data_dir = write_numbered(tmp_path / "odd [name]*?", 20, 2)
  ds = dataset.load(data_dir, "validation", 4, training=False)
  assert sorted(labels_of(ds)) == list(range(20))


@pytest.mark.parametrize("actual_count", [3, 12])
def test_shard_lengths_that_disagree_with_metadata_fail_naming_the_file(
    tmp_path, actual_count):
  data_dir = write_numbered(tmp_path, 20, 2)
  files = dataset.info(data_dir).splits["train"].files
  with tf.io.TFRecordWriter(files[0]) as writer:  # the metadata says 10
    for index in range(actual_count):
      writer.write(records.make_example(NUMBERED_SCHEMA, "x", [0.0, 0.0],
                                        float(index)))
  ds = dataset.load(data_dir, "train", 4, training=False)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=os.path.basename(files[0]) +
                     f": read {actual_count} records"):
    list(ds)
  if actual_count > 10:  # more records than listed is no bad record to skip
    with pytest.raises(ValueError, match=os.path.basename(files[0])):
      dataset.load(data_dir, "train", 4, training=False,
                   skip_bad_records=True)


@pytest.mark.parametrize("block_size", [4, 5])
@pytest.mark.parametrize("actual_count", [3, 8, 9, 10, 12])
def test_the_count_check_holds_across_block_boundaries(tmp_path, monkeypatch,
                                                       block_size,
                                                       actual_count):
  """Shards spanning several read blocks: short by a whole block, by part of
  one, exact, and long all come out right (the other tests' shards fit in
  one block)."""
  monkeypatch.setattr(dataset, "READ_BLOCK_SIZE", block_size)
  data_dir = write_numbered(tmp_path, 20, 2)
  files = dataset.info(data_dir).splits["train"].files
  with tf.io.TFRecordWriter(files[1]) as writer:  # the metadata says 10
    for index in range(actual_count):
      writer.write(records.make_example(NUMBERED_SCHEMA, "x", [0.0, 0.0],
                                        float(100 + index)))
  for training in (False, True):
    ds = dataset.load(data_dir, "train", 4, training=training)
    if actual_count == 10:
      labels = labels_of(ds, num_batches=None if not training else 10)
      assert sorted(labels[:20]) == list(range(0, 20, 2)) + list(
          range(100, 110))
      continue
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=os.path.basename(files[1]) +
                       f": read {actual_count} records, expected 10"):
      labels_of(ds, num_batches=None if not training else 10)


# --- strategies and TFDS -----------------------------------------------------


MIRRORED_SCRIPT = """
import json, sys
import tensorflow as tf
from pipeline import dataset
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
data_dir, start_step, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def per_replica_labels(distributed, steps):
  iterator = iter(distributed)
  return [[local[1].numpy().tolist() for local in
           strategy.experimental_local_results(next(iterator))]
          for _ in range(steps)]

train = strategy.distribute_datasets_from_function(
    lambda context: dataset.load(data_dir, "train", 8, training=True, seed=3,
                                 start_step=start_step, input_context=context))
evaluation = strategy.distribute_datasets_from_function(
    lambda context: dataset.load(data_dir, "validation", 8, training=False,
                                 input_context=context))
seen = []
for batch in evaluation:
  for _, labels, weights in zip(*map(strategy.experimental_local_results,
                                     batch)):
    seen += labels.numpy()[weights.numpy() == 1].tolist()
print(json.dumps({"train": per_replica_labels(train, steps), "eval": seen}))
"""


def run_under_mirrored(data_dir, start_step, steps):
  """Runs MIRRORED_SCRIPT in a fresh process: two logical CPUs must be set up
  before TF initialises its devices, which this test process already did."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-c", MIRRORED_SCRIPT, data_dir, str(start_step),
       str(steps)], capture_output=True, text=True, cwd=root, check=False,
      env={**os.environ, "PYTHONPATH": root})
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_two_replica_mirrored_strategy_resumes_exactly(numbered_dir):
  # One input pipeline feeds both replicas: 2 batches of 4 per global step.
  full = run_under_mirrored(numbered_dir, 0, 9)
  resumed = run_under_mirrored(numbered_dir, 6, 3)
  assert resumed["train"] == full["train"][6:]
  assert all(len(replica) == 4 for step in full["train"] for replica in step)
  epoch = sum((sum(step, []) for step in full["train"]), [])[:50]
  assert sorted(epoch) == list(range(50))
  assert sorted(int(x) for x in full["eval"]) == list(range(50))


def test_reads_a_dir_written_by_tfds(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(8, 8, 3)),
              "label": tfds.features.ClassLabel(num_classes=3),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(11)}

    def _generate_examples(self, count):
      rng = np.random.default_rng(0)
      for index in range(count):
        yield index, {"image": rng.integers(0, 255, (8, 8, 3), np.uint8),
                      "label": index % 3}

  builder = TinyImages(data_dir=str(tmp_path))
  builder.download_and_prepare()
  expected = {int(example["label"]) for example in
              tfds.as_numpy(builder.as_dataset(split="train"))}
  ds = dataset.load(builder.data_dir, "train", 4, training=False)
  labels = [int(x) for _, batch_labels, weights in ds.as_numpy_iterator()
            for x in batch_labels[weights == 1]]
  assert len(labels) == 11 and set(labels) == expected
  assert ds.element_spec[0].shape == (4, 8, 8, 3)
