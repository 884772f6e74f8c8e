"""`python -m trgl_dist` is `python -m trgl_dist.train`."""

from trgl_dist.train import run

run()
