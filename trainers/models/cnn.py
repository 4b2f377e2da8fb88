"""An image classifier: standardise, repeated `ConvBlock`s, pool, dense, logits.

Sized from the dataset's metadata: the input shape and number of classes come
from `pipeline.records.Schema`. Takes uint8 images straight from the reader
(or the export's decoder) and normalises inside the model, so the serving
signature and training feed the same thing.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="trainers")
class Standardize(keras.layers.Layer):
  """Each image to zero mean and unit variance over its pixels.

  Colour and brightness then stop mattering before the first convolution;
  on the demo shapes (random colours) this is the difference between
  learning in hundreds of steps and barely learning. Computed in float32.
  """

  def call(self, images):
    images = keras.ops.cast(images, "float32")
    mean = keras.ops.mean(images, axis=(1, 2, 3), keepdims=True)
    deviation = keras.ops.std(images, axis=(1, 2, 3), keepdims=True)
    # Floor of one grey level: a flat image stays finite.
    standardized = (images - mean) / keras.ops.maximum(deviation, 1.0)
    return keras.ops.cast(standardized, self.compute_dtype)


@keras.saving.register_keras_serializable(package="trainers")
class ConvBlock(keras.layers.Layer):
  """Two 3x3 convolutions with ReLU, then 2x2 max-pooling."""

  def __init__(self, filters: int, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.first = keras.layers.Conv2D(filters, 3, padding="same",
                                     activation="relu", dtype=self.dtype_policy)
    self.second = keras.layers.Conv2D(filters, 3, padding="same",
                                      activation="relu",
                                      dtype=self.dtype_policy)
    self.pool = keras.layers.MaxPooling2D(2, dtype=self.dtype_policy)

  def build(self, input_shape):
    self.first.build(input_shape)
    middle_shape = self.first.compute_output_shape(input_shape)
    self.second.build(middle_shape)
    self.pool.build(self.second.compute_output_shape(middle_shape))

  def call(self, inputs):
    return self.pool(self.second(self.first(inputs)))

  def compute_output_shape(self, input_shape):
    batch, height, width, _ = input_shape
    half = lambda size: None if size is None else size // 2
    return (batch, half(height), half(width), self.filters)

  def get_config(self):
    return {**super().get_config(), "filters": self.filters}


def build_cnn(input_shape: tuple, num_classes: int, filters=(32, 64, 128),
              dense_units: int = 128, dtype=None) -> keras.Model:
  """uint8 images [B, H, W, C] -> float32 logits [B, num_classes].

  dtype: a Keras dtype policy such as "mixed_bfloat16"; the logits layer stays
  float32 so the loss is computed at full precision.
  """
  images = keras.Input(shape=input_shape, dtype="uint8", name="images")
  features = Standardize(dtype=dtype, name="standardize")(images)
  for index, width in enumerate(filters):
    features = ConvBlock(width, dtype=dtype, name=f"block{index}")(features)
  features = keras.layers.GlobalAveragePooling2D(dtype=dtype)(features)
  features = keras.layers.Dense(dense_units, activation="relu",
                                dtype=dtype)(features)
  logits = keras.layers.Dense(num_classes, dtype="float32",
                              name="logits")(features)
  return keras.Model(images, logits, name="cnn")
