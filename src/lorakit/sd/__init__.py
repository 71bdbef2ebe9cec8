"""Stable Diffusion: pipelines, the diffusion loss, image folders, training, generation, the embedded digits model."""

from lorakit.sd import digits  # noqa: F401  (registers the embedded pipeline "digits")
