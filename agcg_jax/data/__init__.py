"""Data: phantom generator, NIH ChestX-ray14 cohorts, TFDS builders, Grain pipelines."""
