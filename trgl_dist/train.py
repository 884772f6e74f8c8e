"""Entry point: parse -> run -> exit code. `python -m trgl_dist.train`, or under torchrun."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from trgl_dist import cli
from trgl_dist.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        config, extras = cli.parse(argv)
        resume = extras.resume is not None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or config.train.regime == "pipeline":
            from trgl_dist.runtime.pipeline import run_pipeline

            return run_pipeline(config.replace("train", regime="pipeline"), resume=resume)
        from trgl_dist.regimes.run import run_single_process

        return run_single_process(config, resume=resume)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"error: stopped, {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
