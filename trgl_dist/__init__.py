"""trgl_dist: module-wise training with transport regularization, and a multi-process pipeline."""

__version__ = "0.1.0"
