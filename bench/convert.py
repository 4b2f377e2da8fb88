r"""Benchmark: make_tfrecords vs the plain loop a user would write.

  python -m bench.convert                      # 10k and 100k JPEGs, 3 repeats
  python -m bench.convert --sizes=2000 --repeats=1   # a quick look
  python -m bench.convert --sizes=100000 --cores=1,2 # the ratio per core count

Both sides run as a whole subprocess, which is what the user waits for
(imports included), on the same cached folder of small JPEGs, alternating
order, once keeping the bytes and once resizing. Printed: median wall time,
examples/s, the ratio plain/job (> 1: the job is faster) and the peak memory
(RSS summed over the process tree), at two sizes to show that memory does not
grow with the data, and how the job ran (in-process or N worker processes).
--cores pins both sides to the first N cores (as taskset would), to show how
the ratio grows with cores. Not a test: timings on a shared machine are noisy, so only
side-by-side ratios from one run mean anything.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

_SIZES = flags.DEFINE_list("sizes", ["10000", "100000"],
                           "Dataset sizes (number of JPEGs) to convert.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs per side; medians shown.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "/tmp/bench_convert",
                                 "Where the JPEG folders are kept between runs.")
_RESIZE = flags.DEFINE_integer("resize", 24, "Side of the resize case.")
_CORES = flags.DEFINE_list("cores", [],
                           "Core counts to pin both sides to, e.g. 1,2; "
                           "default: all usable cores.")
_JOB_ARGS = flags.DEFINE_list("job_args", [],
                              "Extra flags for make_tfrecords, e.g. "
                              "--job_args=--direct_num_workers=1")
# Internal: the plain loop, run in its own process by the benchmark.
_PLAIN_LOOP = flags.DEFINE_string("plain_loop", None, "INPUT:OUTPUT (internal)")

NUM_CLASSES = 10
IMAGE_SIDE = 32
NUM_SHARDS = 16


def ensure_jpeg_folder(root: str, count: int) -> str:
  """ROOT/classNN/NNNNNNN.jpg, 32x32 noise JPEGs (~1.5 KB), written once."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if os.path.isdir(root):
    return root
  staging = root + ".partial"
  shutil.rmtree(staging, ignore_errors=True)
  rng = np.random.default_rng(0)
  bases = rng.integers(0, 256, (64, IMAGE_SIDE, IMAGE_SIDE, 3), np.uint8)
  for label in range(NUM_CLASSES):
    os.makedirs(os.path.join(staging, f"class{label:02d}"))
  for index in range(count):
    pixels = np.roll(bases[index % 64], index % IMAGE_SIDE, axis=1)
    Image.fromarray(pixels).save(
        os.path.join(staging, f"class{index % NUM_CLASSES:02d}",
                     f"{index:07d}.jpg"), quality=90)
  os.replace(staging, root)
  return root


