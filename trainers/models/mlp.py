"""A multilayer perceptron for tabular rows: repeated `DenseBlock`s, then one
linear output per class (logits) or a single value (regression). With no
hidden layers it is the linear / logistic regression of the classic tutorials.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="trainers")
class DenseBlock(keras.layers.Layer):
  """Dense + ReLU; a layer of its own so hidden layers read as one call."""

  def __init__(self, units: int, **kwargs):
    super().__init__(**kwargs)
    self.units = units
    self.dense = keras.layers.Dense(units, activation="relu",
                                    dtype=self.dtype_policy)

  def build(self, input_shape):
    self.dense.build(input_shape)

  def call(self, inputs):
    return self.dense(inputs)

  def compute_output_shape(self, input_shape):
    return (*input_shape[:-1], self.units)

  def get_config(self):
    return {**super().get_config(), "units": self.units}


def build_mlp(num_features: int, num_outputs: int, hidden_units=(64, 64),
              dtype=None, moments=None) -> keras.Model:
  """float32 rows [B, num_features] -> float32 [B, num_outputs].

  num_outputs: the number of classes (logits), or 1 for regression.
  moments: (mean, variance) per feature to standardise with, as the classic
    tutorials' Normalization layer does; CSV columns come in any scale.
  """
  rows = keras.Input(shape=(num_features,), dtype="float32", name="features")
  features = rows
  if moments is not None:
    mean, variance = moments
    features = keras.layers.Normalization(
        mean=list(mean), variance=list(variance), name="normalize")(features)
  for index, units in enumerate(hidden_units):
    features = DenseBlock(units, dtype=dtype, name=f"block{index}")(features)
  outputs = keras.layers.Dense(num_outputs, dtype="float32",
                               name="outputs")(features)
  return keras.Model(rows, outputs, name="mlp")
