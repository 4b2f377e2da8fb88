"""The conversion itself: raw dataset -> shards + TFDS metadata, via Beam.

`convert(ConvertConfig)` is what `python -m pipeline.make_tfrecords` runs
(that module only turns flags into a ConvertConfig); tests and notebooks call
it directly.

How it runs: the driver lists keys only (paths, record indices, row numbers),
assigns splits and shards by hash, and writes one task file per shard; Beam
runs one element per shard (see shard_writer for why); the driver then merges
the shards' statistics, writes the dead-letter file and, last, the metadata.
Without --runner it runs locally on Beam's FnApiRunner (the DirectRunner would
first try to download the Prism runner), in-process for small inputs and on
one process per core for large ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options import pipeline_options
from apache_beam.runners.portability import fn_api_runner

from pipeline import metadata
from pipeline import shard_writer
from pipeline.sources import cifar_binary
from pipeline.sources import csv_table
from pipeline.sources import image_folder
from pipeline.sources import mnist_idx
from pipeline.sources import tfds_dataset

SOURCES = ("image_folder", "mnist_idx", "cifar_binary", "csv", "tfds")
DEMO_RAW_DIR = os.path.join("data", "shapes_raw")
DEMO_OUTPUT_DIR = os.path.join("data", "shapes")
DEFAULT_SPLITS = (("train", 0.9), ("validation", 0.1))
DEAD_LETTER_FILE = "dead_letter.jsonl"
METADATA_FILES = ("dataset_info.json", "features.json", "metadata.json")
# Local parallelism pays only for big jobs: Beam's worker processes take
# ~3 s to start (a trivial pipeline: 4.5 s vs 1.7 s in-process). Measured on
# 2 cores at 100k 32x32 JPEGs (bench/convert.py), in-process vs two workers:
# 1.42x vs 1.22x the plain loop with bytes kept (~1.6 s of estimated work),
# 1.06x vs 1.58x with a resize (~15 s). Work is estimated from measured
# per-example costs.
PARALLEL_MIN_WORK_SECONDS = 3.0
SECONDS_PER_EXAMPLE = 16e-6  # bytes kept: read, check, encode, frame
SECONDS_PER_REENCODED_EXAMPLE = 150e-6  # plus decode, resize, encode (32x32)


class UserError(Exception):
  """Bad input or flags: reported as one line, exit code 1, no traceback."""


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
  """Everything a conversion needs; built once from the flags."""
  source: str
  input: str
  output_dir: str
  name: str
  splits: tuple | None = None  # ((name, fraction), ...); None: the raw splits
  num_shards: int | None = None  # per split; None: by size
  image_size: tuple | None = None  # (height, width)
  image_format: str | None = None
  compression: str | None = None
  overwrite: bool = False
  max_bad_fraction: float = 0.01
  seed: int = 0
  label_column: str = "label"
  task: str | None = None
  tfds_data_dir: str | None = None
  tfds_splits: tuple = ()


# --- input -------------------------------------------------------------------


def path_exists(path: str) -> bool:
  """A file, a glob with matches, or a folder (on GCS: a non-empty prefix)."""
  if FileSystems.exists(path):
    return True
  patterns = [path, path.rstrip("/") + "/**"]
  return any(result.metadata_list
             for result in FileSystems.match(patterns, limits=[1, 1]))


def detect_source(input_path: str) -> str:
  """Guesses the source from the input's names; UserError when it cannot."""
  if re.search(r"\.(csv|tsv)(\.gz)?$", input_path):
    return "csv"
  if "://" in input_path:
    names = [posixpath.basename(m.path) for m in FileSystems.match(
        [input_path.rstrip("/") + "/*"])[0].metadata_list]
  elif os.path.isdir(input_path):  # Beam's local match walks the whole
    try:  # tree: 0.4 s at 100k images
      with os.scandir(input_path) as entries:
        names = sorted(entry.name for entry in entries
                       if entry.is_file() and not entry.name.startswith("."))
    except OSError as error:
      raise UserError(f"{input_path}: cannot list it: {error}") from error
  else:
    names = []
  if any(mnist_idx.IDX_FILE.match(name) for name in names):
    return "mnist_idx"
  if any(cifar_binary.split_of(name) for name in names):
    return "cifar_binary"
  if names:
    raise UserError(f"{input_path}: cannot tell its source from its files "
                    f"(e.g. {names[0]}); pass --source={'|'.join(SOURCES)}")
  return "image_folder"


