"""Entry point: parse -> run -> exit code. `python -m trgl_dist.train`, or under torchrun."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType


def _stopped_while_loading(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C (or the launcher's signal) while torch is still being imported: say it once,
    from rank 0, and leave; there is nothing to save yet."""
    if os.environ.get("RANK", "0") == "0":
        sys.stderr.write("trgl_dist: interrupted while starting\n")
    os._exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    # Imported here: a signal during these imports (seconds, for torch) is handled above.
    from trgl_dist import cli
    from trgl_dist.errors import StorageError, UserError, user_message
    from trgl_dist.training.snapshot import Resume

    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here: KeyboardInterrupt
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        config, extras = cli.parse(argv)
        resume = Resume(extras.resume_step) if extras.resume is not None else None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or config.train.regime == "pipeline":
            from trgl_dist.runtime.pipeline import run_pipeline

            return run_pipeline(config.replace("train", regime="pipeline"), resume=resume)
        from trgl_dist.regimes.run import run_single_process

        return run_single_process(config, resume=resume)
    except UserError as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 2
    except (FloatingPointError, StorageError) as err:
        print(f"error: stopped, {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The command: signals handled from the first instant, then ``main``'s exit code."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopped_while_loading)
    sys.exit(main())


if __name__ == "__main__":
    run()
