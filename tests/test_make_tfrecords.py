"""The converter as users run it: the CLI, the demo, determinism, the guards.

Conversions run the real Beam job (in-process FnApiRunner, or two worker
processes where parallelism is the point) on a few small images.
"""

import hashlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from pipeline import demo_data
from pipeline import convert
from pipeline import metadata
from pipeline import shard_writer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def raw_images(tmp_path_factory):
  """A 3-class JPEG folder, 20 images per class, sorted by class on disk."""
  root = tmp_path_factory.mktemp("raw")
  rng = np.random.default_rng(0)
  for class_name in ("ant", "bee", "cow"):
    os.makedirs(root / class_name)
    for index in range(20):
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (9, 9, 3), np.uint8)).save(
          buffer, format="JPEG")
      (root / class_name / f"{index:02d}.jpg").write_bytes(buffer.getvalue())
  return root


def config(input_path, output_dir, **kwargs):
  kwargs.setdefault("source", "image_folder")
  return convert.ConvertConfig(
      input=str(input_path), output_dir=str(output_dir), name="toy", **kwargs)


def shard_digests(output_dir):
  return {name: hashlib.sha256((output_dir / name).read_bytes()).hexdigest()
          for name in sorted(os.listdir(output_dir)) if ".tfrecord-" in name}


