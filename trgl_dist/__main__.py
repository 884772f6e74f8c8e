"""`python -m trgl_dist` is `python -m trgl_dist.train`."""

import sys

from trgl_dist.train import main

sys.exit(main())