def list_source(config: ConvertConfig):
  """The source's listing (see pipeline/sources); UserError on bad input."""
  try:
    if config.source == "image_folder":
      listing = image_folder.list_examples(config.input)
    elif config.source == "mnist_idx":
      listing = mnist_idx.list_examples(config.input)
    elif config.source == "cifar_binary":
      listing = cifar_binary.list_examples(config.input)
    elif config.source == "csv":
      listing = csv_table.list_examples(config.input, config.label_column,
                                        config.task)
    elif config.source == "tfds":
      listing = tfds_dataset.list_examples(config.input, config.tfds_data_dir,
                                           config.tfds_splits)
    else:
      raise UserError(f"unknown source {config.source!r}; one of {SOURCES}")
  except (ValueError, OSError) as error:
    raise UserError(str(error)) from error
  if not listing.items:
    raise UserError(f"{config.input}: no examples found")
  if listing.schema.kind != "image" and (config.image_size or
                                         config.image_format):
    raise UserError("--image_size/--image_format apply to image sources; "
                    f"{config.input} holds vectors")
  return listing


# --- output dir --------------------------------------------------------------


def _our_files(output_dir: str) -> list:
  """Files a previous conversion left in `output_dir`."""
  patterns = [posixpath.join(output_dir, "*.tfrecord-*")] + [
      posixpath.join(output_dir, name)
      for name in METADATA_FILES + (DEAD_LETTER_FILE,)]
  patterns.append(shard_writer.staging_path(output_dir, "**"))
  return [m.path for result in FileSystems.match(patterns)
          for m in result.metadata_list]


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
  """Refuses a dir holding a dataset unless `overwrite`; then removes it.

  Metadata goes first, so an interrupted removal never leaves a dir that
  still looks like a finished dataset.
  """
  existing = _our_files(output_dir)
  names = {posixpath.basename(path) for path in existing
           if shard_writer.STAGING_DIR not in path}
  if names & set(METADATA_FILES) and not overwrite:
    raise UserError(f"{output_dir} already holds a dataset; pass --overwrite "
                    "to replace it, or choose another --output_dir")
  if any(".tfrecord-" in name for name in names) and not overwrite:
    raise UserError(f"{output_dir} holds shards of a conversion that did not "
                    "finish; pass --overwrite to replace them")
  existing.sort(key=lambda path: posixpath.basename(path) not in METADATA_FILES)
  if existing:
    FileSystems.delete(existing)
  if not FileSystems.exists(output_dir):
    try:
      FileSystems.mkdirs(output_dir)
    except OSError as error:  # a file in the way, no permission, ...
      raise UserError(f"--output_dir={output_dir}: cannot create it "
                      f"({getattr(error, 'strerror', None) or error})") from error


def check_output_outside_input(input_path: str, output_dir: str) -> None:
  """An output dir inside the input dir would be read as input next time
  (an image folder would gain a class named after it)."""
  def normal(path):
    return path.rstrip("/") if "://" in path else os.path.abspath(path)
  source, output = normal(input_path), normal(output_dir)
  if output == source or output.startswith(source.rstrip("/") + "/"):
    raise UserError(f"--output_dir={output_dir} is inside --input="
                    f"{input_path}; write the dataset elsewhere")


# --- the job -----------------------------------------------------------------


def parse_beam_options(beam_args: list):
  """Beam's options as typed; UserError for a flag that neither we nor Beam know."""
  for previous, arg in zip([""] + beam_args, beam_args):
    # A bare word is fine only as the value of "--flag value".
    if not arg.startswith("-") and not (previous.startswith("-") and
                                        "=" not in previous):
      raise UserError(f"unexpected argument {arg!r}")
  options = pipeline_options.PipelineOptions(beam_args)
  known = options.get_all_options()
  unknown = set(options.get_all_options(retain_unknown_options=True)) - set(known)
  if unknown:
    raise UserError(f"unknown flag --{sorted(unknown)[0]} (not ours, not Beam's)")
  return options


