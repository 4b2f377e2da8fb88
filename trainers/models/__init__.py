"""Keras models, one module per family; each sizes itself from the schema."""
