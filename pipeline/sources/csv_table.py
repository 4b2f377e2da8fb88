"""CSV tables with a header: numeric feature columns and a label column.

The label decides the task unless --task says: integers (>= 0) are class ids
(class names "0".."max"), other numbers a regression target, anything else
class names (sorted; ids in that order). The driver streams the file once to
learn the labels and check every row; the shard tasks stream it again and
keep their own rows (a CSV row cannot be found without reading up to it).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import posixpath

from apache_beam.io.filesystems import FileSystems

from pipeline import records
from pipeline.sources import common


def _rows(path: str):
  """Yields (row_number, fields) after the header; row 0 is the first data row."""
  with FileSystems.open(path) as stream:  # .gz decompressed by extension
    # utf-8-sig: a byte-order mark (Excel's CSV export writes one) would
    # otherwise become part of the first column's name.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    reader = csv.reader(text, delimiter="\t" if ".tsv" in path else ",")
    yield -1, next(reader, None)
    yield from enumerate(reader)


def parse_row(fields: list, width: int, label_index: int) -> tuple:
  """(features, raw label) of one row; ValueError says what is wrong."""
  if len(fields) != width:
    raise ValueError(f"{len(fields)} columns, expected {width}")
  features = []
  for column, text in enumerate(fields):
    if column == label_index:
      continue
    try:
      value = float(text)
    except ValueError:
      raise ValueError(f"column {column + 1}: {text!r} is not a number") from None
    if not math.isfinite(value):
      raise ValueError(f"column {column + 1}: {text!r} is not finite")
    features.append(value)
  label = fields[label_index].strip()
  if not label:
    raise ValueError("empty label")
  return features, label


def _label_kind(labels: set, task: str | None) -> str:
  """'ids', 'names' or 'regression' for the raw label strings seen."""
  def is_number(text):
    try:
      return math.isfinite(float(text))
    except ValueError:
      return False
  if task == "regression":
    bad = next((label for label in labels if not is_number(label)), None)
    if bad is not None:
      raise ValueError(f"--task=regression but label {bad!r} is not a number")
    return "regression"
  if all(label.isdigit() for label in labels):
    return "ids"
  if task is None and all(is_number(label) for label in labels):
    return "regression"
  return "names"


@dataclasses.dataclass(frozen=True)
class CsvReader:
  """Streams the CSV and keeps the wanted rows (labels come with the items)."""
  path: str
  width: int
  label_index: int

  def read(self, items):
    wanted = {item.location: item for item in items}
    rows = {}
    for row_number, fields in _rows(self.path):
      if row_number in wanted:
        rows[row_number] = fields
    for item in items:
      source = f"{self.path}:{item.location + 2}"  # 1-based, after the header
      try:
        features, _ = parse_row(rows[item.location], self.width, self.label_index)
      except (KeyError, ValueError) as error:
        reason = "row missing" if isinstance(error, KeyError) else str(error)
        yield common.Rejected(item.key, source, reason)
        continue
      yield common.Record(item.key, features, item.label)


def list_examples(path: str, label_column: str,
                  task: str | None = None) -> common.Listing:
  """One pass: checks every row, learns the labels; bad rows are rejected."""
  rows = _rows(path)
  _, header = next(rows)
  if not header:
    raise ValueError(f"{path}: empty file, expected a header row")
  header = [name.strip() for name in header]
  if label_column not in header:
    raise ValueError(f"{path}: no column {label_column!r} in the header "
                     f"({', '.join(header)}); pass --label_column")
  label_index = header.index(label_column)
  file_name = posixpath.basename(path)
  good, rejected, labels = [], [], set()
  for row_number, fields in rows:
    key = f"{file_name}:{row_number}"
    try:
      _, label = parse_row(fields, len(header), label_index)
    except ValueError as error:
      rejected.append(common.Rejected(key, f"{path}:{row_number + 2}", str(error)))
      continue
    good.append((key, row_number, label))
    labels.add(label)
  if not good:
    first = rejected[0] if rejected else None
    raise ValueError(f"{path}: no valid data rows" + (
        f" (e.g. {first.source}: {first.reason})" if first else ""))
  kind = _label_kind(labels, task)
  if kind == "regression":
    class_names, to_label = None, float
  elif kind == "ids":
    class_names = tuple(str(c) for c in range(max(int(l) for l in labels) + 1))
    to_label = int
  else:
    class_names = tuple(sorted(labels))
    ids = {name: index for index, name in enumerate(class_names)}
    to_label = ids.__getitem__
  items = [common.Item(key, row_number, to_label(label))
           for key, row_number, label in good]
  feature_names = tuple(name for index, name in enumerate(header)
                        if index != label_index)
  schema = records.Schema(kind="vector", shape=(len(feature_names),),
                          class_names=class_names, feature_names=feature_names)
  size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
  return common.Listing(items, schema, CsvReader(path, len(header), label_index),
                        size, rejected)
