"""A TFDS dataset already prepared under --tfds_data_dir, re-sharded.

Nothing is downloaded: the dataset must have been built (`tfds build` or
`tfds.load` once). Encoded images are kept as TFDS stored them (no decode);
the splits are TFDS's. This source needs TensorFlow in the workers, unlike
the others. Each shard task streams the split once and keeps its own
examples, so the work grows with the number of shards: the default shard
count (by size) keeps it small.
"""

from __future__ import annotations

import dataclasses

from pipeline import records
from pipeline.sources import common
from pipeline.sources import image_folder


def _builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder(name, data_dir=data_dir)


def _feature_keys(features) -> tuple:
  """(input key, kind, label key, is_regression) from a TFDS FeaturesDict."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  vectors = [k for k, f in features.items()
             if isinstance(f, tfds.features.Tensor) and len(f.shape) == 1
             and k != records.LABEL_KEY]
  label = features[records.LABEL_KEY] if records.LABEL_KEY in features else None
  if label is None or not (images or vectors):
    raise ValueError(f"features {sorted(features.keys())}: need an Image or a "
                     f"1-D Tensor, and a '{records.LABEL_KEY}'")
  is_regression = not isinstance(label, tfds.features.ClassLabel)
  if images:
    return images[0], "image", records.LABEL_KEY, is_regression
  return vectors[0], "vector", records.LABEL_KEY, is_regression


@dataclasses.dataclass(frozen=True)
class TfdsReader:
  """Streams each split of the shard's items once, keeping the wanted ones."""
  name: str
  data_dir: str | None
  input_key: str
  kind: str

  def read(self, items):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = _builder(self.name, self.data_dir)
    wanted = {}
    for item in items:
      split, index = item.location
      wanted.setdefault(split, set()).add(index)
    found = {}  # one shard's examples
    decoders = ({self.input_key: tfds.decode.SkipDecoding()}
                if self.kind == "image" else None)
    for split, indices in wanted.items():
      dataset = builder.as_dataset(split=split, shuffle_files=False,
                                   decoders=decoders)
      for index, example in enumerate(dataset.take(max(indices) + 1)
                                      .as_numpy_iterator()):
        if index in indices:
          found[(split, index)] = example
    for item in items:
      split, index = item.location
      example = found.get((split, index))
      source = f"{self.name}/{split}[{index}]"
      if example is None:
        yield common.Rejected(item.key, source, "example missing from the split")
        continue
      inputs = example[self.input_key]
      if self.kind == "image":
        try:
          image = image_folder.inspect_image(inputs)
        except ValueError as error:
          yield common.Rejected(item.key, source, str(error))
          continue
        yield common.Record(item.key, inputs, example[records.LABEL_KEY].item(),
                            image)
      else:
        yield common.Record(item.key, [float(v) for v in inputs],
                            example[records.LABEL_KEY].item())


def list_examples(name: str, data_dir: str | None,
                  splits: tuple = ()) -> common.Listing:
  """Keys (split, index) from each split's size; ValueError if not prepared.

  splits: the TFDS splits to convert; default: all the dataset has.
  """
  try:
    builder = _builder(name, data_dir)
  except Exception as error:  # TFDS raises its own types for unknown names.
    raise ValueError(f"TFDS dataset {name!r}: {error}".splitlines()[0]) from error
  splits = tuple(splits) or tuple(sorted(builder.info.splits.keys()))
  if not splits:
    raise ValueError(f"TFDS dataset {name!r} lists no splits under "
                     f"{builder.data_dir}: not prepared? (this job does not "
                     "download; build it first, or pass --tfds_data_dir)")
  features = builder.info.features
  input_key, kind, label_key, is_regression = _feature_keys(features)
  items = []
  for split in splits:
    try:
      count = int(builder.as_dataset(split=split).cardinality())
    except Exception as error:  # TFDS raises many types for missing data.
      raise ValueError(f"TFDS dataset {name!r} split {split!r} is not readable "
                       f"under {builder.data_dir}: {error}".splitlines()[0]
                       ) from error
    if count < 0:
      raise ValueError(f"TFDS dataset {name!r} split {split!r}: unknown size")
    items += [common.Item(f"{builder.name}/{split}:{index}", (split, index),
                          None, split) for index in range(count)]
  label_feature = features[label_key]
  class_names = None if is_regression else tuple(label_feature.names)
  if kind == "image":
    image = features[input_key]
    schema = records.Schema(kind="image", shape=tuple(image.shape),
                            class_names=class_names)
  else:
    schema = records.Schema(kind="vector", shape=tuple(features[input_key].shape),
                            class_names=class_names)
  num_bytes = sum(int(builder.info.splits[s].num_bytes or 0)
                  for s in builder.info.splits.keys() if s in splits)
  return common.Listing(items, schema,
                        TfdsReader(name, data_dir, input_key, kind), num_bytes)
