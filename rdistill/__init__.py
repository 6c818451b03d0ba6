"""rdistill: Ray-distributed prototype-guided distillation of image-text datasets."""

__version__ = "0.1.0"