def run_cli(*args, cwd=REPO_ROOT):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  return subprocess.run([sys.executable, "-m", "pipeline.make_tfrecords", *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


def test_tfds_reads_every_example_and_shards_are_shuffled(raw_images, tmp_path):
  summaries = convert.convert(config(raw_images, tmp_path, num_shards=4))
  assert sum(s.num_examples for s in summaries) == 60
  builder = tfds.builder_from_directory(str(tmp_path))
  ids = []
  for split in builder.info.splits:
    ids += [e["id"].decode() for e in builder.as_dataset(split=split)
            .as_numpy_iterator()]
  assert sorted(ids) == sorted(f"{c}/{i:02d}.jpg" for c in ("ant", "bee", "cow")
                               for i in range(20))
  first_shard = builder.info.splits["train"].filepaths[0]
  classes = [tf.train.Example.FromString(r).features.feature["id"]
             .bytes_list.value[0].split(b"/")[0]
             for r in tf.data.TFRecordDataset(str(first_shard)).as_numpy_iterator()]
  assert len(set(classes)) > 1 and classes != sorted(classes)
  info = metadata.read(str(tmp_path))
  assert info.schema.shape == (9, 9, 3) and info.schema.image_format == "jpeg"
  assert not (tmp_path / shard_writer.STAGING_DIR).exists()


def test_same_input_gives_the_same_bytes_whatever_the_workers(raw_images,
                                                              tmp_path,
                                                              monkeypatch):
  monkeypatch.setenv("PYTHONPATH", REPO_ROOT)  # the worker processes import us
  convert.convert(config(raw_images, tmp_path / "one", num_shards=3),
                         ["--direct_num_workers=1"])
  convert.convert(
      config(raw_images, tmp_path / "two", num_shards=3),
      ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
  one, two = shard_digests(tmp_path / "one"), shard_digests(tmp_path / "two")
  assert len(one) == 6 and one == two
  convert.convert(config(raw_images, tmp_path / "seed", num_shards=3,
                                seed=1))
  assert shard_digests(tmp_path / "seed") != one


def test_gzip_shards_are_deterministic_and_read_by_tf_data(raw_images, tmp_path):
  for name in ("a", "b"):
    convert.convert(config(raw_images, tmp_path / name, num_shards=2,
                                  compression="GZIP"))
  assert shard_digests(tmp_path / "a") == shard_digests(tmp_path / "b")
  info = metadata.read(str(tmp_path / "a"))
  assert info.compression == "GZIP"
  files = [f for split in info.splits.values() for f in split.files]
  assert (tmp_path / "a" / os.path.basename(files[0])).read_bytes()[:2] == \
      b"\x1f\x8b"
  count = sum(1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP"))
  assert count == 60


def test_more_data_never_moves_an_example_between_splits(raw_images, tmp_path):
  convert.convert(config(raw_images, tmp_path / "before"))
  bigger = tmp_path / "bigger"
  subprocess.run(["cp", "-r", str(raw_images), str(bigger)], check=True)
  for index in range(20, 40):
    (bigger / "ant" / f"{index:02d}.jpg").write_bytes(
        (raw_images / "ant" / "00.jpg").read_bytes())
  convert.convert(config(bigger, tmp_path / "after"))

  def ids(output_dir, split):
    builder = tfds.builder_from_directory(str(output_dir))
    return {e["id"] for e in builder.as_dataset(split=split).as_numpy_iterator()}

  before = ids(tmp_path / "before", "validation")
  after = ids(tmp_path / "after", "validation")
  assert before and before <= after
  assert ids(tmp_path / "before", "train") <= ids(tmp_path / "after", "train")


def test_too_many_bad_records_fail_without_metadata(raw_images, tmp_path):
  bad = tmp_path / "raw"
  subprocess.run(["cp", "-r", str(raw_images), str(bad)], check=True)
  for index in range(5):
    (bad / "cow" / f"{index:02d}.jpg").write_bytes(b"")
  with pytest.raises(convert.UserError, match="5 of 60 records were bad"):
    convert.convert(config(bad, tmp_path / "out", max_bad_fraction=0.05))
  assert (tmp_path / "out" / convert.DEAD_LETTER_FILE).exists()
  with pytest.raises(FileNotFoundError, match="no dataset_info.json"):
    metadata.read(str(tmp_path / "out"))
  # Under the limit the same input converts, and the summary counts them.
  summaries = convert.convert(config(bad, tmp_path / "ok",
                                            max_bad_fraction=0.1))
  assert sum(s.num_rejected for s in summaries) == 5
  assert sum(s.num_examples for s in summaries) == 55


def test_a_run_that_dies_midway_leaves_no_dataset(raw_images, tmp_path,
                                                  monkeypatch):
  calls = []
  real_frame = shard_writer.tfrecord_frame

  def frame_then_die(record):
    calls.append(1)
    if len(calls) > 30:
      raise RuntimeError("worker killed")
    return real_frame(record)

  monkeypatch.setattr(shard_writer, "tfrecord_frame", frame_then_die)
  with pytest.raises(Exception, match="worker killed"):
    convert.convert(config(raw_images, tmp_path, num_shards=4))
  assert not (tmp_path / "dataset_info.json").exists()
  with pytest.raises(FileNotFoundError, match="no dataset_info.json"):
    metadata.read(str(tmp_path))
  monkeypatch.setattr(shard_writer, "tfrecord_frame", real_frame)
  # Shards finished before the failure are there, under their final names
  # (the half-written one is not), so the dir is refused without --overwrite.
  assert any(".tfrecord-" in name for name in os.listdir(tmp_path))
  with pytest.raises(convert.UserError, match="did not finish"):
    convert.convert(config(raw_images, tmp_path, num_shards=4))
  convert.convert(config(raw_images, tmp_path, num_shards=4,
                                overwrite=True))
  assert metadata.read(str(tmp_path)).splits["train"].num_examples > 0


def test_splits_flag_on_data_with_its_own_splits_is_refused(tmp_path):
  for split in ("train", "test"):
    os.makedirs(tmp_path / "raw" / split / "cat")
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    (tmp_path / "raw" / split / "cat" / "0.png").write_bytes(buffer.getvalue())
  with pytest.raises(convert.UserError, match="has its own splits"):
    convert.convert(config(tmp_path / "raw", tmp_path / "out",
                                  splits=(("train", 1.0),)))


def test_existing_dataset_is_refused_then_replaced_with_overwrite(raw_images,
                                                                  tmp_path):
  convert.convert(config(raw_images, tmp_path, num_shards=4))
  with pytest.raises(convert.UserError, match="already holds a dataset"):
    convert.convert(config(raw_images, tmp_path, num_shards=2))
  convert.convert(config(raw_images, tmp_path, num_shards=2,
                                overwrite=True))
  shards = [n for n in os.listdir(tmp_path) if ".tfrecord-" in n]
  assert shards and all(n.endswith("-of-00002") for n in shards)
  assert metadata.read(str(tmp_path)).splits["train"].num_examples + \
      metadata.read(str(tmp_path)).splits["validation"].num_examples == 60


def test_demo_with_no_flags_converts_the_shapes(tmp_path):
  result = run_cli(cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert "data/shapes" in result.stdout
  info = metadata.read(str(tmp_path / "data" / "shapes"))
  assert info.schema.class_names == tuple(sorted(demo_data.CLASS_NAMES))
  assert info.schema.shape == (32, 32, 3)
  total = sum(s.num_examples for s in info.splits.values())
  assert total == 300 * len(demo_data.CLASS_NAMES)
  assert len(info.splits["train"].files) == shard_writer.MIN_SHARDS
  # A second run replaces its own demo output instead of refusing.
  assert run_cli(cwd=tmp_path).returncode == 0


def test_demo_shapes_are_deterministic(tmp_path):
  names = demo_data.write_shapes(str(tmp_path / "a"), examples_per_class=3)
  demo_data.write_shapes(str(tmp_path / "b"), examples_per_class=3, seed=0)
  for name in names:
    for index in range(3):
      path = f"{name}/{index:04d}.png"
      assert (tmp_path / "a" / path).read_bytes() == \
          (tmp_path / "b" / path).read_bytes()
  pixels = np.asarray(Image.open(tmp_path / "a" / names[0] / "0000.png"))
  assert pixels.shape == (32, 32, 3) and pixels.std() > 10


@pytest.mark.parametrize("args,message", [
    (["--input=/no/such/dir", "--output_dir=OUT"], "no such file or directory"),
    (["--input=EMPTY", "--output_dir=OUT"], "no files under it"),
    (["--source=pickle", "--input=RAW", "--output_dir=OUT"],
     "flag --source=pickle: value should be one of"),
    (["--input=RAW", "--output_dir=OUT", "--splits=train:0.7"],
     "fractions must sum to 1"),
    (["--input=RAW", "--output_dir=OUT", "--image_size=big"],
     "--image_size=big: expected SIZE or HEIGHTxWIDTH"),
    (["--input=RAW", "--output_dir=OUT", "--num_shard=3"],
     "unknown flag --num_shard"),
    (["--input=RAW", "--output_dir=OUT", "--max_bad_fraction=2"],
     "max_bad_fraction"),
    (["--input=RAW", "--output_dir=DATASET"], "already holds a dataset"),
    (["--input=RAW", "--output_dir=RAW/tfrecords"], "is inside --input="),
    (["--input=RAW", "--output_dir=AFILE/out"], "cannot create it"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(raw_images, tmp_path, args,
                                                  message):
  (tmp_path / "empty").mkdir()
  (tmp_path / "afile").write_text("a file, not a dir")
  convert.convert(config(raw_images, tmp_path / "dataset", num_shards=1))
  paths = {"RAW": str(raw_images), "EMPTY": str(tmp_path / "empty"),
           "OUT": str(tmp_path / "out"), "DATASET": str(tmp_path / "dataset"),
           "AFILE": str(tmp_path / "afile")}
  for placeholder, path in paths.items():
    args = [arg.replace(f"={placeholder}", f"={path}") for arg in args]
  result = run_cli(*args)
  assert result.returncode in (1, 2)
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("make_tfrecords: error:")]
  assert len(errors) == 1 and message in errors[0], result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out" / "dataset_info.json").exists()


def test_usable_cores_follow_the_affinity_mask():
  mask = os.sched_getaffinity(0)  # Linux, like every machine we run on
  try:
    os.sched_setaffinity(0, {min(mask)})  # what taskset -c does
    assert convert.usable_cores() == 1
  finally:
    os.sched_setaffinity(0, mask)
  assert convert.usable_cores() == len(mask)


@pytest.mark.parametrize("beam_args,work_seconds,cores,expected", [
    ([], 1.0, 2, ("in_memory", 1)),  # small: worker start-up would dominate
    ([], 60.0, 2, ("multi_processing", 2)),
    ([], 60.0, 1, ("in_memory", 1)),  # one core: nothing to gain
    (["--direct_num_workers=1"], 60.0, 2, ("in_memory", 1)),  # the user's say
])
def test_local_runner_is_parallel_only_for_big_work(
    beam_args, work_seconds, cores, expected, monkeypatch):
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(convert, "usable_cores", lambda: cores)
  options = convert.parse_beam_options(beam_args)
  runner, options, _ = convert.choose_runner(options, beam_args,
                                                    work_seconds)
  assert type(runner).__name__ == "FnApiRunner"  # never Prism: it downloads
  direct = options.view_as(pipeline_options.DirectOptions)
  assert (direct.direct_running_mode, direct.direct_num_workers) == expected
