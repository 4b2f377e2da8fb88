"""The embedded default dataset: a raw image folder the project draws itself.

`python -m pipeline.make_tfrecords` with no flags converts this folder, and the
trainer tests learn from it, so it has to exist without any download. Each
image is one shape (circle, ring, square, triangle, cross, star) drawn at a
random position, size, rotation and colour on a noisy background of another
random colour. No single pixel or colour gives the class away, yet a small CNN
separates the shapes to high accuracy in a few hundred steps.

Everything is seeded per image from (seed, class, index), so the same
arguments always give byte-identical files, and a larger `examples_per_class`
only adds files.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image
from PIL import ImageDraw

CLASS_NAMES = ("circle", "ring", "square", "triangle", "cross", "star")

# Shapes are drawn this many times larger and then box-downsampled: edges
# come out anti-aliased, which keeps 32x32 shapes recognisable.
_SUPERSAMPLE = 4
_NOISE_STDDEV = 10.0
_MIN_CONTRAST = 70  # mean absolute RGB difference between shape and background


def _polygon(center, radius, angle, corners, inner_ratio=None):
  """Vertices of a regular polygon, or a star when inner_ratio is given."""
  points = []
  steps = corners * 2 if inner_ratio else corners
  for step in range(steps):
    length = radius * (inner_ratio if inner_ratio and step % 2 else 1.0)
    theta = angle + 2 * math.pi * step / steps
    points.append((center[0] + length * math.cos(theta),
                   center[1] + length * math.sin(theta)))
  return points


def _draw_shape(draw, class_name, center, radius, angle, colour):
  x, y = center
  if class_name == "circle":
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
  elif class_name == "ring":
    draw.ellipse((x - radius, y - radius, x + radius, y + radius),
                 outline=colour, width=max(1, int(radius * 0.3)))
  elif class_name == "square":
    draw.polygon(_polygon(center, radius, angle, 4), fill=colour)
  elif class_name == "triangle":
    draw.polygon(_polygon(center, radius, angle, 3), fill=colour)
  elif class_name == "cross":
    half_width = radius * 0.28
    for bar_angle in (angle, angle + math.pi / 2):
      along = (math.cos(bar_angle), math.sin(bar_angle))
      across = (-along[1], along[0])
      draw.polygon([
          (x + sign_a * radius * along[0] + sign_b * half_width * across[0],
           y + sign_a * radius * along[1] + sign_b * half_width * across[1])
          for sign_a, sign_b in ((1, 1), (1, -1), (-1, -1), (-1, 1))
      ], fill=colour)
  elif class_name == "star":
    draw.polygon(_polygon(center, radius, angle, 5, inner_ratio=0.45),
                 fill=colour)
  else:
    raise ValueError(f"unknown shape {class_name!r}")


def _contrasting_colours(rng):
  while True:
    background, foreground = rng.integers(0, 256, size=(2, 3))
    if np.abs(background - foreground).mean() >= _MIN_CONTRAST:
      return tuple(int(v) for v in background), tuple(int(v) for v in foreground)


def draw_image(class_name: str, image_size: int, rng) -> np.ndarray:
  """One uint8 [image_size, image_size, 3] picture of `class_name`."""
  big = image_size * _SUPERSAMPLE
  background, foreground = _contrasting_colours(rng)
  canvas = Image.new("RGB", (big, big), background)
  radius = rng.uniform(0.2, 0.4) * big
  center = rng.uniform(radius, big - radius, size=2)
  angle = rng.uniform(0, 2 * math.pi)
  _draw_shape(ImageDraw.Draw(canvas), class_name, tuple(center), radius, angle,
              foreground)
  small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
  pixels = np.asarray(small, dtype=np.float32)
  pixels += rng.normal(0.0, _NOISE_STDDEV, size=pixels.shape)
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def write_shapes(root: str, *, examples_per_class: int = 300,
                 image_size: int = 32, seed: int = 0) -> tuple[str, ...]:
  """Writes `root/<class>/<index>.png` for every shape; returns the class names.

  Local paths only (it is a demo generator; the converter itself reads gs://).
  """
  for label, class_name in enumerate(CLASS_NAMES):
    class_dir = os.path.join(root, class_name)
    os.makedirs(class_dir, exist_ok=True)
    for index in range(examples_per_class):
      rng = np.random.default_rng((seed, label, index))
      pixels = draw_image(class_name, image_size, rng)
      Image.fromarray(pixels).save(os.path.join(class_dir, f"{index:04d}.png"),
                                   format="PNG")
  return CLASS_NAMES


def ensure_shapes(root: str, **kwargs) -> tuple[str, bool]:
  """Writes the shapes folder unless `root` exists; returns (root, written).

  Written into a temporary sibling and renamed into place, so an interrupted
  run never leaves a half-written folder that a later run would take as done.
  """
  if os.path.isdir(root):
    return root, False
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".shapes-", dir=parent)
  try:
    write_shapes(staging, **kwargs)
    os.replace(staging, root)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return root, True
