"""The trained model as a SavedModel that serves serialised `tf.Example`s.

    export_dir/                 (a SavedModel)
      serving_default(examples: string [N]) -> probabilities [N, classes]
                                                or values [N] (regression)
      predict(inputs: the model's input tensor) -> the same outputs
      labels.txt                class names, line i = class id i
      model.tflite              with tflite=True: `predict` for TFLite

`serving_default` parses and decodes with `pipeline.records.parse_batch`, the
function the reader uses, so training and serving see the same pixels,
without the label: examples sent for prediction need not have one. Loading the export needs only
TensorFlow: nothing from this project, no Keras custom objects.
"""

from __future__ import annotations

import os

import tensorflow as tf

from pipeline import records


def export(model, schema, export_dir: str, image_size=None,
           tflite: bool = False, quantization: str = "none") -> None:
  """Writes the SavedModel (and optionally model.tflite) to `export_dir`.

  model: float32 Keras model, reader inputs -> logits (or [N, 1] values).
  quantization: "none", "dynamic" (int8 weights) or "float16", TFLite only.
  """
  is_regression = schema.class_names is None
  module = tf.Module()
  module.model = model
  # The raw tf.Variables under Keras 3's variables, tracked explicitly: without
  # this the TFLite converter freezes garbage (NaN outputs, TF 2.21).
  module.model_variables = [variable.value for variable in model.variables]
  input_spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]),
                             model.inputs[0].dtype, name="inputs")

  @tf.function(input_signature=[input_spec])
  def predict(inputs):
    outputs = tf.cast(model(inputs, training=False), tf.float32)
    if is_regression:
      return {"values": outputs[:, 0]}
    return {"probabilities": tf.nn.softmax(outputs, axis=-1)}

  @tf.function(input_signature=[
      tf.TensorSpec([None], tf.string, name="examples")])
  def serve(examples):
    return predict(records.parse_batch(examples, schema, image_size,
                                       with_label=False))

  module.predict = predict
  module.serve = serve
  tf.saved_model.save(module, export_dir, signatures={
      "serving_default": serve, "predict": predict})
  if not is_regression:
    with tf.io.gfile.GFile(os.path.join(export_dir, "labels.txt"), "w") as f:
      f.write("".join(f"{name}\n" for name in schema.class_names))
  if tflite:
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [predict.get_concrete_function()], module)
    if quantization in ("dynamic", "float16"):
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
      converter.target_spec.supported_types = [tf.float16]
    with tf.io.gfile.GFile(os.path.join(export_dir, "model.tflite"),
                           "wb") as f:
      f.write(converter.convert())