def plain_loop(input_dir: str, output_dir: str, resize: int | None) -> None:
  """What a user writes without Beam: one process, round-robin shards."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(output_dir, exist_ok=True)
  class_names = sorted(os.listdir(input_dir))
  writers = [tf.io.TFRecordWriter(
      os.path.join(output_dir, f"plain.tfrecord-{i:05d}-of-{NUM_SHARDS:05d}"))
             for i in range(NUM_SHARDS)]
  count = 0
  for label, class_name in enumerate(class_names):
    for file_name in sorted(os.listdir(os.path.join(input_dir, class_name))):
      with open(os.path.join(input_dir, class_name, file_name), "rb") as f:
        data = f.read()
      if resize:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize(
            (resize, resize), Image.Resampling.BILINEAR).save(
                buffer, format="JPEG", quality=95)
        data = buffer.getvalue()
      example = tf.train.Example(features=tf.train.Features(feature={
          "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
          "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
          "id": tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[f"{class_name}/{file_name}".encode()])),
      }))
      writers[count % NUM_SHARDS].write(example.SerializeToString())
      count += 1
  for writer in writers:
    writer.close()


def run_measured(command: list, cores: int | None) -> tuple:
  """Runs `command` pinned to the first `cores` cores (None: all); returns
  (wall seconds, peak RSS MiB of its process tree, its stdout)."""
  import psutil  # pylint: disable=g-import-not-at-top
  usable = sorted(os.sched_getaffinity(0))
  pinned = set(usable[:cores] if cores else usable)
  started = time.monotonic()
  # Affinity is inherited by the job's worker processes.
  process = subprocess.Popen(command, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: os.sched_setaffinity(0, pinned))
  parent = psutil.Process(process.pid)
  peak = 0
  while process.poll() is None:
    try:
      tree = [parent] + parent.children(recursive=True)
      peak = max(peak, sum(p.memory_info().rss for p in tree
                           if p.is_running()))
    except psutil.Error:
      pass  # a child exited between listing and reading
    time.sleep(0.05)
  seconds = time.monotonic() - started
  stdout, stderr = process.communicate()
  if process.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} failed:\n{stderr}")
  return seconds, peak / 2**20, stdout


def job_mode(stdout: str) -> str:
  """How the job ran, from its "writing N shards (local FnApiRunner, ...)"."""
  found = re.search(r"local FnApiRunner, ([^)]*)\)", stdout)
  return found.group(1).replace(" multi_processing", "") if found else "?"


def benchmark_case(input_dir: str, count: int, resize: int | None,
                   repeats: int, cores: int | None) -> dict:
  output = os.path.join(_CACHE_DIR.value, "out")
  job = [sys.executable, "-m", "pipeline.make_tfrecords", f"--input={input_dir}",
         f"--output_dir={output}", "--overwrite", "--max_bad_fraction=0"]
  job += [f"--image_size={resize}", "--image_format=jpeg"] if resize else []
  job += _JOB_ARGS.value
  plain = [sys.executable, "-m", "bench.convert",
           f"--plain_loop={input_dir}:{output}"]
  plain += [f"--resize={resize}"] if resize else ["--resize=0"]
  runs = {"plain": [], "job": []}
  mode = "?"
  for repeat in range(repeats):
    order = ("plain", "job") if repeat % 2 == 0 else ("job", "plain")
    for side in order:
      shutil.rmtree(output, ignore_errors=True)
      seconds, rss, stdout = run_measured(plain if side == "plain" else job,
                                          cores)
      runs[side].append((seconds, rss))
      if side == "job":
        mode = job_mode(stdout)
  result = {"count": count, "resize": resize, "mode": mode}
  for side, measured in runs.items():
    result[side] = statistics.median(seconds for seconds, _ in measured)
    result[f"{side}_rss"] = statistics.median(rss for _, rss in measured)
  return result


def main(argv):
  del argv
  if _PLAIN_LOOP.value:
    input_dir, output_dir = _PLAIN_LOOP.value.split(":")
    plain_loop(input_dir, output_dir, _RESIZE.value or None)
    return
  load = os.getloadavg()[0]
  usable = len(os.sched_getaffinity(0))
  print(f"{usable} usable cores, load average {load:.1f} at start; "
        f"{_REPEATS.value} runs per side, medians")
  print(f"{'images':>8} {'case':<12}{'cores':>6} {'job ran':<12}{'plain s':>8}"
        f"{'job s':>7}{'plain ex/s':>11}{'job ex/s':>10}{'ratio':>7}"
        f"{'plain MiB':>10}{'job MiB':>8}")
  for size in (int(s) for s in _SIZES.value):
    input_dir = ensure_jpeg_folder(
        os.path.join(_CACHE_DIR.value, f"jpeg_{size}"), size)
    for resize in (None, _RESIZE.value):
      for cores in [int(c) for c in _CORES.value] or [None]:
        r = benchmark_case(input_dir, size, resize, _REPEATS.value, cores)
        case = f"resize {resize}" if resize else "bytes kept"
        print(f"{size:>8} {case:<12}{cores or usable:>6} {r['mode']:<12}"
              f"{r['plain']:>8.1f}{r['job']:>7.1f}"
              f"{size / r['plain']:>11,.0f}{size / r['job']:>10,.0f}"
              f"{r['plain'] / r['job']:>7.2f}{r['plain_rss']:>10.0f}"
              f"{r['job_rss']:>8.0f}", flush=True)
  print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
  app.run(main)