def usable_cores() -> int:
  """The cores this process may run on (taskset, cgroup cpusets), not the
  machine's count."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def choose_runner(options, beam_args: list, estimated_seconds: float):
  """The user's --runner, else a local FnApiRunner sized for the work.

  Without --runner: one process per core when the single-process work is
  estimated past PARALLEL_MIN_WORK_SECONDS, else in-process; the user's
  --direct_num_workers/--direct_running_mode win. Returns (runner or None
  for Beam's own choice, options, a description for the log).
  """
  if options.view_as(pipeline_options.StandardOptions).runner is not None:
    return None, options, options.view_as(pipeline_options.StandardOptions).runner
  # The flags as typed: get_all_options(drop_default=True) would hide a
  # --direct_num_workers=1, which equals Beam's default.
  given = {arg.lstrip("-").split("=")[0] for arg in beam_args}
  direct = options.view_as(pipeline_options.DirectOptions)
  workers = usable_cores()
  if ("direct_num_workers" not in given and "direct_running_mode" not in given
      and estimated_seconds >= PARALLEL_MIN_WORK_SECONDS and workers > 1):
    direct.direct_num_workers = workers
    direct.direct_running_mode = "multi_processing"
  mode = (f"{direct.direct_num_workers} {direct.direct_running_mode} workers"
          if direct.direct_running_mode != "in_memory" else "in-process")
  return fn_api_runner.FnApiRunner(), options, f"local FnApiRunner, {mode}"


def run_beam(tasks: dict, listing, shard_config, beam_args: list) -> None:
  per_example = (SECONDS_PER_REENCODED_EXAMPLE
                 if shard_config.image_size or shard_config.image_format
                 else SECONDS_PER_EXAMPLE)
  runner, options, description = choose_runner(
      parse_beam_options(beam_args), beam_args, per_example * len(listing.items))
  task_paths = [path for paths in tasks.values() for path in paths]
  print(f"writing {len(task_paths)} shards ({description})", flush=True)
  with beam.Pipeline(runner=runner, options=options) as pipeline:
    _ = (pipeline
         | "ShardTasks" >> beam.Create(task_paths)
         # Spread the tasks over workers; Create emits one bundle.
         | "Spread" >> beam.Reshuffle()
         | "WriteShard" >> beam.Map(shard_writer.write_shard,
                                    listing.reader, shard_config))


def settle_schema(schema, results: dict):
  """Fills an image schema's shape and format from what the shards saw."""
  if schema.kind != "image":
    return schema
  sizes = {tuple(size) for r in results.values() for size in r["image_sizes"]}
  channels = {c for r in results.values() for c in r["image_channels"]}
  formats = {f for r in results.values() for f in r["image_formats"]}
  height, width = sizes.pop() if len(sizes) == 1 else (None, None)
  # TFDS images have 1, 3 or 4 channels; mixed ones decode as RGB.
  common_channels = channels.pop() if len(channels) == 1 else 3
  if common_channels not in (1, 3, 4):
    common_channels = 3
  return dataclasses.replace(
      schema, shape=(height, width, common_channels),
      image_format=formats.pop() if len(formats) == 1 else None)


def write_dead_letter(output_dir: str, rejected: list) -> str | None:
  if not rejected:
    return None
  path = posixpath.join(output_dir, DEAD_LETTER_FILE)
  with FileSystems.create(path, compression_type="uncompressed") as stream:
    for entry in rejected:
      stream.write((json.dumps(entry) + "\n").encode())
  return path


@dataclasses.dataclass(frozen=True)
class SplitSummary:
  name: str
  num_examples: int
  num_shards: int
  num_bytes: int
  num_rejected: int


def convert(config: ConvertConfig, beam_args: list = ()) -> list:
  """Runs the conversion; returns a SplitSummary per split.

  beam_args: Beam's own flags, as typed on the command line.
  Raises UserError for bad input (before any Beam work) and when more than
  max_bad_fraction of the records are bad (then no metadata is written).
  """
  beam_args = list(beam_args)
  parse_beam_options(beam_args)  # a typo fails now, not after the listing
  return _convert(config, beam_args)


def summarize(tasks: dict, results: dict, listing_rejected: list) -> tuple:
  """Merges the shards' statistics and the listing's rejections.

  Returns ([SplitSummary], {split: (shard lengths, bytes)} for the metadata,
  [dead-letter entries] sorted, so the file is the same on every run).
  """
  rejected_by_split = {}
  for entry in listing_rejected:
    rejected_by_split.setdefault(entry.split, []).append(entry._asdict())
  summaries, splits_metadata, rejected = [], {}, []
  for split in sorted(set(tasks) | set(rejected_by_split)):
    shards = [results[(split, index)] for index in range(len(tasks.get(split, ())))]
    split_rejected = rejected_by_split.get(split, []) + [
        dict(key=key, source=source, reason=reason, split=split)
        for shard in shards for key, source, reason in shard["rejected"]]
    rejected += split_rejected
    lengths = [shard["num_examples"] for shard in shards]
    num_bytes = sum(shard["num_bytes"] for shard in shards)
    if shards:
      splits_metadata[split] = (lengths, num_bytes)
    summaries.append(SplitSummary(split, sum(lengths), len(shards), num_bytes,
                                  len(split_rejected)))
  rejected.sort(key=lambda entry: (entry["split"], entry["key"]))
  return summaries, splits_metadata, rejected


def describe_labels(schema) -> str:
  """What the labels became: a CSV column of numbers that are not all
  integers is a regression target, which the user should see."""
  if schema.class_names is None:
    return "labels: a regression target (float32: not all class ids)"
  names = schema.class_names
  shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
  return f"labels: {len(names)} classes ({shown})"


def _convert(config: ConvertConfig, beam_args: list) -> list:
  started = time.monotonic()
  if config.source != "tfds":  # a TFDS name, not a path
    if not path_exists(config.input):
      raise UserError(f"{config.input}: no such file or directory")
    check_output_outside_input(config.input, config.output_dir)
  prepare_output_dir(config.output_dir, config.overwrite)
  listing = list_source(config)
  raw_splits = sorted({item.split for item in listing.items} - {None})
  if raw_splits and config.splits:
    raise UserError(f"{config.input} has its own splits ({', '.join(raw_splits)}); "
                    "drop --splits")
  splits = None if raw_splits else config.splits or DEFAULT_SPLITS
  tasks = shard_writer.plan_tasks(listing.items, config.output_dir, splits,
                                  config.num_shards, config.seed,
                                  bytes_per_item=listing.num_bytes / len(listing.items))
  listing_rejected = [entry._replace(split=entry.split or shard_writer.assign_split(
      entry.key, splits)) for entry in listing.rejected]
  print(f"listed and planned {len(listing.items)} examples in "
        f"{time.monotonic() - started:.1f} s; {describe_labels(listing.schema)}",
        flush=True)

  shard_config = shard_writer.ShardConfig(
      output_dir=config.output_dir, name=config.name, schema=listing.schema,
      compression=config.compression, image_size=config.image_size,
      image_format=config.image_format)
  started = time.monotonic()
  run_beam(tasks, listing, shard_config, beam_args)
  results = shard_writer.read_results(config.output_dir, tasks)
  print(f"wrote the shards in {time.monotonic() - started:.1f} s", flush=True)

  summaries, splits_metadata, rejected = summarize(tasks, results,
                                                    listing_rejected)
  dead_letter = write_dead_letter(config.output_dir, rejected)
  num_written = sum(s.num_examples for s in summaries)
  if num_written == 0:
    raise UserError(f"{config.input}: every record was rejected; see {dead_letter}")
  lost = [s.name for s in summaries if s.num_examples == 0]
  if lost:  # a split the raw data has, gone: never a dataset without it
    reason = next(entry for entry in rejected if entry["split"] == lost[0])
    raise UserError(
        f"split {lost[0]}: every record was rejected ({reason['source']}: "
        f"{reason['reason']}); see {dead_letter} (no metadata written)")
  if len(rejected) > config.max_bad_fraction * (num_written + len(rejected)):
    raise UserError(
        f"{len(rejected)} of {num_written + len(rejected)} records were bad, "
        f"more than --max_bad_fraction={config.max_bad_fraction}; see "
        f"{dead_letter} (no metadata written: not a dataset)")
  metadata.write(
      config.output_dir, settle_schema(listing.schema, results), splits_metadata,
      compression=config.compression,
      description=f"Converted from {config.input} ({config.source}).")
  shard_writer.delete_staging(config.output_dir)
  return summaries


# --- entry point -------------------------------------------------------------


def _human_bytes(num_bytes: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if num_bytes < 1024 or unit == "GiB":
      return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes} B"
    num_bytes /= 1024


def format_summary(summaries: list, seconds: float, output_dir: str) -> str:
  lines = [f"{'split':<12}{'examples':>10}{'shards':>8}{'bytes':>12}{'rejected':>10}"]
  for s in summaries + [SplitSummary(
      "total", sum(s.num_examples for s in summaries),
      sum(s.num_shards for s in summaries),
      sum(s.num_bytes for s in summaries),
      sum(s.num_rejected for s in summaries))]:
    lines.append(f"{s.name:<12}{s.num_examples:>10}{s.num_shards:>8}"
                 f"{_human_bytes(s.num_bytes):>12}{s.num_rejected:>10}")
  total = summaries and sum(s.num_examples for s in summaries)
  lines.append(f"{total} examples in {seconds:.1f} s "
               f"({total / max(seconds, 1e-9):,.0f} examples/s)")
  if any(s.num_rejected for s in summaries):
    lines.append(f"rejected records (source and reason): "
                 f"{posixpath.join(output_dir, DEAD_LETTER_FILE)}")
  lines.append(f"wrote {output_dir}; read it with "
               f"tfds.builder_from_directory({output_dir!r})")
  return "\n".join(lines)
