"""The planner's layout for the benchmark's setting, as JSON (run as a child process).

    python benchmarks/scaling/planner.py OUT.json --world-size N <trgl_dist.train flags>

Calls ``trgl_dist.plan.plan_for`` (what ``python -m trgl_dist.plan`` prints) and writes
its prediction, the layout to run and the table the command prints.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # trgl_dist from the checkout

from trgl_dist.plan import plan_for  # noqa: E402
from trgl_dist.planning.plan import table  # noqa: E402


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out, flags = Path(argv[0]), argv[1:]
    plan = plan_for(flags)
    p = plan.prediction
    result = {
        **plan.as_dict(),
        "stage_modules": list(p.stage_modules),
        "replicas": list(p.replicas),
        "bottleneck": p.bottleneck,
        "table": table(plan),
        "flags": flags,
    }
    out.write_text(json.dumps(result, indent=1))
    print(result["table"])
    return 0


if __name__ == "__main__":  # the profiling processes are spawned: they import this file
    sys.exit(main(sys.argv[1:]))
